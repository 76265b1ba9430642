"""One A3X cycle: plan, execute, ingest, score, decide, retrain, record.

`Agent` keeps what lives across cycles (configuration, task book, state,
journal, the loaded model and embedder). `Agent.run_cycle` is the recipe.
The phase functions live in `daemon.phases`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING, Any

import structlog

from daemon.config import Config
from daemon.home import CycleLock, Home, prepare_home
from daemon.phases import (
    CycleRequest,
    decide_phase,
    execute_phase,
    ingest_phase,
    plan_phase,
    requested_tasks,
    retrain_phase,
    sampling_plan,
    score_phase,
)
from daemon.records import CycleRecord, Outcome, Run
from daemon.retraining import retrain_inputs, round_settings
from daemon.state import StateStore
from daemon.taskbook import load_books
from evaluators.base import EvaluationContext
from evaluators.registry import NEEDS_EMBEDDINGS, build_evaluators
from journal.logbook import Logbook
from journal.plots import write_plots
from knowledge.extract import Extractor, ModelExtractor, PatternExtractor
from knowledge.graph import KnowledgeGraph
from lora import LoraError
from lora.registry import Adapter, AdapterRegistry, base_mismatch, configured_base
from runtime.backend import ActiveAdapter, Backend
from runtime.loader import ModelInfo, describe_model, open_backend

if TYPE_CHECKING:
    from lora.router import Policy, Router

log = structlog.get_logger(__name__)

MEMORY_FILE = "memory.faiss"
PARTIAL_CYCLE = {"verdict": "not compared", "reason": "partial cycle"}


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
        self.graph = KnowledgeGraph(self.state.connection)
        self.evaluators = build_evaluators(config.score)
        self.registry = AdapterRegistry(self.home.adapters_path)
        self._backend_factory = backend_factory
        self._backend: Backend | None = None
        self._embedder: Any = None
        self._memory: Any = None
        self._memory_notes: list[str] = []

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

    @property
    def uses_embeddings(self) -> bool:
        return bool(NEEDS_EMBEDDINGS & set(self.config.score.enabled))

    def embedder(self) -> Any:
        """Return the MiniLM embedder, loaded on first use, or None when no evaluator needs it."""
        if self._embedder is None and self.uses_embeddings:
            from knowledge.embed import shared_embedder

            started = time.perf_counter()
            self._embedder = shared_embedder()
            log.info("embedder.loaded", seconds=round(time.perf_counter() - started, 2))
        return self._embedder

    def memory(self) -> Any:
        """Return the FAISS answer memory. A corrupt file is moved aside and rebuilt from state."""
        if self._memory is None and self.uses_embeddings:
            from knowledge.memory import AnswerMemory

            embedder = self.embedder()
            path = self.home.root / MEMORY_FILE
            self._memory, note = AnswerMemory.open_or_quarantine(path, embedder.dimension)
            if note is not None:
                self._memory_notes.append(note)
                self._rebuild_memory()
        return self._memory

    def _rebuild_memory(self) -> None:
        rows = [row for row in self.state.runs_since(1) if row["text"].strip()]
        if rows:
            vectors = self.embedder().encode([row["text"] for row in rows])
            self._memory.add(
                [row["id"] for row in rows], vectors, self.config.knowledge.memory_max_answers
            )
        self._memory.save()
        self._memory_notes.append(f"memory rebuilt from {len(rows)} stored answers")
        log.warning("memory.rebuilt", answers=len(rows))

    def extractors(self) -> list[Extractor]:
        extractors: list[Extractor] = [PatternExtractor()]
        if self.config.knowledge.model_extraction:
            extractors.append(ModelExtractor(self.backend))
        return extractors

    def reload_book(self) -> None:
        self.book = load_books(self.config.tasks.books)

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None
        self.state.close()

    def serving_adapters(self) -> dict[str, Adapter]:
        """Return the serving adapter of each domain that has one, leaving out adapters
        trained on another base than the configured model."""
        base = configured_base(self.model_info)
        serving = {}
        for domain in self.book.domains:
            adapter = self.registry.serving(domain)
            if adapter is None:
                continue
            try:
                problem = base_mismatch(adapter, base) if base is not None else None
            except LoraError as error:
                problem = str(error)
            if problem:
                log.warning("adapter.not_served", adapter=adapter.name, problem=problem)
                continue
            serving[domain] = adapter
        return serving

    def adapter_path(self, adapter: Adapter) -> Path:
        """Return the file the backend loads: the PEFT folder for transformers, else GGUF."""
        if self.config.model.backend == "transformers":
            return adapter.peft_folder
        return adapter.gguf_path

    def active_adapter(self, adapter: Adapter) -> ActiveAdapter:
        """Return how the backend applies a serving version: its file, at scale 1, with
        the per-layer scales stored in its record (`a3x adapters layers`)."""
        try:
            layers = adapter.layer_scales
        except LoraError as error:  # a hand-edited record; the owner sees it in the log
            log.error("adapters.layer_scales_invalid", adapter=adapter.name, error=str(error))
            layers = None
        return ActiveAdapter(self.adapter_path(adapter), 1.0, layers=layers)

    def router(self, serving: dict[str, Adapter]) -> Router:
        """Build the prompt router over the serving adapters' profiles. An adapter whose
        profile cannot be built is left out of routing, with an error in the log."""
        from knowledge.embed import routing_embedder
        from lora.router import Router, RouterSettings, book_groups, ensure_profile

        embedder = routing_embedder()

        def groups(domain: str) -> list[list[str]]:
            tasks = [task for task in self.book.tasks if task.domain == domain]
            return book_groups(tasks, self.book.domains[domain].reference_corpus)

        profiles = []
        for adapter in serving.values():
            try:
                profiles.append(ensure_profile(adapter, embedder, groups))
            except LoraError as error:
                log.error("routing.profile_failed", adapter=adapter.name, error=str(error))
        routing = self.config.routing
        settings = RouterSettings(routing.top_k, routing.floor, routing.temperature)
        policy = None
        if routing.specialize:
            policy = specialization_policy(self.registry, list(serving.values()))
        return Router(profiles, embedder, settings, policy)

    def retrain(
        self, domain: str, reason: str, cycle_id: int, stop: threading.Event, poison: str = ""
    ) -> dict[str, Any]:
        """Run one retraining round for a domain and return its result as JSON."""
        from lora.retrain import run_round

        inputs = retrain_inputs(self, domain, reason, cycle_id, poison)
        result = run_round(inputs, round_settings(self.config), self.registry, self.backend, stop)
        return result.to_json()

    def run_cycle(
        self,
        request: CycleRequest | None = None,
        stop: threading.Event | None = None,
        on_started: Callable[[int], None] | None = None,
    ) -> CycleRecord:
        """Run one cycle under the cycle lock and commit its record to the journal.

        `on_started` gets the cycle id as soon as the cycle is numbered.
        """
        request = request or CycleRequest()
        stop = stop or threading.Event()
        if request.task_ids or request.domain:
            requested_tasks(self.book, request)  # a bad request raises before any record
        unknown = [d for d in request.retrain if d not in self.book.domains]
        if unknown:
            raise KeyError(
                f"unknown domain {', '.join(unknown)} to retrain; known: "
                f"{', '.join(sorted(self.book.domains))}"
            )
        with CycleLock(self.home.lock_path):
            recover_unfinished(self)
            started_at = utc_now()
            cycle_id = self.state.begin_cycle(started_at, request.trigger)
            log.info("cycle.started", cycle=cycle_id, trigger=request.trigger)
            if on_started is not None:
                on_started(cycle_id)
            record = self._run_phases(cycle_id, started_at, request, stop)
            record = self._record(record)
        log.info(
            "cycle.finished", cycle=cycle_id, outcome=record.outcome.value, summary=record.summary
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
        score_config = self.config.score
        timer = PhaseTimer()
        try:
            with timer("plan"):
                serving = self.serving_adapters()
                plan = plan_phase(
                    self.book,
                    request,
                    self.state.last_run_cycles(),
                    cycle_id,
                    self.config.tasks.max_per_cycle,
                    {domain: adapter.name for domain, adapter in serving.items()},
                    self.router(serving) if self.config.routing.enabled else None,
                )
                planned = {name for task in plan.tasks for name in task.adapters}
                layered = {
                    adapter.name: self.active_adapter(adapter).layers
                    for adapter in serving.values()
                    if adapter.name in planned
                }
                plan = replace(
                    plan,
                    layer_scales={
                        name: scales.to_json()
                        for name, scales in layered.items()
                        if scales is not None
                    },
                )
            record = replace(record, plan=plan)

            with timer("execute"):
                # Pinned versions stay loaded across cycles (`a3x adapters pin`).
                self.backend.pin_adapters(
                    [self.active_adapter(a) for a in serving.values() if a.pinned]
                )
                sampling = sampling_plan(
                    plan,
                    cycle_id,
                    score_config.consistency_tasks if "consistency" in score_config.enabled else 0,
                    score_config.consistency_samples,
                    score_config.consistency_temperature,
                )
                execute = execute_phase(
                    self.backend,
                    self.book,
                    plan,
                    cycle_id,
                    self.config.model.seed,
                    stop,
                    sampling,
                    {adapter.name: self.active_adapter(adapter) for adapter in serving.values()},
                )
                execute = self._store_runs(cycle_id, execute)
            record = replace(record, execute=execute)

            # ingest: facts into the graph, answer embeddings into the FAISS memory
            with timer("ingest"):
                memory, embedder = self.memory(), self.embedder()
                notes, self._memory_notes = self._memory_notes, []
                ingest = ingest_phase(
                    execute,
                    cycle_id,
                    self.graph,
                    self.extractors(),
                    memory,
                    embedder,
                    notes,
                    self.config.knowledge.memory_max_answers,
                )
            record = replace(record, ingest=ingest)

            with timer("score"):
                context = EvaluationContext(
                    cycle_id=cycle_id,
                    runs=execute.runs,
                    config=score_config,
                    state=self.state,
                    graph=self.graph,
                    memory=memory,
                    embedder=embedder,
                    backend=self.backend,
                    domains=self.book.domains,
                    samples=execute.samples,
                )
                # Rotating series get a value every few cycles: read far enough back.
                history = self.state.score_series(last_cycles=score_config.window * 10)
                score = score_phase(self.evaluators, context, history)
                partial = bool(request.task_ids or request.domain or execute.stopped_early)
                if partial:
                    # A cycle of some tasks is not comparable with full cycles: it gets
                    # no verdicts and its scores stay out of the baselines.
                    score = replace(
                        score,
                        scores=tuple(
                            s if s.task_id else replace(s, baseline=PARTIAL_CYCLE)
                            for s in score.scores
                        ),
                    )
                self.state.add_scores(
                    cycle_id, [s for s in score.scores if s.task_id or not partial]
                )

            with timer("decide"):
                decide, decision_rows = decide_phase(
                    plan,
                    score,
                    self.config.retrain,
                    lambda domain: self.state.decision_history(domain, cycle_id),
                    request.retrain,
                    comparable=not partial,
                )
                self.state.add_decisions(cycle_id, decision_rows)
            record = replace(record, score=score, decide=decide)

            with timer("retrain"):
                retrain = retrain_phase(
                    decide,
                    lambda domain, reason: self.retrain(
                        domain, reason, cycle_id, stop, request.poison
                    ),
                )
            record = replace(record, retrain=retrain)
        except Exception as error:  # a failed cycle is recorded, never lost
            log.exception("cycle.phase_failed", cycle=cycle_id)
            record = replace(record, error=f"{type(error).__name__}: {error}")
        record = replace(record, phase_seconds=timer.seconds)
        outcome = cycle_outcome(record)
        return replace(
            record, outcome=outcome, finished_at=utc_now(), summary=summarize(record, outcome)
        )

    def _store_runs(self, cycle_id: int, execute: Any) -> Any:
        """Store the runs in state.sqlite so that facts and embeddings can point at them."""
        everything = (*execute.runs, *execute.samples)
        ids = self.state.add_runs(cycle_id, everything)
        numbered = [
            replace(run, run_id=run_id) for run, run_id in zip(everything, ids, strict=True)
        ]
        count = len(execute.runs)
        return replace(execute, runs=tuple(numbered[:count]), samples=tuple(numbered[count:]))

    def _record(self, record: CycleRecord) -> CycleRecord:
        """Write plots, commit the record to the journal, then finish the state row."""
        try:
            write_plots(self.state, self.logbook.path / "plots")
        except Exception:  # a plot is never worth a lost record
            log.exception("journal.plots_failed", cycle=record.cycle)
        commit = self.logbook.commit_cycle(record)
        for result in record.retrain.rounds if record.retrain else ():
            commit = self.logbook.commit_decision(result)
        self.state.finish_cycle(
            record.cycle, record.finished_at, record.outcome, record.summary, commit
        )
        return record


class PhaseTimer:
    """Wall time of named phases, in seconds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = round(time.perf_counter() - started, 3)


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
    planned = len(record.plan.tasks) if record.plan else len(runs)
    parts = [f"{answered}/{planned} answered"]
    if record.execute and record.execute.stopped_early:
        parts[0] += " (stopped early)"
    coherence = _cycle_score(record, "coherence", "coherence")
    if coherence is not None:
        parts.append(f"coherence {coherence}")
    parts.append(f"{speed:.1f} tok/s")
    if record.execute and not record.score:
        parts.append(f"{fmean(run.wall_seconds for run in runs):.2f} s/task")
    return ", ".join(parts)


