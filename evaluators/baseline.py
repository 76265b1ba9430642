"""Noise-aware baselines: each score against its own recent history.

The baseline of a score series is the mean and standard deviation of its
last `window` values before this cycle. A change counts only
when it exceeds `spread_k` times the spread, where the spread is at least
`min_relative_spread` of the mean (a series that never moved would
otherwise flag any change). Fewer than 3 past values give no verdict.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import replace
from statistics import fmean, stdev
from typing import Any

from daemon.records import Score

MIN_HISTORY = 3
SeriesKey = tuple[str, str, str]  # evaluator, score name, domain ("" for the whole cycle)


def series_key(score: Score) -> SeriesKey:
    return (score.evaluator, score.name, score.domain or "")


def history_by_series(
    rows: Iterable[Any], before_cycle: int, window: int
) -> dict[SeriesKey, list[float]]:
    """Return the last `window` values of each series before `before_cycle`, oldest first.

    A series that is not scored every cycle (perplexity rotates over domains)
    reaches back as many cycles as it needs to have `window` values.
    """
    history: dict[SeriesKey, list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        if row["cycle_id"] < before_cycle:
            key = (row["evaluator"], row["name"], row["domain"])
            history[key].append((row["cycle_id"], float(row["value"])))
    return {key: [v for _, v in sorted(points)[-window:]] for key, points in history.items()}


def baseline(
    value: float,
    past: Sequence[float],
    higher_is_better: bool | None,
    k: float,
    min_relative_spread: float,
) -> dict[str, Any]:
    """Compare one value with its past values."""
    past = [v for v in past if math.isfinite(v)]
    if len(past) < MIN_HISTORY or not math.isfinite(value):
        return {"count": len(past), "verdict": "new"}
    mean = fmean(past)
    spread = max(stdev(past), min_relative_spread * abs(mean), 1e-12)
    change = value - mean
    significant = abs(change) > k * spread
    if not significant:
        verdict = "steady"
    elif higher_is_better is None:
        verdict = "up" if change > 0 else "down"
    else:
        verdict = "better" if (change > 0) == higher_is_better else "worse"
    return {
        "count": len(past),
        "mean": mean,
        "spread": spread,
        "change": change,
        "threshold": k * spread,
        "verdict": verdict,
    }


NOT_COMPARED = {"verdict": "not compared"}


def with_baselines(
    scores: Sequence[Score],
    history: dict[SeriesKey, list[float]],
    k: float,
    min_relative_spread: float,
) -> list[Score]:
    """Attach a baseline to every score that is not per task."""
    result = []
    for score in scores:
        if score.task_id is not None:
            result.append(score)
            continue
        if not score.compare:
            result.append(replace(score, baseline=NOT_COMPARED))
            continue
        verdict = baseline(
            score.value,
            history.get(series_key(score), []),
            score.higher_is_better,
            k,
            min_relative_spread,
        )
        result.append(replace(score, baseline=verdict))
    return result


def regressions(scores: Sequence[Score]) -> list[Score]:
    """Scores whose baseline verdict is 'worse', per domain and for the cycle."""
    return [s for s in scores if s.baseline and s.baseline.get("verdict") == "worse"]
