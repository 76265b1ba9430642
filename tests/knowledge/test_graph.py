from pathlib import Path

from daemon.state import STATE_SCHEMA_VERSION, StateStore
from knowledge.extract import PatternExtractor
from knowledge.graph import KnowledgeGraph, Provenance, relation_view, to_networkx


def graph_with(texts: list[str]) -> KnowledgeGraph:
    store = StateStore(Path(":memory:"))
    graph = KnowledgeGraph(store.connection)
    for index, text in enumerate(texts):
        facts = PatternExtractor().extract(text, f"t{index}")
        graph.add_facts(Provenance(None, index + 1, f"t{index}", "geo", "geo/2"), facts)
    return graph


def test_facts_keep_provenance():
    graph = graph_with(["Paris is the capital of France.", "Rome is the capital of Italy."])
    facts = graph.facts()
    assert [(f.subject, f.object, f.cycle_id, f.task_id) for f in facts] == [
        ("france", "paris", 1, "t0"),
        ("italy", "rome", 2, "t1"),
    ]
    assert facts[0].adapter == "geo/2"
    assert facts[0].functional
    assert facts[0].confidence == 0.9
    assert graph.facts(since_cycle=2)[0].subject == "italy"


def test_entities_shared_between_facts():
    graph = graph_with(["Lisbon is in Portugal.", "Porto is in Portugal."])
    entities = graph.db.execute("SELECT count(*) FROM entities").fetchone()[0]
    assert entities == 3


def test_networkx_views():
    graph = graph_with(["A dog is a mammal.", "A mammal is an animal.", "Paris is in France."])
    view = to_networkx(graph.facts())
    assert view.number_of_edges() == 3
    is_a = relation_view(view, "is_a")
    assert list(is_a.edges()) == [("dog", "mammal"), ("mammal", "animal")]


def test_state_schema_version():
    store = StateStore(Path(":memory:"))
    assert store.connection.execute("PRAGMA user_version").fetchone()[0] == STATE_SCHEMA_VERSION
    assert store.connection.execute("SELECT count(*) FROM facts").fetchone()[0] == 0
