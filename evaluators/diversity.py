"""Diversity: whether answers still spread over many meanings or collapse onto a few.

- entropy: normalized entropy (0..1) of the FAISS k-means cluster assignment
  of the answers of the last `window` cycles; 0 when every answer falls in
  one cluster.
- distinct_1 / distinct_2: distinct word unigrams and bigrams over all words
  of the cycle's answers.
- duplicate_rate: share of the cycle's answers that repeat, word for word,
  an answer to another task (mode collapse).
- drift: 1 - cosine similarity between the mean embedding of this window and
  of the window before it; present once a previous window exists.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np

from daemon.records import Run, Score
from evaluators.base import EvaluationContext

KMEANS_SEED = 1234
KMEANS_ITERATIONS = 20


def normalized_entropy(labels: Sequence[int], clusters: int) -> float:
    """Shannon entropy of the labels divided by log(clusters); 0 for one cluster."""
    if clusters < 2 or not labels:
        return 0.0
    counts = np.bincount(np.asarray(labels), minlength=clusters).astype(np.float64)
    shares = counts[counts > 0] / counts.sum()
    return float(-(shares * np.log(shares)).sum() / math.log(clusters))


def cluster_entropy(vectors: np.ndarray, max_clusters: int) -> tuple[float, int]:
    """k-means the vectors into up to `max_clusters` clusters; return (entropy, k).

    k is at most the number of distinct vectors, so identical answers give one
    cluster and entropy 0.
    """
    distinct = len(np.unique(np.round(vectors, 5), axis=0))
    clusters = min(max_clusters, distinct)
    if clusters < 2:
        return 0.0, 1
    kmeans = faiss.Kmeans(
        vectors.shape[1],
        clusters,
        niter=KMEANS_ITERATIONS,
        seed=KMEANS_SEED,
        verbose=False,
        min_points_per_centroid=1,
    )
    kmeans.train(np.ascontiguousarray(vectors, dtype=np.float32))
    _, labels = kmeans.index.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
    return normalized_entropy(labels[:, 0].tolist(), clusters), clusters


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams over all n-grams of the texts; 0 when there are none."""
    grams: list[tuple[str, ...]] = []
    for text in texts:
        words = text.lower().split()
        grams += [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def duplicate_rate(runs: Sequence[Run]) -> float:
    """Share of answers whose normalized text is also the answer of another task."""
    texts = [" ".join(run.text.lower().split()) for run in runs]
    counts = Counter(text for text in texts if text)
    repeated = sum(1 for text in texts if text and counts[text] > 1)
    return repeated / len(texts) if texts else 0.0


class DiversityEvaluator:
    name = "diversity"

    def score(self, context: EvaluationContext) -> list[Score]:
        if context.memory is None or context.state is None:
            return []
        window = context.config.window
        current = self._window(context, context.cycle_id - window + 1, context.cycle_id)
        previous = self._window(
            context, context.cycle_id - 2 * window + 1, context.cycle_id - window
        )
        scores = self._scope(context, context.runs, current, previous, None)
        for domain in sorted({run.domain for run in context.runs}):
            runs = [run for run in context.runs if run.domain == domain]
            scores += self._scope(
                context,
                runs,
                {k: v for k, v in current.items() if k[1] == domain},
                {k: v for k, v in previous.items() if k[1] == domain},
                domain,
            )
        return scores

    def _window(self, context: EvaluationContext, first: int, last: int) -> dict:
        """Vectors of the main answers of cycles first..last, keyed by (run id, domain)."""
        assert context.state is not None and context.memory is not None
        if last < 1:
            return {}
        rows = [row for row in context.state.runs_since(max(1, first)) if row["cycle_id"] <= last]
        domains = {row["id"]: row["domain"] for row in rows}
        vectors = context.memory.vectors(list(domains))
        return {(run_id, domains[run_id]): vector for run_id, vector in vectors.items()}

    def _scope(
        self,
        context: EvaluationContext,
        runs: Sequence[Run],
        current: dict,
        previous: dict,
        domain: str | None,
    ) -> list[Score]:
        texts = [run.text for run in runs]
        common: dict[str, Any] = {"evaluator": self.name, "domain": domain}
        scores = [
            Score(
                "distinct_1", distinct_n(texts, 1), "ratio 0..1", higher_is_better=True, **common
            ),
            Score(
                "distinct_2", distinct_n(texts, 2), "ratio 0..1", higher_is_better=True, **common
            ),
            Score(
                "duplicate_rate",
                duplicate_rate(runs),
                "ratio 0..1",
                higher_is_better=False,
                **common,
            ),
        ]
        if current:
            vectors = np.stack(list(current.values()))
            entropy, clusters = cluster_entropy(vectors, context.config.clusters)
            scores.append(
                Score(
                    "entropy",
                    entropy,
                    "ratio 0..1",
                    higher_is_better=True,
                    evidence={"answers": len(vectors), "clusters": clusters},
                    **common,
                )
            )
        if current and previous:
            now = np.stack(list(current.values())).mean(axis=0)
            before = np.stack(list(previous.values())).mean(axis=0)
            cosine = float(now @ before / (np.linalg.norm(now) * np.linalg.norm(before) or 1.0))
            scores.append(
                Score(
                    "drift",
                    1.0 - cosine,
                    "cosine distance 0..2",
                    evidence={"answers": len(current), "previous": len(previous)},
                    **common,
                )
            )
        return scores
