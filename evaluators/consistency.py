"""Consistency: agreement between several sampled answers to the same task.

In the spirit of SelfCheckGPT, a model that knows an answer gives similar
answers when sampled again, and one that guesses scatters. The execute phase
samples extra answers for a few tasks per cycle; agreement is the mean
pairwise cosine similarity of the answer embeddings (1 for identical
answers). An empty answer agrees with another empty answer (1) and with
nothing else (0).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from itertools import combinations
from statistics import fmean

import numpy as np

from daemon.records import Run, Score
from evaluators.base import EvaluationContext


def agreement(texts: Sequence[str], vectors: np.ndarray) -> float:
    """Mean pairwise cosine similarity of unit vectors, with the empty-answer rule."""
    pairs = []
    for i, j in combinations(range(len(texts)), 2):
        empty_i, empty_j = not texts[i].strip(), not texts[j].strip()
        if empty_i or empty_j:
            pairs.append(1.0 if empty_i and empty_j else 0.0)
        else:
            pairs.append(float(np.clip(vectors[i] @ vectors[j], -1.0, 1.0)))
    return fmean(pairs) if pairs else 1.0


class ConsistencyEvaluator:
    name = "consistency"

    def score(self, context: EvaluationContext) -> list[Score]:
        if context.embedder is None or not context.samples:
            return []
        groups: dict[str, list[Run]] = defaultdict(list)
        for run in (*context.runs, *context.samples):
            groups[run.task_id].append(run)
        scores, by_domain = [], defaultdict(list)
        for task_id, runs in sorted(groups.items()):
            if len(runs) < 2:
                continue
            texts = [run.text for run in runs]
            value = agreement(texts, context.embedder.encode(texts))
            by_domain[runs[0].domain].append(value)
            scores.append(
                Score(
                    "agreement",
                    value,
                    "cosine -1..1",
                    self.name,
                    task_id=task_id,
                    domain=runs[0].domain,
                    higher_is_better=True,
                    evidence={"samples": len(runs), "answers": texts},
                )
            )
        for domain, values in sorted(by_domain.items()):
            scores.append(
                Score(
                    "agreement",
                    fmean(values),
                    "cosine -1..1",
                    self.name,
                    domain=domain,
                    higher_is_better=True,
                    evidence={"tasks": len(values)},
                    compare=False,  # a different task is sampled each cycle
                )
            )
        every = [value for values in by_domain.values() for value in values]
        if every:
            scores.append(
                Score(
                    "agreement",
                    fmean(every),
                    "cosine -1..1",
                    self.name,
                    higher_is_better=True,
                    evidence={"tasks": len(every)},
                    compare=False,
                )
            )
        return scores


def consistency_tasks(task_ids: Sequence[str], count: int, cycle_id: int) -> list[str]:
    """Pick `count` tasks in rotation, so that every task is checked every few cycles."""
    if count <= 0 or not task_ids:
        return []
    ordered = sorted(task_ids)
    start = (cycle_id * count) % len(ordered)
    return [ordered[(start + i) % len(ordered)] for i in range(min(count, len(ordered)))]
