import pytest

from daemon.records import Score
from evaluators.baseline import baseline, history_by_series, regressions, with_baselines


def test_change_within_noise_is_steady():
    result = baseline(0.95, [0.9, 1.0, 0.95, 0.92], True, k=2.0, min_relative_spread=0.02)
    assert result["verdict"] == "steady"
    assert result["mean"] == pytest.approx(0.9425)


def test_drop_beyond_noise_is_worse():
    result = baseline(0.5, [0.9, 0.92, 0.91, 0.9], True, k=2.0, min_relative_spread=0.02)
    assert result["verdict"] == "worse"
    assert result["change"] == pytest.approx(0.5 - 0.9075)


def test_lower_is_better_direction():
    assert baseline(5.0, [9.0, 9.1, 8.9], False, 2.0, 0.02)["verdict"] == "better"
    assert baseline(5.0, [9.0, 9.1, 8.9], None, 2.0, 0.02)["verdict"] == "down"


def test_flat_history_uses_spread_floor():
    # A series that never moved: 1% change stays under the 2% floor times k.
    assert baseline(1.01, [1.0, 1.0, 1.0], True, 2.0, 0.02)["verdict"] == "steady"
    assert baseline(0.9, [1.0, 1.0, 1.0], True, 2.0, 0.02)["verdict"] == "worse"


def test_short_history_is_new():
    assert baseline(0.1, [0.9, 0.9], True, 2.0, 0.02) == {"count": 2, "verdict": "new"}


def test_domain_regression_not_hidden_by_average():
    rows = [
        {"cycle_id": c, "evaluator": "coherence", "name": "coherence", "domain": d, "value": v}
        for c in (1, 2, 3, 4)
        for d, v in (("geo", 0.95), ("code", 0.80), ("", 0.875))
    ]
    history = history_by_series(rows, before_cycle=5, window=10)
    scores = [
        Score("coherence", 0.99, "ratio", "coherence", domain="code", higher_is_better=True),
        Score("coherence", 0.70, "ratio", "coherence", domain="geo", higher_is_better=True),
        Score("coherence", 0.845, "ratio", "coherence", higher_is_better=True),
    ]
    judged = with_baselines(scores, history, 2.0, 0.02)
    assert [s.baseline["verdict"] for s in judged] == ["better", "worse", "steady"]
    assert [s.domain for s in regressions(judged)] == ["geo"]


def test_history_window_excludes_current_and_old():
    rows = [
        {"cycle_id": c, "evaluator": "e", "name": "n", "domain": "", "value": float(c)}
        for c in range(1, 15)
    ]
    assert history_by_series(rows, before_cycle=12, window=3)[("e", "n", "")] == [9.0, 10.0, 11.0]
