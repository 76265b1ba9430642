"""Routing accuracy on the labelled mix of the shipped task prompts, with one profile per
domain, measured with the real MiniLM embedder."""

from __future__ import annotations

import pytest

from bench.routing import MemoEmbedder, routing_accuracy, shipped_books

# docs/routing.md quotes these counts from `a3x bench routing` with the router's
# embedder (int8, 128 word pieces); MiniLM on CPU is deterministic, so a change means
# the books, the embedder or the profiles changed. The asserts allow one prompt of
# slack for another CPU's rounding.
BOOK_CORRECT = 58
CORPUS_CORRECT = 52
PROMPTS = 60


@pytest.fixture(scope="module")
def embedder():
    from knowledge.embed import routing_embedder

    return MemoEmbedder(routing_embedder())


def test_book_profiles_route_own_domain(embedder):
    result = routing_accuracy(shipped_books(), embedder, "book")
    assert result.prompts == PROMPTS
    assert result.correct >= BOOK_CORRECT - 1, result.confusions
    assert result.correct - result.seen_correct >= 14, "held-out prompts"
    # One almanac prompt is at 0.399 from its own profile, just under the floor.
    assert result.own_above_floor >= 59 / 60
    assert result.other_pairs_above_floor < 0.15


def test_corpus_profiles_route_own_domain(embedder):
    result = routing_accuracy(shipped_books(), embedder, "corpus")
    assert result.prompts == PROMPTS
    assert result.seen_prompts == 0
    assert result.correct >= CORPUS_CORRECT - 1, result.confusions
