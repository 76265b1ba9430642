import numpy as np
import pytest

from bench.validate_evaluators import consistency_validation
from evaluators.consistency import agreement, consistency_tasks


def test_identical_answers_agree_fully():
    vectors = np.tile(np.array([0.6, 0.8], dtype=np.float32), (3, 1))
    assert agreement(["a", "a", "a"], vectors) == pytest.approx(1.0)


def test_orthogonal_answers_agree_zero():
    vectors = np.eye(2, dtype=np.float32)
    assert agreement(["a", "b"], vectors) == pytest.approx(0.0)


def test_empty_answer_rules():
    vectors = np.ones((3, 2), dtype=np.float32) / np.sqrt(2)
    assert agreement(["", "", ""], vectors) == 1.0
    assert agreement(["x", "", "x"], vectors) == pytest.approx(1 / 3)


def test_rotation_covers_every_task():
    tasks = [f"t{i}" for i in range(10)]
    seen = set()
    for cycle in range(1, 6):
        chosen = consistency_tasks(tasks, 2, cycle)
        assert len(chosen) == 2
        seen.update(chosen)
    assert seen == set(tasks)
    assert consistency_tasks(tasks, 0, 1) == []


def test_paraphrases_separated_from_random():
    from knowledge.embed import shared_embedder

    result = consistency_validation(shared_embedder())
    assert result["auc"] == 1.0
    assert result["consistent_min"] > result["random_max"]
