from pathlib import Path

from bench.generate import run_benchmark


def test_benchmark_runs_both_sides(tiny_gguf: Path):
    result = run_benchmark(tiny_gguf, threads=1, prompts=3, max_tokens=8, rounds=2, n_ctx=512)
    assert result.prompts == 3
    # Greedy decoding of the same file: both sides produce the same tokens.
    assert result.same_text
    assert result.raw.tokens == result.a3x.tokens
    assert result.raw.tokens >= 3 * 2 * 8
    assert result.raw.seconds > 0
    assert result.a3x.seconds > 0
    assert result.ratio > 0
    assert result.to_json()["ratio"] == result.ratio
