"""One A3X cycle: plan, execute, ingest, score, decide, retrain, record.

`Agent` holds what lives across cycles (configuration, task book, state,
journal, the loaded model). `Agent.run_cycle` is the recipe; each phase is a
function that reads the previous phase's record and returns its own.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from statistics import fmean
from typing import Any

import structlog

from daemon.config import Config
from daemon.home import CycleLock, Home, prepare_home
from daemon.records import (
    CycleRecord,
    DecideRecord,
    Decision,
    ExecuteRecord,
    IngestRecord,
    Outcome,
    PlannedTask,
    PlanRecord,
    RetrainRecord,
    Run,
    ScoreRecord,
)
from daemon.state import StateStore
from daemon.taskbook import Task, TaskBook, load_books
from evaluators.base import Evaluator
from evaluators.execution import ExecutionEvaluator
from journal.logbook import Logbook
from runtime.backend import Backend
from runtime.loader import ModelInfo, describe_model, open_backend

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class CycleRequest:
    """Request for a cycle: every due task by default, or only the named tasks or one domain."""

    trigger: str = "manual"
    task_ids: tuple[str, ...] = ()
    domain: str | None = None


class Agent:
    """The long-lived parts of A3X, opened once and reused by every cycle.

    Construction validates the task book and the model file before anything
    in the home is written, so a bad input never touches the journal.
    """

    def __init__(
        self,
        config: Config,
        backend_factory: Callable[[Config, Home], Backend] = open_backend,
    ):
        self.config = config
        self.book = load_books(config.tasks.books)
        self.model_info = describe_model(config.model)
        self.home = prepare_home(config.home)
        self.state = StateStore(self.home.state_path)
        self.logbook = Logbook(self.home.journal_path)
        self.evaluators: list[Evaluator] = [
            ExecutionEvaluator(config.score.repetition_distinct_min)
        ]
        self._backend_factory = backend_factory
        self._backend: Backend | None = None

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            started = time.perf_counter()
            self._backend = self._backend_factory(self.config, self.home)
            log.info(
                "model.loaded",
                backend=self._backend.name,
                path=str(self._backend.model_path),
                seconds=round(time.perf_counter() - started, 2),
            )
        return self._backend

    def reload_book(self) -> None:
        self.book = load_books(self.config.tasks.books)

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None
        self.state.close()

    def run_cycle(
        self, request: CycleRequest | None = None, stop: threading.Event | None = None
    ) -> CycleRecord:
        """Run one cycle under the cycle lock and commit its record to the journal."""
        request = request or CycleRequest()
        stop = stop or threading.Event()
        if request.task_ids or request.domain:
            _requested_tasks(self.book, request)  # a bad request raises before any record
        with CycleLock(self.home.lock_path):
            recover_unfinished(self)
            started_at = utc_now()
            cycle_id = self.state.begin_cycle(started_at, request.trigger)
            log.info("cycle.started", cycle=cycle_id, trigger=request.trigger)
            record = self._run_phases(cycle_id, started_at, request, stop)
            commit = self.logbook.commit_cycle(record)
            self.state.finish_cycle(
                cycle_id, record.finished_at, record.outcome, record.summary, record.runs
            )
            self.state.set_journal_commit(cycle_id, commit)
        log.info(
            "cycle.finished",
            cycle=cycle_id,
            outcome=record.outcome.value,
            commit=commit[:12],
            summary=record.summary,
        )
        return record

    def _run_phases(
        self, cycle_id: int, started_at: str, request: CycleRequest, stop: threading.Event
    ) -> CycleRecord:
        record = CycleRecord(
            cycle=cycle_id,
            outcome=Outcome.FAILED,
            started_at=started_at,
            finished_at=started_at,
            trigger=request.trigger,
            model=self.model_info.to_json(self.config.model.backend),
            summary="",
        )
        try:
            plan = plan_phase(
                self.book,
                request,
                self.state.last_run_cycles(),
                cycle_id,
                self.config.tasks.max_per_cycle,
            )
            record = replace(record, plan=plan)

            execute = execute_phase(
                self.backend, self.book, plan, cycle_id, self.config.model.seed, stop
            )
            record = replace(record, execute=execute)

            ingest = ingest_phase(execute)
            score = score_phase(self.evaluators, execute)
            decide = decide_phase(plan, score)
            retrain = retrain_phase(decide)
            record = replace(record, ingest=ingest, score=score, decide=decide, retrain=retrain)
        except Exception as error:  # a failed cycle is recorded, never lost
            log.exception("cycle.phase_failed", cycle=cycle_id)
            record = replace(record, error=f"{type(error).__name__}: {error}")
        outcome = cycle_outcome(record)
        return replace(
            record, outcome=outcome, finished_at=utc_now(), summary=summarize(record, outcome)
        )


# Phases


def plan_phase(
    book: TaskBook,
    request: CycleRequest,
    last_runs: dict[str, int],
    cycle_id: int,
    max_per_cycle: int,
) -> PlanRecord:
    """Pick the tasks to run: the requested ones, or those due, capped by weight."""
    if request.task_ids or request.domain:
        selected = _requested_tasks(book, request)
        reason = "requested: " + (
            f"tasks {', '.join(request.task_ids)}"
            if request.task_ids
            else f"domain {request.domain}"
        )
        not_due = 0
    else:
        selected = [t for t in book.tasks if _is_due(t, last_runs.get(t.id), cycle_id)]
        not_due = len(book.tasks) - len(selected)
        reason = "due tasks from the task book"
    if max_per_cycle and len(selected) > max_per_cycle:
        selected = weighted_sample(selected, max_per_cycle, random.Random(cycle_id))
        reason += f", {max_per_cycle} picked by weight"
    planned = tuple(PlannedTask(task.id, task.domain) for task in selected)
    return PlanRecord(tasks=planned, skipped_not_due=not_due, reason=reason)


def execute_phase(
    backend: Backend,
    book: TaskBook,
    plan: PlanRecord,
    cycle_id: int,
    base_seed: int,
    stop: threading.Event,
) -> ExecuteRecord:
    """Run each planned task on the model; a failing task is recorded, not raised."""
    started = time.perf_counter()
    runs: list[Run] = []
    backend.set_adapters([])
    for planned in plan.tasks:
        if stop.is_set():
            log.warning(
                "cycle.stop_requested", cycle=cycle_id, remaining=len(plan.tasks) - len(runs)
            )
            return ExecuteRecord(tuple(runs), time.perf_counter() - started, stopped_early=True)
        task = book.by_id(planned.task_id)
        runs.append(run_task(backend, task, task_seed(base_seed, cycle_id, task)))
    return ExecuteRecord(tuple(runs), time.perf_counter() - started)


def ingest_phase(execute: ExecuteRecord) -> IngestRecord:
    # NOTE: the knowledge graph and the embedding memory do not exist yet, so
    # nothing is ingested; the phase reports that instead of pretending.
    return IngestRecord(
        ingesters=(), note="no ingesters configured; answers are kept in state.sqlite"
    )


def score_phase(evaluators: Sequence[Evaluator], execute: ExecuteRecord) -> ScoreRecord:
    scores = [score for evaluator in evaluators for score in evaluator.score(execute.runs)]
    return ScoreRecord(evaluators=tuple(e.name for e in evaluators), scores=tuple(scores))


def decide_phase(plan: PlanRecord, score: ScoreRecord) -> DecideRecord:
    domains = sorted({task.domain for task in plan.tasks})
    reason = "no retraining policy is configured"
    return DecideRecord(
        decisions=tuple(Decision(domain, "keep", reason) for domain in domains),
        policy="none",
    )


def retrain_phase(decide: DecideRecord) -> RetrainRecord:
    wanted = [d.domain for d in decide.decisions if d.action == "retrain"]
    if not wanted:
        return RetrainRecord(trained=(), note="skipped: no domain was marked for retraining")
    raise NotImplementedError(f"retraining requested for {wanted} but no trainer is configured")


# Helpers of the phases


def run_task(backend: Backend, task: Task, seed: int) -> Run:
    params = replace(
        task.sampling, seed=task.sampling.seed if task.sampling.seed is not None else seed
    )
    fields: dict[str, Any] = dict(
        task_id=task.id, domain=task.domain, language=task.language, prompt=task.prompt
    )
    try:
        generation = backend.generate(task.prompt, params)
    except Exception as error:
        log.exception("task.failed", task=task.id)
        memory = backend.memory()
        return Run(
            **fields,
            text="",
            prompt_tokens=0,
            completion_tokens=0,
            wall_seconds=0.0,
            tokens_per_second=0.0,
            finish_reason="error",
            rss_bytes=memory.rss_bytes,
            peak_rss_bytes=memory.peak_rss_bytes,
            error=f"{type(error).__name__}: {error}",
        )
    memory = backend.memory()
    return Run(
        **fields,
        text=generation.text,
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.completion_tokens,
        wall_seconds=generation.wall_seconds,
        tokens_per_second=generation.tokens_per_second,
        finish_reason=generation.finish_reason,
        rss_bytes=memory.rss_bytes,
        peak_rss_bytes=memory.peak_rss_bytes,
    )


def task_seed(base_seed: int, cycle_id: int, task: Task) -> int:
    """Derive a seed that differs per task and cycle but is reproducible from both."""
    digest = hashlib.sha256(f"{base_seed}:{cycle_id}:{task.id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def weighted_sample(tasks: Sequence[Task], count: int, rng: random.Random) -> list[Task]:
    """Pick `count` tasks without replacement, each with odds in proportion to its weight
    (Efraimidis-Spirakis keys), keeping the book's order."""
    keyed = sorted(tasks, key=lambda t: rng.random() ** (1.0 / t.weight), reverse=True)
    chosen = {t.id for t in keyed[:count]}
    return [t for t in tasks if t.id in chosen]


