"""The resilience kit, short: kill a real daemon a few times, then audit."""

from bench.resilience import run_kill_test


def test_killed_daemons_lose_nothing(tmp_path):
    result = run_kill_test(rounds=6, seed=3, max_delay=5.0, workdir=tmp_path)
    assert result["problems"] == []
    assert result["outcomes"].get("running", 0) == 0
    assert result["outcomes"].get("ok", 0) >= 1
    assert result["cycles"] >= 6
