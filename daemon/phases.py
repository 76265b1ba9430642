"""The phases of a cycle. Each reads the previous phase's record and returns its own."""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from daemon.config import RetrainConfig
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
from daemon.state import DecisionRow
from daemon.taskbook import Task, TaskBook
from evaluators.base import EvaluationContext, Evaluator
from evaluators.baseline import history_by_series, regressions, with_baselines
from evaluators.consistency import consistency_tasks
from knowledge.extract import Extractor, extract_all
from knowledge.graph import KnowledgeGraph, Provenance
from runtime.backend import ActiveAdapter, Backend

if TYPE_CHECKING:
    from lora.router import Router

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class CycleRequest:
    """Request for a cycle: every due task by default, or only the named tasks or one domain."""

    trigger: str = "manual"
    task_ids: tuple[str, ...] = ()
    domain: str | None = None
    retrain: tuple[str, ...] = ()  # domains to retrain in this cycle, whatever the scores
    # Negative controls for the retraining proof ("shuffle" or "contradict" the
    # training data); not offered on the command line.
    poison: str = ""


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
    serving: dict[str, str] | None = None,
    router: Router | None = None,
) -> PlanRecord:
    """Pick the tasks to run: the requested ones, or those due, capped by weight.

    `serving` maps a domain to the adapter that answers its tasks (default: the base).
    With a `router`, each task's adapters and their scales come from routing its
    prompt instead, and the routing decision is kept with the planned task.
    """
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
    if router is not None:
        planned = routed_tasks(selected, router)
        reason += ", adapters by routing"
    else:
        serving = serving or {}
        planned = tuple(
            PlannedTask(
                task.id, task.domain, (serving[task.domain],) if task.domain in serving else ()
            )
            for task in selected
        )
    return PlanRecord(tasks=planned, skipped_not_due=not_due, reason=reason)


def routed_tasks(tasks: Sequence[Task], router: Router) -> tuple[PlannedTask, ...]:
    decisions = router.route_many([t.prompt for t in tasks], [t.domain for t in tasks])
    return tuple(
        PlannedTask(task.id, task.domain, decision.names, decision.scales, decision.to_json())
        for task, decision in zip(tasks, decisions, strict=True)
    )


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
    adapters: dict[str, ActiveAdapter] | None = None,
) -> ExecuteRecord:
    """Run each planned task on the model, with its planned adapters (by name, found
    in `adapters`, whose scale the plan sets); a failing task is recorded, not raised."""
    started = time.perf_counter()
    runs: list[Run] = []
    by_name = adapters or {}
    by_task = {planned.task_id: planned for planned in plan.tasks}
    backend.set_adapters([])
    prefetch_planned(backend, plan, by_name)
    for planned in plan.tasks:
        if stop.is_set():
            remaining = len(plan.tasks) - len(runs)
            log.warning("cycle.stop_requested", cycle=cycle_id, remaining=remaining)
            return ExecuteRecord(tuple(runs), time.perf_counter() - started, stopped_early=True)
        task = book.by_id(planned.task_id)
        runs.append(
            run_planned(backend, task, planned, by_name, task_seed(base_seed, cycle_id, task))
        )

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
            planned = by_task.get(task_id, PlannedTask(task_id, task.domain))
            sampled = replace(task, sampling=params)
            samples.append(run_planned(backend, sampled, planned, by_name, None, index))
    backend.set_adapters([])
    return ExecuteRecord(
        tuple(runs),
        time.perf_counter() - started,
        stopped_early=stop.is_set(),
        samples=tuple(samples),
    )


def prefetch_planned(
    backend: Backend, plan: PlanRecord, adapters: dict[str, ActiveAdapter]
) -> list[Path]:
    """Load the adapters the plan uses, in the order of first use, before the first
    task; return the files loaded. A switch between tasks then finds them in memory."""
    names = dict.fromkeys(name for planned in plan.tasks for name in planned.adapters)
    to_load = [adapters[name] for name in names]
    if not to_load:
        return []
    try:
        loaded = backend.prefetch_adapters(to_load)
    except Exception as error:  # a hint only: each task applies its adapters itself
        log.warning("adapters.prefetch_failed", error=f"{type(error).__name__}: {error}")
        return []
    log.info("adapters.prefetched", planned=len(to_load), loaded=len(loaded))
    return loaded


def active_adapters(
    planned: PlannedTask, adapters: dict[str, ActiveAdapter]
) -> list[ActiveAdapter]:
    """Return the planned adapters with their scales (1.0 each unless routed)."""
    scales = planned.scales or (1.0,) * len(planned.adapters)
    return [
        replace(adapters[name], scale=scale)
        for name, scale in zip(planned.adapters, scales, strict=True)
    ]


def sampling_plan(
    plan: PlanRecord, cycle_id: int, count: int, samples: int, temperature: float
) -> SamplingPlan:
    chosen = consistency_tasks([t.task_id for t in plan.tasks], count, cycle_id)
    return SamplingPlan(tuple(chosen), samples, temperature)


def run_planned(
    backend: Backend,
    task: Task,
    planned: PlannedTask,
    adapters: dict[str, ActiveAdapter],
    seed: int | None,
    sample_index: int = 0,
) -> Run:
    """Apply the planned adapters and run the task. Adapters that cannot be applied (a
    bad file, over the adapter budget) fail this run, not the cycle."""
    try:
        backend.set_adapters(active_adapters(planned, adapters))
    except Exception as error:
        names = ", ".join(planned.adapters)
        log.error("task.adapters_failed", task=task.id, adapters=names, error=str(error))
        message = f"adapters {names} could not be applied: {type(error).__name__}: {error}"
        run = failed_run(backend, task, sample_index, message)
    else:
        run = run_task(backend, task, seed, sample_index)
    return replace(run, adapters=planned.adapters, routing=planned.routing)


