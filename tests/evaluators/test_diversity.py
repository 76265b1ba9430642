import math

import numpy as np
import pytest

from bench.validate_evaluators import diversity_validation
from daemon.records import Run
from evaluators.diversity import (
    cluster_entropy,
    distinct_n,
    duplicate_rate,
    normalized_entropy,
)


def run(text: str, task: str = "t") -> Run:
    return Run.of_text(task, "d", text)


def test_entropy_of_even_and_single_clusters():
    assert normalized_entropy([0, 1, 2, 3], 4) == pytest.approx(1.0)
    assert normalized_entropy([2, 2, 2], 4) == 0.0
    assert normalized_entropy([0, 0, 1, 1], 4) == pytest.approx(math.log(2) / math.log(4))
    assert normalized_entropy([], 4) == 0.0


def test_identical_vectors_give_one_cluster():
    vectors = np.tile(np.eye(4, dtype=np.float32)[0], (10, 1))
    assert cluster_entropy(vectors, 8) == (0.0, 1)


def test_separated_vectors_spread_evenly():
    vectors = np.repeat(np.eye(4, dtype=np.float32), 5, axis=0)
    entropy, clusters = cluster_entropy(vectors, 4)
    assert clusters == 4
    assert entropy == pytest.approx(1.0)


def test_distinct_n_values():
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["", "one"], 2) == 0.0


def test_duplicate_rate_counts_repeats():
    runs = [run("Paris.", "a"), run("paris.", "b"), run("Rome.", "c"), run("", "d")]
    assert duplicate_rate(runs) == 0.5


def test_collapse_separated_from_variety():
    from knowledge.embed import shared_embedder

    result = diversity_validation(shared_embedder())  # 46 answers a cycle, 3 cycles
    assert result["collapsed"]["entropy"] == 0.0
    assert result["collapsed"]["duplicate_rate"] == 1.0
    assert result["varied"]["entropy"] > 0.9
    assert result["varied"]["duplicate_rate"] == 0.0
    assert result["half collapsed"]["entropy"] < 0.8
