"""The FAISS memory of answer embeddings, keyed by task-run id.

`memory.faiss` holds an IndexIDMap2 over an inner-product index of unit
vectors, so the FAISS id of a vector is the `runs.id` of the answer it
embeds. The file is written to a temporary name and renamed, so a killed
process leaves the old or the new index, never half of one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np
import structlog

log = structlog.get_logger(__name__)


class MemoryFileError(Exception):
    """memory.faiss cannot be read."""


class AnswerMemory:
    def __init__(self, path: Path, dimension: int):
        self.path = path
        self.dimension = dimension
        self.index = self._load()

    def _load(self) -> faiss.IndexIDMap2:
        if not self.path.exists():
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dimension))
        try:
            index = faiss.read_index(str(self.path))
        except RuntimeError as error:
            raise MemoryFileError(
                f"{self.path} is not a readable FAISS index ({str(error).splitlines()[0]})"
            ) from error
        if index.d != self.dimension or not isinstance(index, faiss.IndexIDMap2):
            raise MemoryFileError(
                f"{self.path} contains a {type(index).__name__} of dimension {index.d}; "
                f"A3X expects an IndexIDMap2 of dimension {self.dimension}"
            )
        return index

    @classmethod
    def open_or_quarantine(cls, path: Path, dimension: int) -> tuple[AnswerMemory, str | None]:
        """Open the memory; a corrupt file is moved aside and an empty memory returned,
        with a note saying where the old file went."""
        try:
            return cls(path, dimension), None
        except MemoryFileError as error:
            aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            os.replace(path, aside)
            log.error("memory.corrupt_file_moved", error=str(error), moved_to=str(aside))
            return cls(path, dimension), f"{error}; moved to {aside} and started a new memory"

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def add(self, ids: Sequence[int], vectors: np.ndarray, max_vectors: int = 0) -> None:
        """Add vectors under their run ids; beyond `max_vectors` (0: no limit), drop the
        vectors of the oldest runs, since run ids only grow."""
        if len(ids) == 0:
            return
        identifiers = np.asarray(ids, dtype=np.int64)
        self.index.remove_ids(identifiers)  # type: ignore[arg-type]  # replaces re-added runs
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), identifiers)
        if max_vectors and len(self) > max_vectors:
            stored = faiss.vector_to_array(self.index.id_map)
            cutoff = int(np.sort(stored)[len(self) - max_vectors])
            self.index.remove_ids(faiss.IDSelectorRange(0, cutoff))

    def vectors(self, ids: Sequence[int]) -> dict[int, np.ndarray]:
        """Return the stored vector of each id that is present."""
        found: dict[int, np.ndarray] = {}
        for identifier in ids:
            try:
                found[int(identifier)] = np.asarray(self.index.reconstruct(int(identifier)))
            except RuntimeError:
                continue
        return found

    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        if len(self) == 0:
            return []
        scores, ids = self.index.search(vector.reshape(1, -1).astype(np.float32), min(k, len(self)))
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]

    def save(self) -> None:
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        faiss.write_index(self.index, str(temporary))
        with temporary.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)
