"""The phases of a cycle. Each reads the previous phase's record and returns its own."""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import structlog

from daemon.records import (
    DecideRecord,
    Decision,
    ExecuteRecord,
    IngestRecord,
    PlannedTask,
    PlanRecord,
    RetrainRecord,
    Run,
    Score,
    ScoreRecord,
)
from daemon.taskbook import Task, TaskBook
from evaluators.base import EvaluationContext, Evaluator
from evaluators.baseline import history_by_series, regressions, with_baselines
from evaluators.consistency import consistency_tasks
from knowledge.extract import Extractor, extract_all
from knowledge.graph import KnowledgeGraph, Provenance
from runtime.backend import Backend

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class CycleRequest:
    """Request for a cycle: every due task by default, or only the named tasks or one domain."""

    trigger: str = "manual"
    task_ids: tuple[str, ...] = ()
    domain: str | None = None


@dataclass(frozen=True)
class SamplingPlan:
    """Extra answers to draw for the consistency check."""

    task_ids: tuple[str, ...] = ()
    samples: int = 0
    temperature: float = 0.7


# plan


def plan_phase(
    book: TaskBook,
    request: CycleRequest,
    last_runs: dict[str, int],
    cycle_id: int,
    max_per_cycle: int,
) -> PlanRecord:
    """Pick the tasks to run: the requested ones, or those due, capped by weight."""
    if request.task_ids or request.domain:
        selected = requested_tasks(book, request)
        scope = (
            f"tasks {', '.join(request.task_ids)}"
            if request.task_ids
            else f"domain {request.domain}"
        )
        reason = f"requested: {scope}"
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


def requested_tasks(book: TaskBook, request: CycleRequest) -> list[Task]:
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


def weighted_sample(tasks: Sequence[Task], count: int, rng: random.Random) -> list[Task]:
    """Pick `count` tasks without replacement, each with odds in proportion to its weight
    (Efraimidis-Spirakis keys), keeping the book's order."""
    keyed = sorted(tasks, key=lambda t: rng.random() ** (1.0 / t.weight), reverse=True)
    chosen = {t.id for t in keyed[:count]}
    return [t for t in tasks if t.id in chosen]


def _is_due(task: Task, last_cycle: int | None, cycle_id: int) -> bool:
    return last_cycle is None or cycle_id - last_cycle >= task.every


# execute


def execute_phase(
    backend: Backend,
    book: TaskBook,
    plan: PlanRecord,
    cycle_id: int,
    base_seed: int,
    stop: threading.Event,
    sampling: SamplingPlan | None = None,
) -> ExecuteRecord:
    """Run each planned task on the model; a failing task is recorded, not raised."""
    started = time.perf_counter()
    runs: list[Run] = []
    backend.set_adapters([])
    for planned in plan.tasks:
        if stop.is_set():
            remaining = len(plan.tasks) - len(runs)
            log.warning("cycle.stop_requested", cycle=cycle_id, remaining=remaining)
            return ExecuteRecord(tuple(runs), time.perf_counter() - started, stopped_early=True)
        task = book.by_id(planned.task_id)
        runs.append(run_task(backend, task, task_seed(base_seed, cycle_id, task)))

    samples = []
    sampling = sampling or SamplingPlan()
    for task_id in sampling.task_ids:
        task = book.by_id(task_id)
        for index in range(1, sampling.samples + 1):
            if stop.is_set():
                break
            params = replace(
                task.sampling,
                temperature=max(task.sampling.temperature, sampling.temperature),
                seed=task_seed(base_seed, cycle_id, task) + index,
            )
            samples.append(run_task(backend, replace(task, sampling=params), None, index))
    return ExecuteRecord(
        tuple(runs),
        time.perf_counter() - started,
        stopped_early=stop.is_set(),
        samples=tuple(samples),
    )


def sampling_plan(
    plan: PlanRecord, cycle_id: int, count: int, samples: int, temperature: float
) -> SamplingPlan:
    chosen = consistency_tasks([t.task_id for t in plan.tasks], count, cycle_id)
    return SamplingPlan(tuple(chosen), samples, temperature)


