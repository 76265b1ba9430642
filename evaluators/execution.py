"""Execution metrics of a cycle's runs: cost, speed, empty and repetitive answers.

These measure how the runtime behaved, not whether an answer is right.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from statistics import fmean
from typing import Any

from daemon.records import Run, Score
from evaluators.base import EvaluationContext

MIN_WORDS_FOR_REPETITION = 8
HIGHER_IS_BETTER = {
    "empty_rate": False,
    "repetitive_rate": False,
    "mean_wall_seconds": False,
    "tokens_per_second": True,
    "peak_rss_mib": False,
}


def distinct_bigram_ratio(text: str) -> float | None:
    """Share of distinct word bigrams in a text; None when it has too few words to tell."""
    words = text.lower().split()
    if len(words) < MIN_WORDS_FOR_REPETITION:
        return None
    bigrams = list(zip(words, words[1:], strict=False))
    return len(set(bigrams)) / len(bigrams)


def is_repetitive(text: str, distinct_min: float) -> bool:
    ratio = distinct_bigram_ratio(text)
    return ratio is not None and ratio < distinct_min


class ExecutionEvaluator:
    name = "execution"

    def __init__(self, repetition_distinct_min: float = 0.5):
        self.repetition_distinct_min = repetition_distinct_min

    def score(self, context: EvaluationContext) -> list[Score]:
        return self.score_runs(context.runs)

    def score_runs(self, runs: Sequence[Run]) -> list[Score]:
        scores: list[Score] = []
        for run in runs:
            scores.extend(self._task_scores(run))
        by_domain: dict[str, list[Run]] = defaultdict(list)
        for run in runs:
            by_domain[run.domain].append(run)
        for domain, group in sorted(by_domain.items()):
            scores.extend(self._group_scores(group, domain))
        if runs:
            scores.extend(self._group_scores(list(runs), None))
        return scores

    def _task_scores(self, run: Run) -> list[Score]:
        ratio = distinct_bigram_ratio(run.text)
        evidence = {"finish_reason": run.finish_reason, "error": run.error}
        values = [
            ("wall_seconds", run.wall_seconds, "s"),
            ("tokens_per_second", run.tokens_per_second, "tokens/s"),
            ("completion_tokens", float(run.completion_tokens), "tokens"),
            ("answer_chars", float(len(run.text.strip())), "chars"),
            ("empty", float(not run.ok), "0|1"),
            ("repetitive", float(is_repetitive(run.text, self.repetition_distinct_min)), "0|1"),
        ]
        if ratio is not None:
            values.append(("distinct_bigrams", ratio, "ratio 0..1"))
        return [
            Score(
                name,
                value,
                unit,
                self.name,
                task_id=run.task_id,
                domain=run.domain,
                evidence=evidence,
            )
            for name, value, unit in values
        ]

    def _group_scores(self, runs: list[Run], domain: str | None) -> list[Score]:
        empty = [run.task_id for run in runs if not run.ok]
        repetitive = [
            run.task_id for run in runs if is_repetitive(run.text, self.repetition_distinct_min)
        ]
        total_tokens = sum(run.completion_tokens for run in runs)
        total_seconds = sum(run.wall_seconds for run in runs)
        values: list[tuple[str, float, str, dict[str, Any]]] = [
            ("runs", float(len(runs)), "count", {}),
            ("empty_rate", len(empty) / len(runs), "ratio 0..1", {"tasks": empty}),
            ("repetitive_rate", len(repetitive) / len(runs), "ratio 0..1", {"tasks": repetitive}),
            ("mean_wall_seconds", fmean(run.wall_seconds for run in runs), "s", {}),
            (
                "tokens_per_second",
                total_tokens / total_seconds if total_seconds else 0.0,
                "tokens/s",
                {"tokens": total_tokens, "seconds": round(total_seconds, 3)},
            ),
            ("mean_completion_tokens", fmean(run.completion_tokens for run in runs), "tokens", {}),
            ("peak_rss_mib", max(run.peak_rss_bytes for run in runs) / 2**20, "MiB", {}),
        ]
        return [
            Score(
                name,
                value,
                unit,
                self.name,
                domain=domain,
                evidence=evidence,
                higher_is_better=HIGHER_IS_BETTER.get(name),
            )
            for name, value, unit, evidence in values
        ]
