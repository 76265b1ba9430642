"""The side-by-side training benchmark on the tiny model: every side without bitsandbytes
trains for 2 steps, the NF4 side is skipped with a reason, ratios and perplexities add up,
and the command line parses."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from bench import train as bench_train
from bench.train import (
    LEAN,
    QLORA,
    REFERENCE,
    HeldOut,
    TrainBenchmark,
    compare,
    run_benchmark,
)
from bench.train_step import BenchmarkConfig
from daemon.cli import build_parser
from knowledge.corpus import split_corpus

CONFIG = BenchmarkConfig(
    steps=2, batch=2, sequence=64, rank=2, accumulation=1, learning_rate=3e-4, threads=1, repeats=1
)
MEASURED = (REFERENCE, "peft-bf16", LEAN, "lean-sparse")
MISSING = "bitsandbytes is not installed (test)"


@pytest.fixture(scope="module")
def result(tiny_gguf: Path, model_cache: Path) -> TrainBenchmark:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench_train, "qlora_unavailable", lambda: MISSING)
        return run_benchmark(tiny_gguf, model_cache, CONFIG)


def test_sides_without_bitsandbytes_run(result: TrainBenchmark):
    assert [run.side for run in result.runs] == list(MEASURED)
    for run in result.runs:
        assert run.steps == CONFIG.total_steps, run.side
        assert run.seconds_per_step > 0, run.side
        assert run.peak_rss_bytes > 0, run.side
        assert math.isfinite(run.last_loss), run.side


def test_lean_reports_tokenizer_peak(result: TrainBenchmark):
    lean = next(run for run in result.runs if run.side == LEAN)
    assert lean.tokenizer_peak_rss_bytes > 0


def test_skipped_side_carries_reason(result: TrainBenchmark):
    assert result.skipped == {QLORA: MISSING}
    assert result.measured_sides == list(MEASURED)


def test_ratios_are_quotients(result: TrainBenchmark):
    reference = result.summary(REFERENCE)
    assert reference.seconds_ratio == 1.0
    assert reference.rss_ratio == 1.0
    for side in MEASURED:
        summary = result.summary(side)
        expected_seconds = summary.seconds_per_step / reference.seconds_per_step
        assert summary.seconds_ratio == expected_seconds, side
        assert summary.rss_ratio == summary.peak_rss_bytes / reference.peak_rss_bytes, side


def test_perplexities_are_finite(result: TrainBenchmark):
    held_out = split_corpus(bench_train.corpus_folder()).held_out
    assert set(result.held_out) == {"base", *MEASURED}
    for name, scores in result.held_out.items():
        assert len(scores.nll) == len(held_out), name
        assert math.isfinite(scores.perplexity), name
        assert scores.perplexity > 1, name
        assert math.isfinite(scores.standard_error), name
        assert scores.standard_error > 0, name


def test_reference_matches_itself(result: TrainBenchmark):
    comparison = result.summary(REFERENCE).comparison
    assert comparison.change == 0
    assert comparison.within_noise


def test_verdicts_cover_three_targets(result: TrainBenchmark):
    peak, speed, perplexity = result.verdicts()
    assert peak.met is None  # sequence 64 is not the target workload
    assert "sequence 64" in peak.measured
    assert speed.met == (result.summary(LEAN).seconds_ratio <= 0.7)
    assert perplexity.met == result.summary(LEAN).comparison.within_noise


def test_json_has_summary_and_verdicts(result: TrainBenchmark):
    data = json.loads(json.dumps(result.to_json()))
    assert set(data["summary"]) == set(MEASURED)
    assert data["skipped"] == {QLORA: MISSING}
    assert len(data["verdicts"]) == 3
    assert data["held_out"]["base"]["perplexity"] == result.held_out["base"].perplexity


def test_held_out_arithmetic():
    scores = HeldOut(nll=[1.0, 2.0], tokens=[1, 3])
    assert scores.perplexity == pytest.approx(math.exp(7 / 4))
    # The stdev of (1, 2) is sqrt(0.5), and over sqrt(2) paragraphs that is 0.5 nats.
    assert scores.standard_error == pytest.approx(scores.perplexity * 0.5)


def test_compare_flags_shift_beyond_noise():
    reference = HeldOut(nll=[2.0, 2.1, 1.9, 2.0], tokens=[10, 10, 10, 10])
    close = HeldOut(nll=[2.01, 2.09, 1.91, 2.0], tokens=[10, 10, 10, 10])
    shifted = HeldOut(nll=[2.2, 2.31, 2.1, 2.2], tokens=[10, 10, 10, 10])
    assert compare(reference, close).within_noise
    assert not compare(reference, shifted).within_noise
    assert compare(reference, shifted).change == pytest.approx(math.exp(0.2025) - 1)


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed"
)
def test_nf4_side_trains(tiny_gguf: Path, model_cache: Path):
    result = run_benchmark(tiny_gguf, model_cache, CONFIG, (REFERENCE, QLORA))
    assert result.skipped == {}
    nf4 = result.summary(QLORA)
    assert nf4.seconds_per_step > 0
    assert math.isfinite(nf4.perplexity)


def test_cli_parses():
    args = build_parser().parse_args(
        ["bench", "train", "--steps", "2", "--sides", "peft-fp32,lean", "--repeat", "3"]
    )
    assert args.handler is bench_train.command
    assert args.steps == 2
    assert args.sides == ("peft-fp32", "lean")
    assert args.repeats == 3
    assert args.learning_rate == CONFIG.learning_rate


@pytest.mark.parametrize("sides", ["lean", "peft-fp32,qlora"])
def test_cli_rejects_bad_sides(sides: str):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "train", "--sides", sides])
