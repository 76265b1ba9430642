"""The knowledge graph in state.sqlite: entities, relations and facts with provenance.

Its tables are part of the state schema (see `daemon.state.MIGRATIONS`).
Every fact remembers the task run, cycle, task, domain and adapter that
produced it, and the extractor's confidence.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from knowledge.extract import FUNCTIONAL_RELATIONS, Fact

SCHEMA = """
CREATE TABLE entities (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
CREATE TABLE relations (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    functional INTEGER NOT NULL
);
CREATE TABLE facts (
    id INTEGER PRIMARY KEY,
    subject_id INTEGER NOT NULL REFERENCES entities(id),
    relation_id INTEGER NOT NULL REFERENCES relations(id),
    object_id INTEGER NOT NULL REFERENCES entities(id),
    negated INTEGER NOT NULL,
    confidence REAL NOT NULL,
    run_id INTEGER REFERENCES runs(id),
    cycle_id INTEGER NOT NULL,
    task_id TEXT NOT NULL,
    domain TEXT NOT NULL,
    adapter TEXT NOT NULL DEFAULT '',
    extractor TEXT NOT NULL,
    sentence TEXT NOT NULL
);
CREATE INDEX facts_by_cycle ON facts(cycle_id);
CREATE INDEX facts_by_subject ON facts(subject_id, relation_id)
"""


@dataclass(frozen=True)
class StoredFact:
    id: int
    subject: str
    relation: str
    object: str
    negated: bool
    confidence: float
    functional: bool
    run_id: int | None
    cycle_id: int
    task_id: str
    domain: str
    adapter: str
    sentence: str


@dataclass(frozen=True)
class Provenance:
    run_id: int | None
    cycle_id: int
    task_id: str
    domain: str
    adapter: str = ""


class KnowledgeGraph:
    def __init__(self, connection: sqlite3.Connection):
        self.db = connection

    def add_facts(self, provenance: Provenance, facts: Sequence[Fact]) -> list[int]:
        """Store facts in one transaction and return their ids."""
        if not facts:
            return []
        ids = []
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for fact in facts:
                cursor = self.db.execute(
                    """INSERT INTO facts (subject_id, relation_id, object_id, negated, confidence,
                    run_id, cycle_id, task_id, domain, adapter, extractor, sentence)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (
                        self._entity(fact.subject),
                        self._relation(fact.relation),
                        self._entity(fact.object),
                        int(fact.negated),
                        fact.confidence,
                        provenance.run_id,
                        provenance.cycle_id,
                        provenance.task_id,
                        provenance.domain,
                        provenance.adapter,
                        fact.extractor,
                        fact.sentence,
                    ),
                )
                ids.append(int(cursor.lastrowid or 0))
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        return ids

    def _entity(self, name: str) -> int:
        self.db.execute("INSERT OR IGNORE INTO entities (name) VALUES (?)", (name,))
        return int(self.db.execute("SELECT id FROM entities WHERE name = ?", (name,)).fetchone()[0])

    def _relation(self, name: str) -> int:
        self.db.execute(
            "INSERT OR IGNORE INTO relations (name, functional) VALUES (?, ?)",
            (name, int(name in FUNCTIONAL_RELATIONS)),
        )
        return int(
            self.db.execute("SELECT id FROM relations WHERE name = ?", (name,)).fetchone()[0]
        )

    def facts(self, since_cycle: int = 0) -> list[StoredFact]:
        """Return the facts of cycles >= since_cycle, oldest first."""
        rows = self.db.execute(
            """SELECT f.id, s.name, r.name, o.name, f.negated, f.confidence, r.functional,
                      f.run_id, f.cycle_id, f.task_id, f.domain, f.adapter, f.sentence
               FROM facts f
               JOIN entities s ON s.id = f.subject_id
               JOIN relations r ON r.id = f.relation_id
               JOIN entities o ON o.id = f.object_id
               WHERE f.cycle_id >= ? ORDER BY f.id""",
            (since_cycle,),
        ).fetchall()
        return [
            StoredFact(
                row[0],
                row[1],
                row[2],
                row[3],
                bool(row[4]),
                row[5],
                bool(row[6]),
                row[7],
                row[8],
                row[9],
                row[10],
                row[11],
                row[12],
            )
            for row in rows
        ]

    def count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM facts").fetchone()[0])


def to_networkx(facts: Sequence[StoredFact]) -> Any:
    """Build a networkx MultiDiGraph with an edge subject -> object per fact, keyed by fact id."""
    import networkx as nx  # deferred: about 0.25 s to import, needed only when scoring

    graph = nx.MultiDiGraph()
    for fact in facts:
        graph.add_edge(
            fact.subject,
            fact.object,
            key=fact.id,
            relation=fact.relation,
            negated=fact.negated,
            confidence=fact.confidence,
            fact=fact,
        )
    return graph


def relation_view(graph: Any, relation: str, negated: bool = False) -> Any:
    """Build a directed networkx graph of one relation's edges, for cycle analyses."""
    import networkx as nx

    view = nx.DiGraph()
    for subject, obj, data in graph.edges(data=True):
        if data["relation"] == relation and data["negated"] == negated:
            view.add_edge(subject, obj)
    return view
