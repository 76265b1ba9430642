from pathlib import Path

import numpy as np
import pytest

from knowledge.memory import AnswerMemory, MemoryFileError


def unit_vectors(count: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, 8)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_memory_persists_and_reloads(tmp_path: Path):
    memory = AnswerMemory(tmp_path / "memory.faiss", 8)
    vectors = unit_vectors(3)
    memory.add([11, 12, 13], vectors)
    memory.save()
    again = AnswerMemory(tmp_path / "memory.faiss", 8)
    assert len(again) == 3
    assert np.allclose(again.vectors([12])[12], vectors[1])
    assert again.search(vectors[2], 1)[0][0] == 13


def test_readding_id_replaces_vector(tmp_path: Path):
    memory = AnswerMemory(tmp_path / "memory.faiss", 8)
    memory.add([1], unit_vectors(1, seed=1))
    replacement = unit_vectors(1, seed=2)
    memory.add([1], replacement)
    assert len(memory) == 1
    assert np.allclose(memory.vectors([1])[1], replacement[0])


def test_missing_ids_skipped(tmp_path: Path):
    memory = AnswerMemory(tmp_path / "memory.faiss", 8)
    memory.add([1], unit_vectors(1))
    assert set(memory.vectors([1, 2])) == {1}


def test_corrupt_file_raises(tmp_path: Path):
    path = tmp_path / "memory.faiss"
    path.write_bytes(b"not a faiss index" * 10)
    with pytest.raises(MemoryFileError, match="is not a readable FAISS index"):
        AnswerMemory(path, 8)


def test_wrong_dimension_raises(tmp_path: Path):
    memory = AnswerMemory(tmp_path / "memory.faiss", 8)
    memory.add([1], unit_vectors(1))
    memory.save()
    with pytest.raises(
        MemoryFileError, match="dimension 8; A3X expects an IndexIDMap2 of dimension 384"
    ):
        AnswerMemory(tmp_path / "memory.faiss", 384)


def test_corrupt_file_quarantined(tmp_path: Path):
    path = tmp_path / "memory.faiss"
    path.write_bytes(b"\x00" * 100)
    memory, note = AnswerMemory.open_or_quarantine(path, 8)
    assert len(memory) == 0
    assert "moved to" in note
    moved = list(tmp_path.glob("memory.faiss.corrupt-*"))
    assert len(moved) == 1
    assert moved[0].read_bytes() == b"\x00" * 100


def test_memory_keeps_newest_answers(tmp_path: Path):
    memory = AnswerMemory(tmp_path / "memory.faiss", 8)
    memory.add([1, 2, 3], unit_vectors(3), max_vectors=4)
    memory.add([4, 5, 6], unit_vectors(3, seed=1), max_vectors=4)
    assert len(memory) == 4
    assert set(memory.vectors([1, 2, 3, 4, 5, 6])) == {3, 4, 5, 6}
