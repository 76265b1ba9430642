"""Coherence: contradictions among the facts that answers state.

Three kinds of contradiction are found in the facts of the last `window`
cycles:

- functional: one subject with a functional relation (capital, boils_at,
  answer, ...) pointing to two different objects;
- negation: a fact and its negation;
- is-a cycle: `a is_a b`, ..., `z is_a a`.

For the facts of the current cycle (or of one domain or task in it),
coherence = 1 - (confidence-weighted share of those facts that take part
in a contradiction). With no facts, coherence is 1.0 and `facts` is 0.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import networkx as nx

from daemon.records import Score
from evaluators.base import EvaluationContext
from knowledge.extract import IS_A
from knowledge.graph import StoredFact, relation_view, to_networkx

MAX_EVIDENCE = 20  # contradictions listed in a score's evidence


@dataclass(frozen=True)
class Contradiction:
    kind: str  # "functional", "negation" or "is_a_cycle"
    facts: tuple[StoredFact, ...]

    def describe(self) -> str:
        parts = [
            f"{'NOT ' if f.negated else ''}{f.subject} {f.relation} {f.object} "
            f"(cycle {f.cycle_id}, task {f.task_id}, run {f.run_id})"
            for f in self.facts
        ]
        return f"{self.kind}: " + " vs ".join(parts)

    def to_evidence(self) -> dict:
        return {
            "kind": self.kind,
            "facts": [
                {
                    "id": f.id,
                    "triple": [f.subject, f.relation, f.object],
                    "negated": f.negated,
                    "run": f.run_id,
                    "cycle": f.cycle_id,
                    "task": f.task_id,
                    "sentence": f.sentence,
                }
                for f in self.facts
            ],
        }


def find_contradictions(facts: Sequence[StoredFact]) -> list[Contradiction]:
    found = []
    found += _functional_conflicts(facts)
    found += _negation_conflicts(facts)
    found += _is_a_cycles(facts)
    return found


def _functional_conflicts(facts: Sequence[StoredFact]) -> list[Contradiction]:
    by_key: dict[tuple[str, str], list[StoredFact]] = defaultdict(list)
    for fact in facts:
        if fact.functional and not fact.negated:
            by_key[(fact.subject, fact.relation)].append(fact)
    found = []
    for group in by_key.values():
        for first, second in combinations(group, 2):
            if first.object != second.object:
                found.append(Contradiction("functional", (first, second)))
    return found


def _negation_conflicts(facts: Sequence[StoredFact]) -> list[Contradiction]:
    positive: dict[tuple[str, str, str], list[StoredFact]] = defaultdict(list)
    negative: dict[tuple[str, str, str], list[StoredFact]] = defaultdict(list)
    for fact in facts:
        key = (fact.subject, fact.relation, fact.object)
        (negative if fact.negated else positive)[key].append(fact)
    return [
        Contradiction("negation", (yes, no))
        for key, denials in negative.items()
        for yes in positive.get(key, ())
        for no in denials
    ]


def _is_a_cycles(facts: Sequence[StoredFact]) -> list[Contradiction]:
    is_a = [fact for fact in facts if fact.relation == IS_A and not fact.negated]
    if not is_a:
        return []
    view = relation_view(to_networkx(is_a), IS_A)
    by_edge: dict[tuple[str, str], StoredFact] = {}
    for fact in is_a:
        by_edge.setdefault((fact.subject, fact.object), fact)
    found = []
    for cycle in nx.simple_cycles(view):
        if len(cycle) < 2:
            continue  # "x is a x" states nothing
        edges = zip(cycle, cycle[1:] + cycle[:1], strict=True)
        found.append(Contradiction("is_a_cycle", tuple(by_edge[edge] for edge in edges)))
    return found


def group_conflicts(contradictions: Sequence[Contradiction]) -> list[dict]:
    """Merge contradictions about the same question into one conflict each.

    A wrong answer repeated over ten cycles makes ten fact pairs but one
    conflict ("capital of australia: canberra vs sydney"); each conflict
    lists one fact per distinct claim, with every task and cycle that made it.
    """
    groups: dict[tuple, dict] = {}
    for contradiction in contradictions:
        first = contradiction.facts[0]
        if contradiction.kind == "functional":
            key: tuple = ("functional", first.subject, first.relation)
        elif contradiction.kind == "negation":
            key = ("negation", first.subject, first.relation, first.object)
        else:
            key = ("is_a_cycle", *sorted(f.subject for f in contradiction.facts))
        group = groups.setdefault(key, {"kind": contradiction.kind, "claims": {}})
        for fact in contradiction.facts:
            claim = group["claims"].setdefault(
                (fact.object, fact.negated),
                {
                    "triple": [fact.subject, fact.relation, fact.object],
                    "negated": fact.negated,
                    "sentence": fact.sentence,
                    "tasks": set(),
                    "cycles": set(),
                    "runs": set(),
                },
            )
            claim["tasks"].add(fact.task_id)
            claim["cycles"].add(fact.cycle_id)
            claim["runs"].add(fact.run_id)
    conflicts = []
    for group in groups.values():
        facts = []
        for claim in group["claims"].values():
            facts.append(
                {
                    **claim,
                    "tasks": sorted(claim["tasks"]),
                    "cycles": sorted(claim["cycles"]),
                    "runs": sorted(r for r in claim["runs"] if r is not None),
                    "task": sorted(claim["tasks"])[0],
                    "cycle": max(claim["cycles"]),
                }
            )
        conflicts.append({"kind": group["kind"], "facts": facts})
    return conflicts


class CoherenceEvaluator:
    name = "coherence"

    def score(self, context: EvaluationContext) -> list[Score]:
        if context.graph is None:
            return []
        since = max(1, context.cycle_id - context.config.window + 1)
        window_facts = context.graph.facts(since_cycle=since)
        contradictions = find_contradictions(window_facts)
        current = [f for f in window_facts if f.cycle_id == context.cycle_id]
        scores = [self._scope_score(current, contradictions, None, None, len(window_facts))]
        for domain in sorted({run.domain for run in context.runs}):
            facts = [f for f in current if f.domain == domain]
            scores.append(self._scope_score(facts, contradictions, domain, None, None))
        for run in context.runs:
            facts = [f for f in current if f.task_id == run.task_id]
            if facts:
                scores.append(
                    self._scope_score(facts, contradictions, run.domain, run.task_id, None)
                )
        return [score for group in scores for score in group]

    def _scope_score(
        self,
        facts: list[StoredFact],
        contradictions: list[Contradiction],
        domain: str | None,
        task_id: str | None,
        window_facts: int | None,
    ) -> list[Score]:
        ids = {fact.id for fact in facts}
        involved = [c for c in contradictions if any(f.id in ids for f in c.facts)]
        contradicted = {f.id for c in involved for f in c.facts} & ids
        total = sum(fact.confidence for fact in facts)
        weight = sum(fact.confidence for fact in facts if fact.id in contradicted)
        coherence = 1.0 - weight / total if total else 1.0
        conflicts = group_conflicts(involved)
        evidence = {
            "contradictions": conflicts[:MAX_EVIDENCE],
            "contradictions_total": len(conflicts),
            "fact_pairs": len(involved),
        }
        if window_facts is not None:
            evidence["window_facts"] = window_facts
        common: dict[str, Any] = {"evaluator": self.name, "domain": domain, "task_id": task_id}
        return [
            Score(
                "coherence",
                coherence,
                "ratio 0..1",
                evidence=evidence,
                higher_is_better=True,
                **common,
            ),
            Score("facts", float(len(facts)), "count", **common),
            Score(
                "contradictions", float(len(conflicts)), "count", higher_is_better=False, **common
            ),
        ]
