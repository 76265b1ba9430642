"""The training-step benchmark on the tiny model: both variants run and report
positive times and sizes and finite losses."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.train_step import BenchmarkConfig, TrainStepBenchmark, run_benchmark

CONFIG = BenchmarkConfig(steps=2, repeats=1, sequence=64, rank=2, threads=1)


@pytest.fixture(scope="module")
def result(tiny_gguf: Path, model_cache: Path) -> TrainStepBenchmark:
    return run_benchmark(tiny_gguf, model_cache, CONFIG)


def test_both_variants_measured(result: TrainStepBenchmark):
    assert [m.variant for m in result.measurements] == ["a3x", "baseline"]
    for measurement in result.measurements:
        assert measurement.steps == CONFIG.total_steps, measurement.variant
        assert measurement.seconds_per_step > 0, measurement.variant
        assert measurement.peak_rss_bytes > 0, measurement.variant
        assert math.isfinite(measurement.last_loss), measurement.variant


def test_ratios_are_quotients(result: TrainStepBenchmark):
    a3x, baseline = result.summary("a3x"), result.summary("baseline")
    assert result.seconds_ratio == a3x.seconds_per_step / baseline.seconds_per_step
    assert result.rss_ratio == a3x.peak_rss_bytes / baseline.peak_rss_bytes
    assert result.to_json()["ratios"] == {
        "seconds_per_step": result.seconds_ratio,
        "peak_rss": result.rss_ratio,
    }


def test_same_work_on_both_sides(result: TrainStepBenchmark):
    # Same data, seed and optimizer settings, but the Trainer draws the examples in
    # another order, so the last-step losses are close and not equal.
    a3x, baseline = result.summary("a3x"), result.summary("baseline")
    assert a3x.last_loss == pytest.approx(baseline.last_loss, rel=0.2)


def test_prediction_recorded(result: TrainStepBenchmark):
    assert result.plan["peak_bytes"] > result.plan["runtime_bytes"] > 0
