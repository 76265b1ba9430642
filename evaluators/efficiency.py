"""Efficiency: per recurring task, the trend of its cost over the last cycles.

For wall time, completion tokens and tokens per second, each task's series
over the last `efficiency_window` cycles gets a Theil-Sen slope (per cycle,
robust to outliers) and a Mann-Kendall test (Kendall's tau between cycle
number and value, with its p-value). A trend counts when p < alpha:
`trend` is -1 (falling), 0 (none) or +1 (rising). `relative_change` is the
change of the fitted line from the first cycle of the window to the last,
relative to its start, so -0.2 reads "this task now costs 20% less than at
the start of the window". Trends carry their own test, so they are not
compared with a baseline again.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from statistics import median

import numpy as np
from scipy import stats

from daemon.records import Score
from evaluators.base import EvaluationContext

MIN_POINTS = 4  # fewer cycles than this give no trend
METRICS = {  # series -> whether a rising trend is good
    "wall_seconds": False,
    "completion_tokens": None,
    "tokens_per_second": True,
}


def trend(cycles: Sequence[float], values: Sequence[float], alpha: float) -> dict[str, float]:
    """Theil-Sen slope, Mann-Kendall p-value, direction and relative change of a series."""
    x, y = np.asarray(cycles, dtype=float), np.asarray(values, dtype=float)
    if len(set(values)) == 1:
        return {"slope": 0.0, "p_value": 1.0, "trend": 0.0, "relative_change": 0.0}
    fit = stats.theilslopes(y, x)
    slope = float(fit.slope)
    tau = stats.kendalltau(x, y)
    p_value = float(tau.pvalue) if np.isfinite(tau.pvalue) else 1.0
    direction = float(np.sign(slope)) if p_value < alpha else 0.0
    # Change of the fitted line from the first to the last cycle, relative to its start.
    start = float(fit.intercept + slope * x.min())
    end = float(fit.intercept + slope * x.max())
    relative = (end - start) / start if start > 0 else 0.0
    return {"slope": slope, "p_value": p_value, "trend": direction, "relative_change": relative}


class EfficiencyEvaluator:
    name = "efficiency"

    def score(self, context: EvaluationContext) -> list[Score]:
        if context.state is None:
            return []
        first = max(1, context.cycle_id - context.config.efficiency_window + 1)
        series: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(
            lambda: defaultdict(list)
        )
        for row in context.state.runs_since(first):
            if row["error"] is not None:
                continue
            key = (row["task_id"], row["domain"])
            series[key]["cycle"].append(row["cycle_id"])
            for metric in METRICS:
                series[key][metric].append(float(row[metric]))
        # This cycle's runs are not stored yet when scoring runs inside a cycle.
        for run in context.runs:
            key = (run.task_id, run.domain)
            if run.error is None and (
                not series[key]["cycle"] or series[key]["cycle"][-1] != context.cycle_id
            ):
                series[key]["cycle"].append(context.cycle_id)
                for metric in METRICS:
                    series[key][metric].append(float(getattr(run, metric)))

        scores: list[Score] = []
        by_domain: dict[str, list[dict]] = defaultdict(list)
        current = {run.task_id for run in context.runs}
        for (task_id, domain), data in sorted(series.items()):
            if task_id not in current or len(data["cycle"]) < MIN_POINTS:
                continue
            for metric, rising_is_good in METRICS.items():
                result = trend(data["cycle"], data[metric], context.config.alpha)
                result["points"] = len(data["cycle"])
                by_domain[domain].append({"task": task_id, "metric": metric, **result})
                scores.append(
                    Score(
                        f"{metric}_relative_change",
                        result["relative_change"],
                        "share of start",
                        task_id=task_id,
                        domain=domain,
                        evaluator=self.name,
                        evidence=result,
                        higher_is_better=rising_is_good,
                    )
                )
        for domain, rows in sorted(by_domain.items()):
            scores += self._summary(rows, domain)
        every = [row for rows in by_domain.values() for row in rows]
        if every:
            scores += self._summary(every, None)
        return scores

    def _summary(self, rows: list[dict], domain: str | None) -> list[Score]:
        scores = []
        for metric, rising_is_good in METRICS.items():
            group = [row for row in rows if row["metric"] == metric]
            rising = [row["task"] for row in group if row["trend"] > 0]
            falling = [row["task"] for row in group if row["trend"] < 0]
            evidence = {"tasks": len(group), "rising": rising, "falling": falling}
            scores.append(
                Score(
                    f"{metric}_median_change",
                    median(r["relative_change"] for r in group),
                    "share of start",
                    self.name,
                    domain=domain,
                    evidence=evidence,
                    higher_is_better=rising_is_good,
                    compare=False,
                )
            )
            scores.append(
                Score(
                    f"{metric}_rising_tasks",
                    float(len(rising)),
                    "count",
                    self.name,
                    domain=domain,
                    evidence=evidence,
                    compare=False,
                )
            )
        return scores
