import pytest

from bench.validate_evaluators import efficiency_validation
from evaluators.efficiency import trend


def test_steady_slowdown_detected():
    cycles = list(range(1, 11))
    result = trend(cycles, [1.0 + 0.1 * c for c in cycles], alpha=0.05)
    assert result["trend"] == 1.0
    assert result["slope"] == pytest.approx(0.1)
    assert result["p_value"] < 0.001
    # The fitted line goes from 1.1 s at cycle 1 to 2.0 s at cycle 10.
    assert result["relative_change"] == pytest.approx(0.9 / 1.1)


def test_constant_series_has_no_trend():
    assert trend([1, 2, 3, 4], [2.0, 2.0, 2.0, 2.0], 0.05) == {
        "slope": 0.0,
        "p_value": 1.0,
        "trend": 0.0,
        "relative_change": 0.0,
    }


def test_outlier_does_not_make_trend():
    values = [1.0, 1.02, 0.98, 1.01, 9.0, 0.99, 1.0, 1.01]
    result = trend(list(range(1, 9)), values, 0.05)
    assert result["trend"] == 0.0
    assert abs(result["slope"]) < 0.01


def test_noise_and_slowdown_stored_figures():
    result = efficiency_validation(tasks=40, cycles=20)
    assert result["flat noise"]["rising"] == 0
    assert result["flat noise"]["falling"] == 2
    assert result["slowdown 3%/cycle"]["rising"] == 40
    assert result["slowdown 1%/cycle"]["rising"] == 30