def run_task(backend: Backend, task: Task, seed: int | None, sample_index: int = 0) -> Run:
    params = (
        task.sampling
        if seed is None or task.sampling.seed is not None
        else replace(task.sampling, seed=seed)
    )
    fields: dict[str, Any] = dict(
        task_id=task.id,
        domain=task.domain,
        language=task.language,
        prompt=task.prompt,
        sample_index=sample_index,
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
        # Stored as UTF-8 in SQLite and Git: lone surrogates become U+FFFD.
        text=generation.text.encode("utf-8", "replace").decode("utf-8"),
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
    return int.from_bytes(digest[:4], "little") & 0x3FFFFFFF


# ingest


def ingest_phase(
    execute: ExecuteRecord,
    cycle_id: int,
    graph: KnowledgeGraph,
    extractors: Sequence[Extractor],
    memory: Any,
    embedder: Any,
    notes: Sequence[str] = (),
    memory_max_answers: int = 0,
) -> IngestRecord:
    """Extract facts from the cycle's answers into the graph and embed them into memory."""
    started = time.perf_counter()
    answered = [run for run in execute.runs if run.ok]
    fact_count = 0
    for run in answered:
        facts = extract_all(extractors, run.text, run.task_id)
        provenance = Provenance(
            run.run_id, cycle_id, run.task_id, run.domain, ",".join(run.adapters)
        )
        fact_count += len(graph.add_facts(provenance, facts))

    embedded = 0
    if memory is not None and embedder is not None:
        ids = [run.run_id for run in answered if run.run_id is not None]
        texts = [run.text for run in answered if run.run_id is not None]
        memory.add(ids, embedder.encode(texts), memory_max_answers)
        memory.save()
        embedded = len(ids)
    names = [e.name for e in extractors] + (["faiss"] if embedded else [])
    note = "; ".join(
        [f"{fact_count} facts from {len(answered)} answers, {embedded} embedded", *notes]
    )
    return IngestRecord(tuple(names), note, fact_count, embedded, time.perf_counter() - started)


# score


def score_phase(
    evaluators: Sequence[Evaluator],
    context: EvaluationContext,
    history_rows: Sequence[Any],
) -> ScoreRecord:
    """Run every enabled evaluator and compare each score with its baseline.

    An evaluator that raises is skipped with a note; the others still score.
    """
    scores: list[Score] = []
    notes: list[str] = []
    for evaluator in evaluators:
        started = time.perf_counter()
        try:
            scores += evaluator.score(context)
        except Exception as error:
            log.exception("evaluator.failed", evaluator=evaluator.name, cycle=context.cycle_id)
            notes.append(f"{evaluator.name} failed: {type(error).__name__}: {error}")
        log.debug(
            "evaluator.done",
            evaluator=evaluator.name,
            seconds=round(time.perf_counter() - started, 3),
        )
    config = context.config
    history = history_by_series(history_rows, context.cycle_id, config.window)
    scores = with_baselines(scores, history, config.spread_k, config.min_relative_spread)
    return ScoreRecord(tuple(e.name for e in evaluators), tuple(scores), tuple(notes))


# decide and retrain


def decide_phase(plan: PlanRecord, score: ScoreRecord) -> DecideRecord:
    domains = sorted({task.domain for task in plan.tasks})
    worse = regressions(score.scores)
    decisions = []
    for domain in domains:
        reason = "no retraining policy is configured"
        fallen = [s for s in worse if s.domain == domain]
        if fallen:
            listed = ", ".join(
                f"{s.evaluator}.{s.name} {s.value:.3g} (baseline {(s.baseline or {})['mean']:.3g})"
                for s in fallen
            )
            reason += f"; regressed beyond noise: {listed}"
        decisions.append(Decision(domain, "keep", reason))
    return DecideRecord(decisions=tuple(decisions), policy="none")


def retrain_phase(decide: DecideRecord) -> RetrainRecord:
    wanted = [d.domain for d in decide.decisions if d.action == "retrain"]
    if not wanted:
        return RetrainRecord(trained=(), note="skipped: no domain was marked for retraining")
    raise NotImplementedError(f"retraining requested for {wanted} but no trainer is configured")
