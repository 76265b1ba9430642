"""`a3x run`: the foreground service that runs cycles on a schedule.

Signal handlers and the scheduler only put events on a queue. The main loop
waits on that queue with a timeout, pings the systemd watchdog on every turn,
and runs each cycle in one worker thread, so at most one cycle runs at a time.
"""

from __future__ import annotations

import queue
import signal
import threading
from dataclasses import replace
from datetime import UTC, datetime
from types import FrameType

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from daemon.config import load_config
from daemon.cycle import Agent, CycleRequest
from daemon.systemd import notify, watchdog_interval_seconds

log = structlog.get_logger(__name__)

STOP_TIMEOUT_SECONDS = 30.0  # how long a stop waits for the running cycle to wind down
CYCLE_JOB_ID = "cycle"


class Service:
    def __init__(self, agent: Agent):
        self.agent = agent
        self.events: queue.Queue[str] = queue.Queue()
        self.stop_cycle = threading.Event()
        self.scheduler = BackgroundScheduler(timezone=UTC)
        self.worker: threading.Thread | None = None
        self.cycles_run = 0

    def run(self) -> int:
        self._install_signal_handlers()
        _ = self.agent.backend  # load the model before telling systemd we are ready
        self._schedule()
        self.scheduler.start()
        notify("READY=1")
        log.info(
            "service.started",
            home=str(self.agent.home.root),
            interval_minutes=self.agent.config.schedule.interval_minutes,
        )
        tick = watchdog_interval_seconds()
        while True:
            try:
                event = self.events.get(timeout=tick)
            except queue.Empty:
                event = "tick"
            notify("WATCHDOG=1")
            if event == "stop":
                break
            self._handle(event)
        return self._shutdown()

    def _handle(self, event: str) -> None:
        if event == "cycle":
            self._start_cycle("schedule")
        elif event == "reload":
            self._reload()

    def _schedule(self) -> None:
        schedule = self.agent.config.schedule
        first = datetime.now(UTC) if schedule.run_on_start else None
        options = {"next_run_time": first} if first else {}
        self.scheduler.add_job(
            self.events.put,
            "interval",
            args=["cycle"],
            id=CYCLE_JOB_ID,
            minutes=schedule.interval_minutes,
            coalesce=True,
            max_instances=1,
            misfire_grace_time=schedule.misfire_grace_seconds,
            replace_existing=True,
            **options,
        )

    def _start_cycle(self, trigger: str) -> None:
        if self.worker is not None and self.worker.is_alive():
            log.info("cycle.skipped", reason="a cycle is already running", trigger=trigger)
            return
        self.stop_cycle.clear()
        # A daemon thread, so that a cycle stuck past the stop timeout cannot keep the
        # process alive. The next start then records that cycle as aborted.
        self.worker = threading.Thread(
            target=self._cycle_worker, args=(trigger,), name="cycle", daemon=True
        )
        self.worker.start()

    def _cycle_worker(self, trigger: str) -> None:
        try:
            self.agent.run_cycle(CycleRequest(trigger=trigger), self.stop_cycle)
            self.cycles_run += 1
        except Exception:
            log.exception("cycle.crashed", trigger=trigger)

    def _reload(self) -> None:
        try:
            config = load_config(self.agent.config.source, home=self.agent.config.home)
            if config.model != self.agent.config.model:
                log.warning("service.reload_model_ignored", reason="model changes need a restart")
                config = replace(config, model=self.agent.config.model)
            self.agent.config = config
            self.agent.reload_book()
            self._schedule()
            log.info("service.reloaded", tasks=len(self.agent.book.tasks))
        except Exception:
            log.exception("service.reload_failed")

    def _shutdown(self) -> int:
        log.info("service.stopping")
        notify("STOPPING=1")
        self.scheduler.shutdown(wait=False)
        self.stop_cycle.set()
        if self.worker is not None:
            self.worker.join(timeout=STOP_TIMEOUT_SECONDS)
            if self.worker.is_alive():
                log.error("service.cycle_not_stopped", timeout_seconds=STOP_TIMEOUT_SECONDS)
                return 1
        self.agent.close()
        log.info("service.stopped", cycles=self.cycles_run)
        return 0

    def _install_signal_handlers(self) -> None:
        def enqueue(event: str):
            def handler(signum: int, frame: FrameType | None) -> None:
                self.events.put(event)

            return handler

        signal.signal(signal.SIGTERM, enqueue("stop"))
        signal.signal(signal.SIGINT, enqueue("stop"))
        signal.signal(signal.SIGHUP, enqueue("reload"))
