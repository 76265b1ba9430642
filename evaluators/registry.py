"""Evaluators by name, as `[score] enabled` lists them."""

from __future__ import annotations

from collections.abc import Callable

from daemon.config import ScoreConfig
from evaluators.base import Evaluator
from evaluators.coherence import CoherenceEvaluator
from evaluators.consistency import ConsistencyEvaluator
from evaluators.diversity import DiversityEvaluator
from evaluators.efficiency import EfficiencyEvaluator
from evaluators.execution import ExecutionEvaluator
from evaluators.perplexity import PerplexityEvaluator

EVALUATORS: dict[str, Callable[[ScoreConfig], Evaluator]] = {
    "execution": lambda config: ExecutionEvaluator(config.repetition_distinct_min),
    "coherence": lambda config: CoherenceEvaluator(),
    "diversity": lambda config: DiversityEvaluator(),
    "efficiency": lambda config: EfficiencyEvaluator(),
    "consistency": lambda config: ConsistencyEvaluator(),
    "perplexity": lambda config: PerplexityEvaluator(),
}
NEEDS_EMBEDDINGS = {"diversity", "consistency"}


def build_evaluators(config: ScoreConfig) -> list[Evaluator]:
    return [EVALUATORS[name](config) for name in config.enabled]