def _is_due(task: Task, last_cycle: int | None, cycle_id: int) -> bool:
    return last_cycle is None or cycle_id - last_cycle >= task.every


def _requested_tasks(book: TaskBook, request: CycleRequest) -> list[Task]:
    if request.task_ids:
        known = {t.id for t in book.tasks}
        missing = [task_id for task_id in request.task_ids if task_id not in known]
        if missing:
            raise KeyError(f"unknown task id(s) {', '.join(missing)}; see `a3x tasks list`")
        return [book.by_id(task_id) for task_id in request.task_ids]
    tasks = [t for t in book.tasks if t.domain == request.domain]
    if not tasks:
        raise KeyError(
            f"no task in domain '{request.domain}'; domains: {', '.join(sorted(book.domains))}"
        )
    return tasks


def cycle_outcome(record: CycleRecord) -> Outcome:
    runs = record.runs
    if record.error is not None:
        return Outcome.FAILED
    if runs and not any(run.ok for run in runs):
        return Outcome.FAILED
    if any(not run.ok for run in runs) or (record.execute and record.execute.stopped_early):
        return Outcome.DEGRADED
    return Outcome.OK


def summarize(record: CycleRecord, outcome: Outcome) -> str:
    runs = record.runs
    if record.error is not None and not runs:
        return f"failed before any task ran: {record.error}"[:200]
    if not runs:
        return "no tasks due"
    tokens = sum(run.completion_tokens for run in runs)
    seconds = sum(run.wall_seconds for run in runs)
    speed = tokens / seconds if seconds else 0.0
    answered = sum(run.ok for run in runs)
    mean_wall = fmean(run.wall_seconds for run in runs)
    return f"{answered}/{len(runs)} answered, {speed:.1f} tok/s, {mean_wall:.2f} s/task"


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# Recovery of cycles that a killed process left unfinished


