import pytest

from daemon.records import Run
from evaluators.execution import ExecutionEvaluator, distinct_bigram_ratio, is_repetitive


def run(task_id: str, domain: str, text: str, tokens: int, seconds: float, error=None) -> Run:
    return Run(
        task_id=task_id,
        domain=domain,
        language="en",
        prompt="p",
        text=text,
        prompt_tokens=4,
        completion_tokens=tokens,
        wall_seconds=seconds,
        tokens_per_second=tokens / seconds,
        finish_reason="stop",
        rss_bytes=100,
        peak_rss_bytes=200 if domain == "a" else 300,
        error=error,
    )


def test_distinct_bigrams_of_loop():
    assert distinct_bigram_ratio("the cat the cat the cat the cat the cat") == pytest.approx(2 / 9)
    assert distinct_bigram_ratio("too short to judge") is None


def test_repetitive_threshold():
    assert is_repetitive("go go go go go go go go go", 0.5)
    assert not is_repetitive("one two three four five six seven eight nine", 0.5)


def test_domain_scores_stored_values():
    runs = [
        run("t1", "a", "Paris is the capital.", 4, 0.5),
        run("t2", "a", "", 0, 0.25),
        run("t3", "b", "x y x y x y x y x y x y", 12, 1.0),
    ]
    scores = ExecutionEvaluator(0.5).score_runs(runs)
    by_key = {(s.name, s.domain, s.task_id): s for s in scores}
    assert by_key[("empty_rate", "a", None)].value == 0.5
    assert by_key[("empty_rate", "a", None)].evidence == {"tasks": ["t2"]}
    assert by_key[("tokens_per_second", "a", None)].value == pytest.approx(4 / 0.75)
    assert by_key[("repetitive_rate", "b", None)].value == 1.0
    assert by_key[("repetitive_rate", None, None)].value == pytest.approx(1 / 3)
    assert by_key[("peak_rss_mib", None, None)].value == 300 / 2**20
    assert by_key[("empty", "a", "t2")].value == 1.0
    assert by_key[("distinct_bigrams", "b", "t3")].value == pytest.approx(2 / 11)


def test_failed_run_counts_as_empty():
    runs = [run("t1", "a", "", 0, 0.1, error="RuntimeError: x")]
    scores = ExecutionEvaluator().score_runs(runs)
    empty = next(s for s in scores if s.name == "empty" and s.task_id == "t1")
    assert empty.value == 1.0
    assert empty.evidence["error"] == "RuntimeError: x"


def test_no_runs_no_scores():
    assert ExecutionEvaluator().score_runs([]) == []
