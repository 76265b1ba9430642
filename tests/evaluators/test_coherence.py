import json
from pathlib import Path

import pytest

from bench.validate_evaluators import coherence_validation, detected_pairs
from daemon.config import ScoreConfig
from daemon.records import Run
from daemon.state import StateStore
from evaluators.base import EvaluationContext
from evaluators.coherence import CoherenceEvaluator, find_contradictions
from knowledge.extract import PatternExtractor
from knowledge.graph import KnowledgeGraph, Provenance

DATA = Path(__file__).parent.parent / "data"


def answers(*texts: str) -> list[dict]:
    return [{"task_id": f"t{i}", "domain": "geo", "text": t} for i, t in enumerate(texts)]


def test_functional_conflict_found():
    assert detected_pairs(
        answers("Canberra is the capital of Australia.", "The capital of Australia is Sydney.")
    ) == {(0, 1)}


def test_negation_conflict_found():
    assert detected_pairs(
        answers("Sydney is not the capital of Australia.", "Sydney is the capital of Australia.")
    ) == {(0, 1)}


def test_is_a_cycle_found():
    pairs = detected_pairs(
        answers(
            "A sparrow is a bird.",
            "A bird is an animal.",
            "An animal is a sparrow.",
            "A rose is a flower.",
        )
    )
    assert pairs == {(0, 1), (0, 2), (1, 2)}


def test_same_fact_twice_agrees():
    assert (
        detected_pairs(
            answers(
                "Paris is the capital of France.",
                "The capital of France is Paris.",
                "A capital da França é Paris.",
                "Paris is in France.",
                "Paris is in Europe.",
            )
        )
        == set()
    )


def test_celsius_and_fahrenheit_agree():
    assert (
        detected_pairs(
            answers("Water boils at 100 degrees Celsius.", "Water boils at 212 degrees Fahrenheit.")
        )
        == set()
    )


def test_arithmetic_answers_compared_per_task():
    sets = [
        {"task_id": "a1", "domain": "arithmetic", "text": "The answer is 24."},
        {"task_id": "a1", "domain": "arithmetic", "text": "A resposta é 20."},
        {"task_id": "a2", "domain": "arithmetic", "text": "The answer is 7."},
    ]
    assert detected_pairs(sets) == {(0, 1)}


@pytest.mark.parametrize("name", ["coherence_a.json", "coherence_b.json", "coherence_c.json"])
def test_fixture_precision_and_recall(name):
    path = DATA / name
    if not path.exists():
        pytest.skip(f"{name} is not shipped")
    result = coherence_validation(path)
    # Stored figures from `a3x bench evaluators` (docs/evaluators.md); a change in
    # extraction that moves them must update the docs too.
    expected = json.loads((DATA / "coherence_expected.json").read_text())[name]
    assert result["correct"] == expected["correct"]
    assert result["detected"] == expected["detected"]
    assert result["planted"] == expected["planted"]


def scored(texts: list[str], cycle: int = 1, window: int = 10):
    store = StateStore(Path(":memory:"))
    graph = KnowledgeGraph(store.connection)
    runs = []
    for index, text in enumerate(texts):
        task = f"t{index}"
        graph.add_facts(
            Provenance(None, cycle, task, "geo"), PatternExtractor().extract(text, task)
        )
        runs.append(
            Run.of_text(
                task,
                "geo",
                text,
                prompt_tokens=1,
                completion_tokens=1,
                wall_seconds=1.0,
                tokens_per_second=1.0,
            )
        )
    context = EvaluationContext(
        cycle_id=cycle, runs=tuple(runs), config=ScoreConfig(window=window), graph=graph
    )
    return {(s.name, s.domain, s.task_id): s for s in CoherenceEvaluator().score(context)}


def test_coherence_value_weighted_by_confidence():
    scores = scored(
        [
            "Canberra is the capital of Australia.",  # pattern fact, confidence 0.9
            "The capital of Australia is Sydney.",  # 0.9, contradicts the first
            "A whale is a mammal.",  # is-a fact, confidence 0.6
            "Lisbon is in Portugal.",  # 0.9
        ]
    )
    # Contradicted weight 1.8 of 3.3 in total.
    assert scores[("coherence", None, None)].value == pytest.approx(1 - 1.8 / 3.3)
    assert scores[("facts", None, None)].value == 4
    assert scores[("contradictions", None, None)].value == 1
    assert scores[("coherence", "geo", "t2")].value == 1.0
    evidence = scores[("coherence", None, None)].evidence["contradictions"][0]
    assert evidence["kind"] == "functional"
    assert [f["task"] for f in evidence["facts"]] == ["t0", "t1"]


def test_empty_graph_defined():
    scores = scored(["", "No facts here at all."])
    assert scores[("coherence", None, None)].value == 1.0
    assert scores[("facts", None, None)].value == 0
    assert scores[("coherence", None, None)].evidence["window_facts"] == 0


def test_old_contradictions_leave_window():
    store = StateStore(Path(":memory:"))
    graph = KnowledgeGraph(store.connection)
    extract = PatternExtractor().extract
    graph.add_facts(
        Provenance(None, 1, "t0", "geo"), extract("The capital of Peru is Quito.", "t0")
    )
    graph.add_facts(
        Provenance(None, 20, "t1", "geo"), extract("The capital of Peru is Lima.", "t1")
    )
    assert len(find_contradictions(graph.facts())) == 1
    assert find_contradictions(graph.facts(since_cycle=11)) == []


def test_repeated_conflict_counted_once():
    store = StateStore(Path(":memory:"))
    graph = KnowledgeGraph(store.connection)
    extract = PatternExtractor().extract
    for cycle in (1, 2, 3):
        for task, text in (
            ("t0", "Canberra is the capital of Australia."),
            ("t1", "The capital of Australia is Sydney."),
        ):
            graph.add_facts(Provenance(None, cycle, task, "geo"), extract(text, task))
    runs = tuple(
        Run.of_text(
            t,
            "geo",
            "",
            prompt_tokens=1,
            completion_tokens=1,
            wall_seconds=1.0,
            tokens_per_second=1.0,
        )
        for t in ("t0", "t1")
    )
    context = EvaluationContext(cycle_id=3, runs=runs, config=ScoreConfig(), graph=graph)
    scores = {(s.name, s.domain, s.task_id): s for s in CoherenceEvaluator().score(context)}
    cycle_score = scores[("contradictions", None, None)]
    assert cycle_score.value == 1  # one question, however many cycles repeat it
    evidence = scores[("coherence", None, None)].evidence
    assert evidence["fact_pairs"] == 5  # pairs with a fact of cycle 3: 3 + 2
    claims = evidence["contradictions"][0]["facts"]
    assert [c["cycles"] for c in claims] == [[1, 2, 3], [1, 2, 3]]
