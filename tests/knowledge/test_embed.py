"""The MiniLM embedders, real model: the evaluators' float32 one and the router's int8 one."""

from __future__ import annotations

import numpy as np
import pytest

from knowledge.embed import ROUTING_MAX_TOKENS, Embedder, routing_embedder, shared_embedder

TEXTS = [
    "Q: What is the capital of France?\nA:",
    "Summarize the passage in one sentence.\n\n" + "The river floods every spring. " * 60,
    "def square(x):\n    return x * x",
]


@pytest.fixture(scope="module")
def router():
    return routing_embedder()


def test_routing_embedder_settings(router):
    assert router.quantized
    assert router.model.max_seq_length == ROUTING_MAX_TOKENS
    assert router.identity == "all-MiniLM-L6-v2 int8 128"
    assert shared_embedder().identity == "all-MiniLM-L6-v2 float32 256"


def test_routing_vector_ignores_batch(router):
    """int8 activation scales span the batch, so texts are embedded one at a time."""
    together = router.encode(TEXTS)
    alone = np.concatenate([router.encode([text]) for text in TEXTS])
    assert np.array_equal(together, alone)


def test_routing_vectors_near_float32(router):
    vectors = router.encode(TEXTS)
    assert vectors.shape == (3, 384)
    assert vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Of the same texts at 128 word pieces in float32, the int8 vectors keep the
    # direction: cosine similarity 0.96 or more.
    full = Embedder(max_tokens=ROUTING_MAX_TOKENS).encode(TEXTS)
    assert np.min(np.sum(vectors * full, axis=1)) > 0.96


def test_long_text_is_cut_at_the_limit(router):
    """Words past the 128th word piece do not change the routing vector."""
    head = "Summarize the passage in one sentence.\n\n" + "The river floods every spring. " * 40
    longer = head + "Volcanoes erupt lava and ash. " * 40
    assert np.array_equal(router.encode([head]), router.encode([longer]))


def test_non_positive_limit_rejected():
    with pytest.raises(ValueError, match="max_tokens 0"):
        Embedder(max_tokens=0)