def run_task(backend: Backend, task: Task, seed: int | None, sample_index: int = 0) -> Run:
    params = (
        task.sampling
        if seed is None or task.sampling.seed is not None
        else replace(task.sampling, seed=seed)
    )
    try:
        generation = backend.generate(task.prompt, params)
    except Exception as error:
        log.exception("task.failed", task=task.id)
        return failed_run(backend, task, sample_index, f"{type(error).__name__}: {error}")
    memory = backend.memory()
    return Run(
        **_run_fields(task, sample_index),
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


def failed_run(backend: Backend, task: Task, sample_index: int, error: str) -> Run:
    """Return the run of a task that failed, with its error and no text."""
    memory = backend.memory()
    return Run(
        **_run_fields(task, sample_index),
        text="",
        prompt_tokens=0,
        completion_tokens=0,
        wall_seconds=0.0,
        tokens_per_second=0.0,
        finish_reason="error",
        rss_bytes=memory.rss_bytes,
        peak_rss_bytes=memory.peak_rss_bytes,
        error=error,
    )


def _run_fields(task: Task, sample_index: int) -> dict[str, Any]:
    return dict(
        task_id=task.id,
        domain=task.domain,
        language=task.language,
        prompt=task.prompt,
        sample_index=sample_index,
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


def decide_phase(
    plan: PlanRecord,
    score: ScoreRecord,
    policy: RetrainConfig,
    history: Callable[[str], Sequence[DecisionRow]],
    requested: Sequence[str] = (),
    comparable: bool = True,
) -> tuple[DecideRecord, list[DecisionRow]]:
    """Decide per domain: keep, or retrain with the reason; at most one domain trains.

    `history(domain)` returns the domain's earlier decisions, newest first.
    Priority: an owner's request, then M consecutive regressed cycles, then the schedule.
    """
    domains = sorted({task.domain for task in plan.tasks} | set(requested))
    worse = regressions(score.scores) if comparable else []
    rows: list[DecisionRow] = []
    wanted: list[tuple[int, str, str]] = []  # (priority, domain, reason)
    for domain in domains:
        fallen = [s for s in worse if s.domain == domain]
        reason = _retrain_reason(domain, fallen, policy, history(domain), requested)
        if reason is not None:
            wanted.append((reason[0], domain, reason[1]))
        rows.append(DecisionRow(domain, "keep", bool(fallen), comparable, _keep_reason(fallen)))

    chosen = min(wanted) if wanted else None
    decisions = []
    for index, row in enumerate(rows):
        if chosen is not None and row.domain == chosen[1]:
            rows[index] = replace(row, action="retrain", reason=chosen[2])
        elif any(row.domain == w[1] for w in wanted):
            rows[index] = replace(
                row, reason=f"{row.reason}; deferred: {chosen[1] if chosen else ''} trains first"
            )
        decisions.append(Decision(row.domain, rows[index].action, rows[index].reason))
    described = (
        f"retrain after {policy.regressed_cycles} regressed cycles"
        + (f", every {policy.every_cycles} cycles" if policy.every_cycles else "")
        if policy.enabled
        else "retraining disabled; only requests train"
    )
    return DecideRecord(decisions=tuple(decisions), policy=described), rows


def _retrain_reason(
    domain: str,
    fallen: Sequence[Score],
    policy: RetrainConfig,
    history: Sequence[DecisionRow],
    requested: Sequence[str],
) -> tuple[int, str] | None:
    if domain in requested:
        return 0, "requested by the owner"
    if not policy.enabled:
        return None
    if fallen:
        streak = 1
        for row in history:
            if row.action == "retrain" or (row.comparable and not row.regressed):
                break
            streak += row.comparable
        if streak >= policy.regressed_cycles:
            return 1, (f"regressed beyond noise in {streak} consecutive cycles: {_listed(fallen)}")
    if policy.every_cycles:
        since = next((i for i, row in enumerate(history) if row.action == "retrain"), None)
        cycles = len(history) + 1 if since is None else since + 1
        if cycles >= policy.every_cycles:
            return 2, f"scheduled: every {policy.every_cycles} cycles"
    return None


def _keep_reason(fallen: Sequence[Score]) -> str:
    if not fallen:
        return "no score regressed beyond noise"
    return f"regressed beyond noise: {_listed(fallen)}"


def _listed(scores: Sequence[Score]) -> str:
    return ", ".join(
        f"{s.evaluator}.{s.name} {s.value:.3g} (baseline {(s.baseline or {})['mean']:.3g})"
        for s in scores
    )


def retrain_phase(
    decide: DecideRecord, train: Callable[[str, str], dict[str, Any]]
) -> RetrainRecord:
    """Run the retraining round of the domain marked for it (at most one)."""
    wanted = [d for d in decide.decisions if d.action == "retrain"]
    if not wanted:
        return RetrainRecord(trained=(), note="skipped: no domain was marked for retraining")
    decision = wanted[0]
    result = train(decision.domain, decision.reason)
    note = f"{decision.domain}: {result['outcome']}: {result['message']}"
    return RetrainRecord(trained=(decision.domain,), note=note, rounds=(result,))