def _cycle_score(record: CycleRecord, evaluator: str, name: str) -> str | None:
    if record.score is None:
        return None
    for score in record.score.scores:
        if (
            score.evaluator == evaluator
            and score.name == name
            and score.domain is None
            and score.task_id is None
        ):
            change = (score.baseline or {}).get("change")
            suffix = f" ({change:+.2f})" if change is not None else ""
            return f"{score.value:.2f}{suffix}"
    return None


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


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
            if agent.state.run_count(row.id) == 0:
                agent.state.add_runs(row.id, _all_runs(committed))
            agent.state.finish_cycle(
                row.id,
                committed.finished_at,
                committed.outcome,
                committed.summary,
                agent.logbook.commit_of_cycle(row.id),
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
        agent.state.finish_cycle(
            row.id, record.finished_at, Outcome.ABORTED, record.summary, commit
        )
        log.warning("cycle.aborted_recorded", cycle=row.id, commit=commit[:12])
        recovered.append(row.id)
    _fail_interrupted_candidates(agent.registry)
    return recovered


def _fail_interrupted_candidates(registry: AdapterRegistry) -> None:
    """Mark as failed every candidate left by a retraining round that a stopped process
    interrupted. Rounds run only inside a cycle, under the cycle lock that the caller
    holds, so no candidate can belong to a round still running."""
    from lora.registry import AdapterStatus

    for adapter in registry.all():
        if adapter.status is AdapterStatus.CANDIDATE:
            message = "the retraining round was interrupted: the process stopped before the gate"
            registry.set_status(adapter, AdapterStatus.FAILED, error=message)
            log.warning("retrain.candidate_interrupted", adapter=adapter.name)


def specialization_policy(registry: AdapterRegistry, adapters: list[Adapter]) -> Policy:
    """Return the router's policy: an adapter serves a domain only where it beats the base."""
    from lora.specialize import SpecializationPolicy

    judge = SpecializationPolicy(registry, {adapter.name: adapter for adapter in adapters}).judge

    def allows(name: str, domain: str) -> tuple[bool, str]:
        verdict = judge(name, domain)
        return verdict.beats_base, verdict.reason

    return allows


def _all_runs(record: CycleRecord) -> tuple[Run, ...]:
    samples = record.execute.samples if record.execute else ()
    return (*record.runs, *samples)


__all__ = ["Agent", "CycleRequest", "ModelInfo", "recover_unfinished"]
