"""`a3x run`: the foreground service that runs cycles on a schedule.

Signal handlers, the scheduler and the control socket only put events on a
queue. The main loop waits on that queue with a timeout, pings the systemd
watchdog on every turn, and runs each cycle in one worker thread, so at
most one cycle runs at a time.
"""

from __future__ import annotations

import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from types import FrameType
from typing import Any

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from daemon.config import load_config
from daemon.control import ControlServer, socket_path
from daemon.cycle import Agent, CycleRequest
from daemon.phases import requested_tasks
from daemon.records import CycleRecord
from daemon.systemd import notify, watchdog_interval_seconds

log = structlog.get_logger(__name__)

STOP_TIMEOUT_SECONDS = 30.0  # how long a stop waits for the running cycle to wind down
START_TIMEOUT_SECONDS = 30.0  # how long a control client waits for its cycle to start
CYCLE_JOB_ID = "cycle"
Reply = Callable[[dict[str, Any]], None]


@dataclass
class CycleOrder:
    """A cycle to start, with callbacks for its start and its result."""

    request: CycleRequest
    on_started: Callable[[int | None, str | None], None] = lambda cycle, error: None
    on_finished: Callable[[CycleRecord | None, str | None], None] = lambda record, error: None


class Service:
    def __init__(self, agent: Agent):
        self.agent = agent
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.stop_cycle = threading.Event()
        self.scheduler = BackgroundScheduler(timezone=UTC)
        self.worker: threading.Thread | None = None
        self.running_cycle: int | None = None
        self.paused = False
        self.cycles_run = 0
        self.control: ControlServer | None = None

    def run(self) -> int:
        self._install_signal_handlers()
        self.control = ControlServer(socket_path(self.agent.home.root), self._on_request)
        _ = self.agent.backend  # load the model before telling systemd we are ready
        self._schedule()
        self.scheduler.start()
        self.control.start()
        notify("READY=1")
        log.info(
            "service.started",
            home=str(self.agent.home.root),
            interval_minutes=self.agent.config.schedule.interval_minutes,
            socket=str(self.control.path),
        )
        tick = watchdog_interval_seconds()
        while True:
            try:
                event, payload = self.events.get(timeout=tick)
            except queue.Empty:
                event, payload = "tick", None
            notify("WATCHDOG=1")
            if event == "stop":
                break
            self._handle(event, payload)
        return self._shutdown()

    def _handle(self, event: str, payload: Any) -> None:
        if event == "cycle":
            self._start_cycle(payload or CycleOrder(CycleRequest(trigger="schedule")))
        elif event == "reload":
            self._reload()

    def _schedule(self) -> None:
        schedule = self.agent.config.schedule
        first = datetime.now(UTC) if schedule.run_on_start else None
        options = {"next_run_time": first} if first else {}
        self.scheduler.add_job(
            self.events.put,
            "interval",
            args=[("cycle", None)],
            id=CYCLE_JOB_ID,
            minutes=schedule.interval_minutes,
            coalesce=True,
            max_instances=1,
            misfire_grace_time=schedule.misfire_grace_seconds,
            replace_existing=True,
            **options,
        )
        if self.paused:
            self.scheduler.pause_job(CYCLE_JOB_ID)

    def _start_cycle(self, order: CycleOrder) -> None:
        if self.worker is not None and self.worker.is_alive():
            busy = f"a cycle is already running (cycle {self.running_cycle})"
            log.info("cycle.skipped", reason=busy, trigger=order.request.trigger)
            order.on_started(None, busy)
            return
        self.stop_cycle.clear()
        # A daemon thread, so that a cycle stuck past the stop timeout cannot keep the
        # process alive. The next start then records that cycle as aborted.
        self.worker = threading.Thread(
            target=self._cycle_worker, args=(order,), name="cycle", daemon=True
        )
        self.worker.start()

    def _cycle_worker(self, order: CycleOrder) -> None:
        def started(cycle_id: int) -> None:
            self.running_cycle = cycle_id
            order.on_started(cycle_id, None)

        try:
            record = self.agent.run_cycle(order.request, self.stop_cycle, on_started=started)
            self.cycles_run += 1
            order.on_finished(record, None)
        except Exception as error:
            log.exception("cycle.crashed", trigger=order.request.trigger)
            message = f"{type(error).__name__}: {error}"
            if self.running_cycle is None:
                order.on_started(None, message)
            order.on_finished(None, message)
        finally:
            self.running_cycle = None

    def _reload(self) -> None:
        try:
            config = load_config(self.agent.config.source, home=self.agent.config.home)
            if config.model != self.agent.config.model:
                log.warning("service.reload_model_ignored", reason="model changes need a restart")
                config = replace(config, model=self.agent.config.model)
            interval_changed = config.schedule != self.agent.config.schedule
            self.agent.config = config
            self.agent.reload_book()
            if interval_changed:
                self._schedule()  # replacing the job restarts its interval from now
            log.info("service.reloaded", tasks=len(self.agent.book.tasks))
        except Exception:
            log.exception("service.reload_failed")

    def _shutdown(self) -> int:
        log.info("service.stopping", running_cycle=self.running_cycle)
        notify("STOPPING=1")
        if self.control is not None:
            self.control.close()
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
        def enqueue(event: str) -> Callable[[int, FrameType | None], None]:
            def handler(signum: int, frame: FrameType | None) -> None:
                self.events.put((event, None))

            return handler

        signal.signal(signal.SIGTERM, enqueue("stop"))
        signal.signal(signal.SIGINT, enqueue("stop"))
        signal.signal(signal.SIGHUP, enqueue("reload"))

    # Control requests, called from the control server's client threads.

    def _on_request(self, request: dict[str, Any], reply: Reply) -> None:
        command = request["command"]
        if command == "status":
            reply({"ok": True, **self.status()})
        elif command in ("pause", "resume"):
            self.paused = command == "pause"
            job = self.scheduler.get_job(CYCLE_JOB_ID)
            if job is not None:
                job.pause() if self.paused else job.resume()
            log.info(f"service.{command}d")
            reply({"ok": True, "paused": self.paused})
        elif command == "reload":
            self.events.put(("reload", None))
            reply({"ok": True})
        elif command == "cycle":
            self._on_cycle_request(request, reply)

    def status(self) -> dict[str, Any]:
        job = self.scheduler.get_job(CYCLE_JOB_ID)
        next_run = job.next_run_time if job is not None else None
        return {
            "home": str(self.agent.home.root),
            "running_cycle": self.running_cycle,
            "paused": self.paused,
            "next_run": next_run.isoformat(timespec="seconds") if next_run else None,
            "cycles_run": self.cycles_run,
            "tasks": len(self.agent.book.tasks),
        }

    def _on_cycle_request(self, request: dict[str, Any], reply: Reply) -> None:
        tasks, domain = request.get("tasks", []), request.get("domain")
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            reply({"ok": False, "error": "'tasks' must be a list of task ids"})
            return
        if domain is not None and (not isinstance(domain, str) or not domain.strip()):
            reply({"ok": False, "error": "'domain' must be a non-empty string"})
            return
        retrain = request.get("retrain", [])
        if not isinstance(retrain, list) or not all(isinstance(d, str) for d in retrain):
            reply({"ok": False, "error": "'retrain' must be a list of domain names"})
            return
        unknown = [d for d in retrain if d not in self.agent.book.domains]
        if unknown:
            reply({"ok": False, "error": f"unknown domain {', '.join(unknown)} to retrain"})
            return
        cycle_request = CycleRequest(
            trigger="manual", task_ids=tuple(tasks), domain=domain, retrain=tuple(retrain)
        )
        if tasks or domain:
            try:
                requested_tasks(self.agent.book, cycle_request)
            except KeyError as error:
                reply({"ok": False, "error": error.args[0]})
                return

        started: queue.Queue[tuple[int | None, str | None]] = queue.Queue()
        finished: queue.Queue[tuple[CycleRecord | None, str | None]] = queue.Queue()
        order = CycleOrder(
            cycle_request, lambda c, e: started.put((c, e)), lambda r, e: finished.put((r, e))
        )
        self.events.put(("cycle", order))
        try:
            cycle_id, problem = started.get(timeout=START_TIMEOUT_SECONDS)
        except queue.Empty:
            reply(
                {
                    "ok": False,
                    "error": f"the cycle did not start within {START_TIMEOUT_SECONDS:g} s",
                }
            )
            return
        if problem is not None:
            reply({"ok": False, "error": problem, "busy": "already running" in problem})
            return
        reply({"ok": True, "cycle": cycle_id, "state": "started"})
        if request.get("wait"):
            record, failure = finished.get()
            if record is None:
                reply({"ok": False, "cycle": cycle_id, "error": failure})
            else:
                reply(
                    {
                        "ok": True,
                        "cycle": record.cycle,
                        "state": "finished",
                        "outcome": record.outcome.value,
                        "summary": record.summary,
                    }
                )
