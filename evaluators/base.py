"""The Evaluator protocol and what every evaluator may read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from daemon.records import Run, Score

if TYPE_CHECKING:
    from daemon.config import ScoreConfig
    from daemon.state import StateStore
    from daemon.taskbook import Domain
    from knowledge.embed import Embedder
    from knowledge.graph import KnowledgeGraph
    from knowledge.memory import AnswerMemory
    from runtime.backend import Backend


@dataclass
class EvaluationContext:
    """The current cycle's answers and the stores that hold the history."""

    cycle_id: int
    runs: tuple[Run, ...]  # the cycle's answers, with run ids
    config: ScoreConfig
    state: StateStore | None = None
    graph: KnowledgeGraph | None = None
    memory: AnswerMemory | None = None
    embedder: Embedder | None = None
    backend: Backend | None = None
    domains: dict[str, Domain] = field(default_factory=dict)
    samples: tuple[Run, ...] = ()  # extra answers to the same tasks


class Evaluator(Protocol):
    name: str

    def score(self, context: EvaluationContext) -> list[Score]:
        """Return scores per task, per domain (domain set) and for the cycle (domain None)."""
        ...
