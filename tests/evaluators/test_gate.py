"""The acceptance gate's arithmetic and verdicts."""

from __future__ import annotations

import math

import pytest

from evaluators.gate import (
    GateConfig,
    PerplexityPair,
    compare_perplexity,
    contradiction_evidence,
    count_contradictions,
    domain_evidence,
    other_evidence,
    verdict,
)

CONFIG = GateConfig(min_gain=0.02, z=2.0, tolerance=0.05)


def pair(before: list[float], after: list[float], tokens: list[int] | None = None):
    return PerplexityPair(tuple(before), tuple(after), tuple(tokens or [10] * len(before)))


def test_perplexity_is_token_weighted():
    incumbent, candidate, change, _ = compare_perplexity(pair([1.0, 3.0], [1.0, 1.0], [30, 10]))

    assert incumbent == pytest.approx(math.exp((30 * 1.0 + 10 * 3.0) / 40))
    assert candidate == pytest.approx(math.e)
    assert change == pytest.approx(candidate / incumbent - 1)


def test_consistent_gain_is_better():
    row = domain_evidence("geo", pair([3.0, 3.1, 2.9, 3.0], [2.5, 2.6, 2.4, 2.5]), CONFIG)

    assert row.verdict == "better"
    assert row.change == pytest.approx(math.exp(-0.5) - 1)


def test_noisy_gain_is_within_noise():
    # The mean falls by 0.1 nats but the paired differences spread from -1.2 to +1.4.
    row = domain_evidence("geo", pair([3.0, 3.0, 3.0, 3.0], [1.6, 4.2, 1.8, 4.0]), CONFIG)

    assert row.verdict == "within noise"
    assert row.threshold > CONFIG.min_gain


def test_tiny_gain_is_below_min_gain():
    row = domain_evidence("geo", pair([3.0, 3.0], [2.995, 2.99]), CONFIG)

    assert row.verdict == "within noise"


def test_other_domain_regression_is_worse():
    row = other_evidence("math", pair([2.0, 2.0], [2.2, 2.2]), CONFIG)

    assert row.verdict == "worse"
    assert row.role == "other"


def test_contradictions_counted_within_answers():
    answers = [("a", "Paris is the capital of France."), ("b", "Lyon is the capital of France.")]

    assert count_contradictions(answers) == 1
    assert count_contradictions(answers[:1]) == 0


def test_contradictions_compared_beyond_noise():
    clean = [("a", "Paris is the capital of France.")]
    one = [*clean, ("b", "Lyon is the capital of France.")]
    many = [
        *one,
        ("c", "Rome is the capital of Italy."),
        ("d", "Milan is the capital of Italy."),
        ("e", "Madrid is the capital of Spain."),
        ("f", "Seville is the capital of Spain."),
        ("g", "Porto is the capital of Portugal."),
        ("h", "Lisbon is the capital of Portugal."),
        ("i", "Munich is the capital of Germany."),
        ("j", "Berlin is the capital of Germany."),
    ]

    assert contradiction_evidence("geo", clean, one, CONFIG).verdict == "within noise"
    assert contradiction_evidence("geo", clean, many, CONFIG).verdict == "worse"
    assert contradiction_evidence("geo", many, clean, CONFIG).verdict == "better"


def test_verdict_accepts_only_clean_gain():
    gain = domain_evidence("geo", pair([3.0, 3.1], [2.0, 2.1]), CONFIG)
    harm = other_evidence("math", pair([2.0], [2.5]), CONFIG)
    fine = other_evidence("math", pair([2.0], [2.01]), CONFIG)

    assert verdict([gain, fine], []).accepted
    rejected = verdict([gain, harm], [])
    assert not rejected.accepted
    assert "math held-out perplexity" in rejected.reason
    assert not verdict([fine], []).accepted  # no held-out text for the domain itself
