"""Perplexity of the current model on held-out text of each domain.

A domain's held-out text is the start of the held-out split of its reference
corpus (see knowledge/corpus.py), which retraining never trains on, cut at
about `perplexity_tokens` tokens (4 characters each, cut at a space). The
text is the same every cycle, so the series compares models, not texts.

Scoring runs the output layer over the whole vocabulary for every token
(262,144 entries for Gemma 3), the most expensive step of the score phase,
so each cycle scores `perplexity_domains` domains in rotation.
"""

from __future__ import annotations

from pathlib import Path

import structlog

from daemon.records import Score
from evaluators.base import EvaluationContext
from knowledge.corpus import split_corpus

log = structlog.get_logger(__name__)

CHARS_PER_TOKEN = 4  # rough average for English and Portuguese prose with Gemma's tokenizer


def held_out_text(corpus: Path, tokens: int) -> str:
    """Return the first ~`tokens` tokens of a corpus folder's held-out paragraphs."""
    text = "\n\n".join(split_corpus(corpus).held_out)
    limit = tokens * CHARS_PER_TOKEN
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    return text[: cut if cut > 0 else limit]


def rotation(names: list[str], count: int, cycle_id: int) -> list[str]:
    """Return the `count` names due this cycle, cycling through all of them (all for 0)."""
    if count <= 0 or count >= len(names):
        return names
    start = (cycle_id * count) % len(names)
    return [names[(start + i) % len(names)] for i in range(count)]


class PerplexityEvaluator:
    name = "perplexity"

    def score(self, context: EvaluationContext) -> list[Score]:
        if context.backend is None:
            return []
        scores = []
        with_corpus = sorted(n for n, d in context.domains.items() if d.reference_corpus)
        for name in rotation(with_corpus, context.config.perplexity_domains, context.cycle_id):
            domain = context.domains[name]
            assert domain.reference_corpus is not None
            try:
                text = held_out_text(domain.reference_corpus, context.config.perplexity_tokens)
            except (OSError, UnicodeDecodeError) as error:
                log.error("perplexity.corpus_unreadable", domain=name, error=str(error))
                continue
            if not text:
                continue
            result = context.backend.log_likelihood(text)
            scores.append(
                Score(
                    "perplexity",
                    result.perplexity,
                    "perplexity",
                    self.name,
                    domain=name,
                    higher_is_better=False,
                    evidence={"tokens": result.tokens, "corpus": str(domain.reference_corpus)},
                )
            )
        return scores
