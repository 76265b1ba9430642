"""The core nouns of a cycle as plain, serializable records.

Every phase of a cycle returns one of these. A `CycleRecord` is what the
journal stores as JSON; it carries `schema_version`, and readers reject a
version they do not know.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

CYCLE_SCHEMA_VERSION = 1


class Outcome(enum.StrEnum):
    OK = "ok"  # every task produced a non-empty answer
    DEGRADED = "degraded"  # some tasks failed or gave empty answers
    FAILED = "failed"  # a phase raised, or no task produced an answer
    ABORTED = "aborted"  # the process stopped before the cycle finished


class RecordVersionError(Exception):
    """A persisted record has a schema version this code does not read."""


@dataclass(frozen=True)
class PlannedTask:
    task_id: str
    domain: str
    adapters: tuple[str, ...] = ()  # empty: the base model answers
    scales: tuple[float, ...] = ()  # one per adapter; empty: 1.0 each
    routing: dict[str, Any] | None = None  # lora.router.RoutingDecision.to_json(), if routed


@dataclass(frozen=True)
class PlanRecord:
    tasks: tuple[PlannedTask, ...]
    skipped_not_due: int
    reason: str
    # Per-layer scales of the planned adapters that have them (lora/layers.py JSON).
    layer_scales: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Run:
    """One execution of a task on the runtime."""

    task_id: str
    domain: str
    language: str
    prompt: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    wall_seconds: float
    tokens_per_second: float
    finish_reason: str
    rss_bytes: int
    peak_rss_bytes: int
    adapters: tuple[str, ...] = ()
    sample_index: int = 0  # 0: the task's answer; 1..N: extra samples for consistency
    error: str | None = None
    run_id: int | None = None  # runs.id in state.sqlite, once stored
    routing: dict[str, Any] | None = None  # the routing decision that chose `adapters`

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.text.strip())

    @classmethod
    def of_text(cls, task_id: str, domain: str, text: str, **fields: Any) -> Run:
        """Build a run for text that no model produced (fixtures, validation sets);
        the cost fields are zero unless given."""
        defaults: dict[str, Any] = dict(
            language="en",
            prompt="",
            prompt_tokens=0,
            completion_tokens=0,
            wall_seconds=0.0,
            tokens_per_second=0.0,
            finish_reason="stop",
            rss_bytes=0,
            peak_rss_bytes=0,
        )
        return cls(task_id=task_id, domain=domain, text=text, **{**defaults, **fields})


@dataclass(frozen=True)
class ExecuteRecord:
    runs: tuple[Run, ...]
    wall_seconds: float
    stopped_early: bool = False
    samples: tuple[Run, ...] = ()  # extra answers to the same tasks, for consistency


@dataclass(frozen=True)
class IngestRecord:
    ingesters: tuple[str, ...]
    note: str
    facts: int = 0
    embedded: int = 0
    wall_seconds: float = 0.0


@dataclass(frozen=True)
class Score:
    """A named measurement with its unit, for one task, one domain or the cycle."""

    name: str
    value: float
    unit: str
    evaluator: str
    task_id: str | None = None
    domain: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    higher_is_better: bool | None = None  # None: a measurement with no good direction
    # False for scores whose successive values measure different things (a rotating
    # sample of tasks, a trend that carries its own significance test).
    compare: bool = True
    baseline: dict[str, Any] | None = None  # filled by the score phase, see evaluators.baseline


@dataclass(frozen=True)
class ScoreRecord:
    evaluators: tuple[str, ...]
    scores: tuple[Score, ...]
    notes: tuple[str, ...] = ()  # evaluator errors and skipped evaluators, one line each


@dataclass(frozen=True)
class Decision:
    domain: str
    action: str  # "keep", "retrain", "accept", "reject"
    reason: str


@dataclass(frozen=True)
class DecideRecord:
    decisions: tuple[Decision, ...]
    policy: str


@dataclass(frozen=True)
class RetrainRecord:
    trained: tuple[str, ...]
    note: str
    rounds: tuple[dict[str, Any], ...] = ()  # lora.retrain.RoundResult.to_json() of each round


@dataclass(frozen=True)
class CycleRecord:
    cycle: int
    outcome: Outcome
    started_at: str  # ISO 8601, UTC
    finished_at: str
    trigger: str  # "schedule", "manual", "startup"
    model: dict[str, Any]
    summary: str
    plan: PlanRecord | None = None
    execute: ExecuteRecord | None = None
    ingest: IngestRecord | None = None
    score: ScoreRecord | None = None
    decide: DecideRecord | None = None
    retrain: RetrainRecord | None = None
    error: str | None = None
    phase_seconds: dict[str, float] = field(default_factory=dict)  # wall time of each phase
    schema_version: int = CYCLE_SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def runs(self) -> tuple[Run, ...]:
        return self.execute.runs if self.execute else ()


def cycle_from_json(data: dict[str, Any]) -> CycleRecord:
    """Rebuild a CycleRecord from its JSON form, checking the schema version."""
    version = data.get("schema_version")
    if version != CYCLE_SCHEMA_VERSION:
        raise RecordVersionError(
            f"cycle record {data.get('cycle')!r} has schema_version {version!r}; this A3X "
            f"reads version {CYCLE_SCHEMA_VERSION}. Upgrade A3X to read newer journals."
        )
    plan = data.get("plan")
    execute = data.get("execute")
    score = data.get("score")
    decide = data.get("decide")
    return CycleRecord(
        cycle=data["cycle"],
        outcome=Outcome(data["outcome"]),
        started_at=data["started_at"],
        finished_at=data["finished_at"],
        trigger=data["trigger"],
        model=data["model"],
        summary=data["summary"],
        plan=_plan_from_json(plan) if plan else None,
        execute=_execute_from_json(execute) if execute else None,
        ingest=IngestRecord(**{**data["ingest"], "ingesters": tuple(data["ingest"]["ingesters"])})
        if data.get("ingest")
        else None,
        score=ScoreRecord(
            tuple(score["evaluators"]),
            tuple(Score(**s) for s in score["scores"]),
            tuple(score.get("notes", ())),
        )
        if score
        else None,
        decide=DecideRecord(tuple(Decision(**d) for d in decide["decisions"]), decide["policy"])
        if decide
        else None,
        retrain=RetrainRecord(
            tuple(data["retrain"]["trained"]),
            data["retrain"]["note"],
            tuple(data["retrain"].get("rounds", ())),
        )
        if data.get("retrain")
        else None,
        error=data.get("error"),
        phase_seconds=data.get("phase_seconds", {}),
    )


def _plan_from_json(plan: dict[str, Any]) -> PlanRecord:
    tasks = tuple(
        PlannedTask(
            t["task_id"],
            t["domain"],
            tuple(t["adapters"]),
            tuple(t.get("scales", ())),
            t.get("routing"),
        )
        for t in plan["tasks"]
    )
    return PlanRecord(tasks, plan["skipped_not_due"], plan["reason"], plan.get("layer_scales", {}))


def _execute_from_json(execute: dict[str, Any]) -> ExecuteRecord:
    def runs(key: str) -> tuple[Run, ...]:
        return tuple(
            Run(**{**run, "adapters": tuple(run["adapters"])}) for run in execute.get(key, ())
        )

    return ExecuteRecord(
        runs("runs"), execute["wall_seconds"], execute.get("stopped_early", False), runs("samples")
    )