def recover_unfinished(agent: Agent) -> list[int]:
    """Record every cycle that a previous process left 'running' as aborted.

    The journal is committed before state.sqlite is updated, so a cycle whose
    record is already in the journal finished and only its state row is stale.
    """
    agent.logbook.remove_stale_lock()
    agent.logbook.discard_uncommitted()
    recovered = []
    for row in agent.state.unfinished_cycles():
        committed = agent.logbook.committed_cycle(row.id)
        if committed is not None:
            agent.state.finish_cycle(
                row.id, committed.finished_at, committed.outcome, committed.summary, committed.runs
            )
            log.info("cycle.state_synced", cycle=row.id, outcome=committed.outcome.value)
            continue
        record = CycleRecord(
            cycle=row.id,
            outcome=Outcome.ABORTED,
            started_at=row.started_at,
            finished_at=utc_now(),
            trigger=row.trigger,
            model=agent.model_info.to_json(agent.config.model.backend),
            summary="the process stopped before the cycle finished",
            error="found unfinished at the next start",
        )
        commit = agent.logbook.commit_cycle(record)
        agent.state.finish_cycle(row.id, record.finished_at, Outcome.ABORTED, record.summary, ())
        agent.state.set_journal_commit(row.id, commit)
        log.warning("cycle.aborted_recorded", cycle=row.id, commit=commit[:12])
        recovered.append(row.id)
    return recovered


__all__ = ["Agent", "CycleRequest", "ModelInfo", "recover_unfinished"]
