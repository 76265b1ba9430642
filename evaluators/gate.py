"""The acceptance gate: is a candidate adapter measurably better than the incumbent?

Everything here is label-free:

- held-out perplexity of the domain's reference corpus (paragraphs that never
  entered training), per paragraph, incumbent against candidate. The
  candidate must lower it by at least `min_gain` (relative) and by more than
  `z` standard errors of the paired per-paragraph differences (noise);
- held-out perplexity of every other domain with the candidate against the
  base: none may rise by more than `tolerance` (relative);
- contradictions among the answers to the domain's tasks: the candidate's
  answers may not contradict each other more often than the incumbent's
  beyond noise. Counts are treated as Poisson: the allowed increase is `z`
  times the square root of the incumbent's count (at least 1), so one new
  contradiction among a handful of answers does not outweigh a clear gain.

A candidate is accepted only when all three hold.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from evaluators.coherence import find_contradictions
from knowledge.extract import FUNCTIONAL_RELATIONS, PatternExtractor
from knowledge.graph import StoredFact


@dataclass(frozen=True)
class GateConfig:
    min_gain: float = 0.02  # relative perplexity decrease the domain must reach
    z: float = 2.0  # and beyond this many standard errors of the paired differences
    tolerance: float = 0.05  # relative perplexity increase allowed on other domains


@dataclass(frozen=True)
class Evidence:
    domain: str
    metric: str
    incumbent: float
    candidate: float
    change: float  # relative change for perplexity, difference for counts
    threshold: float  # the change that counts (gain needed or regression allowed)
    verdict: str  # "better", "worse", "within noise"
    role: str  # "domain" (being retrained) or "other"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GateVerdict:
    accepted: bool
    reason: str
    evidence: tuple[Evidence, ...]
    answers: tuple[tuple[str, str, str], ...]  # task id, incumbent answer, candidate answer

    def to_json(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "reason": self.reason,
            "evidence": [row.to_json() for row in self.evidence],
            "answers": [list(row) for row in self.answers],
        }


@dataclass(frozen=True)
class PerplexityPair:
    """Per-paragraph negative log-likelihood per token, incumbent and candidate."""

    incumbent: tuple[float, ...]
    candidate: tuple[float, ...]
    tokens: tuple[int, ...]


def compare_perplexity(pair: PerplexityPair) -> tuple[float, float, float, float]:
    """Return (incumbent ppl, candidate ppl, relative change, standard error in nats).

    Perplexities are token-weighted over all paragraphs; the standard error is
    that of the mean paired difference per paragraph (0 for one paragraph).
    """
    total = sum(pair.tokens)
    incumbent = math.exp(
        sum(n * t for n, t in zip(pair.incumbent, pair.tokens, strict=True)) / total
    )
    candidate = math.exp(
        sum(n * t for n, t in zip(pair.candidate, pair.tokens, strict=True)) / total
    )
    differences = [i - c for i, c in zip(pair.incumbent, pair.candidate, strict=True)]
    count = len(differences)
    if count < 2:
        return incumbent, candidate, candidate / incumbent - 1, 0.0
    mean = sum(differences) / count
    variance = sum((d - mean) ** 2 for d in differences) / (count - 1)
    return incumbent, candidate, candidate / incumbent - 1, math.sqrt(variance / count)


def domain_evidence(domain: str, pair: PerplexityPair, config: GateConfig) -> Evidence:
    incumbent, candidate, change, error = compare_perplexity(pair)
    # The gain must pass both floors: min_gain, and z standard errors of the paired
    # log differences turned into a relative perplexity change.
    needed = max(config.min_gain, 1 - math.exp(-config.z * error))
    if change <= -needed:
        verdict = "better"
    elif change > needed:
        verdict = "worse"
    else:
        verdict = "within noise"
    return Evidence(
        domain, "held-out perplexity", incumbent, candidate, change, needed, verdict, "domain"
    )


def other_evidence(domain: str, pair: PerplexityPair, config: GateConfig) -> Evidence:
    incumbent, candidate, change, _ = compare_perplexity(pair)
    verdict = "worse" if change > config.tolerance else "within noise"
    if change < -config.tolerance:
        verdict = "better"
    return Evidence(
        domain,
        "held-out perplexity",
        incumbent,
        candidate,
        change,
        config.tolerance,
        verdict,
        "other",
    )


def contradiction_evidence(
    domain: str,
    incumbent: Sequence[tuple[str, str]],
    candidate: Sequence[tuple[str, str]],
    config: GateConfig,
) -> Evidence:
    """Compare contradictions within each answer set; answers are (task id, text)."""
    before, after = count_contradictions(incumbent), count_contradictions(candidate)
    change = after - before
    allowed = config.z * math.sqrt(max(before, 1))
    if change > allowed:
        verdict = "worse"
    elif change < -allowed:
        verdict = "better"
    else:
        verdict = "within noise"
    return Evidence(
        domain, "contradictions in answers", before, after, change, allowed, verdict, "domain"
    )


def count_contradictions(answers: Sequence[tuple[str, str]]) -> int:
    extractor = PatternExtractor()
    facts: list[StoredFact] = []
    for task_id, text in answers:
        for fact in extractor.extract(text, task_id):
            facts.append(
                StoredFact(
                    id=len(facts),
                    subject=fact.subject,
                    relation=fact.relation,
                    object=fact.object,
                    negated=fact.negated,
                    confidence=fact.confidence,
                    functional=fact.relation in FUNCTIONAL_RELATIONS,
                    run_id=None,
                    cycle_id=0,
                    task_id=task_id,
                    domain="",
                    adapter="",
                    sentence=fact.sentence,
                )
            )
    return len(find_contradictions(facts))


def verdict(evidence: Sequence[Evidence], answers: Sequence[tuple[str, str, str]]) -> GateVerdict:
    """Accept only when the domain's perplexity is better and nothing is worse."""
    target = [
        row for row in evidence if row.role == "domain" and row.metric == "held-out perplexity"
    ]
    worse = [row for row in evidence if row.verdict == "worse"]
    if not target:
        return GateVerdict(
            False,
            "the domain has no held-out text, so no gain can be shown",
            tuple(evidence),
            tuple(answers),
        )
    gain = target[0]
    if worse:
        listed = "; ".join(f"{row.domain} {row.metric} {_change(row)}" for row in worse)
        return GateVerdict(False, f"rejected: worse on {listed}", tuple(evidence), tuple(answers))
    if gain.verdict != "better":
        return GateVerdict(
            False,
            f"rejected: held-out perplexity changed {_change(gain)}, which does not pass the "
            f"gain needed ({gain.threshold:.1%})",
            tuple(evidence),
            tuple(answers),
        )
    return GateVerdict(
        True,
        f"accepted: held-out perplexity {gain.incumbent:.2f} -> {gain.candidate:.2f} "
        f"({_change(gain)}, needed -{gain.threshold:.1%}); no domain worse",
        tuple(evidence),
        tuple(answers),
    )


def _change(row: Evidence) -> str:
    if row.metric == "held-out perplexity":
        return f"{row.change:+.1%}"
    return f"{row.change:+g}"


def measure_perplexity(
    log_likelihood: Callable[[str], Any], texts: Sequence[str]
) -> tuple[list[float], list[int]]:
    """Return per-text mean negative log-likelihood per token, and token counts."""
    values, tokens = [], []
    for text in texts:
        result = log_likelihood(text)
        values.append(-result.total / max(1, result.tokens))
        tokens.append(max(1, result.tokens))
    return values, tokens
