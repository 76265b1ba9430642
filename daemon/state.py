"""`state.sqlite`: cycles and task runs, in WAL mode with a versioned schema.

A cycle row is inserted with outcome 'running' before any work starts and
updated when the cycle ends, so a row still 'running' at the next start
marks a cycle that was killed.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from daemon.records import Outcome, Run, Score
from knowledge.graph import SCHEMA as KNOWLEDGE_SCHEMA

STATE_SCHEMA_VERSION = 4

# Migration N brings the schema from version N-1 to N.
MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE cycles (
        id INTEGER PRIMARY KEY,
        started_at TEXT NOT NULL,
        finished_at TEXT,
        trigger TEXT NOT NULL,
        outcome TEXT NOT NULL,
        summary TEXT NOT NULL DEFAULT '',
        journal_commit TEXT
    );
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        cycle_id INTEGER NOT NULL REFERENCES cycles(id),
        task_id TEXT NOT NULL,
        domain TEXT NOT NULL,
        language TEXT NOT NULL,
        sample_index INTEGER NOT NULL DEFAULT 0,
        prompt TEXT NOT NULL,
        text TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        wall_seconds REAL NOT NULL,
        tokens_per_second REAL NOT NULL,
        finish_reason TEXT NOT NULL,
        rss_bytes INTEGER NOT NULL,
        peak_rss_bytes INTEGER NOT NULL,
        adapters TEXT NOT NULL DEFAULT '[]',
        error TEXT
    );
    CREATE INDEX runs_by_task ON runs(task_id, cycle_id);
    CREATE INDEX runs_by_domain ON runs(domain, cycle_id);
    """,
    2: KNOWLEDGE_SCHEMA
    + """;
    CREATE TABLE scores (
        cycle_id INTEGER NOT NULL,
        evaluator TEXT NOT NULL,
        name TEXT NOT NULL,
        domain TEXT NOT NULL DEFAULT '',
        task_id TEXT NOT NULL DEFAULT '',
        value REAL NOT NULL,
        unit TEXT NOT NULL,
        PRIMARY KEY (cycle_id, evaluator, name, domain, task_id)
    );
    """,
    # Per-domain decisions of each cycle, read by the retraining policy.
    3: """
    CREATE TABLE decisions (
        cycle_id INTEGER NOT NULL,
        domain TEXT NOT NULL,
        action TEXT NOT NULL,
        regressed INTEGER NOT NULL,
        comparable INTEGER NOT NULL,
        reason TEXT NOT NULL,
        PRIMARY KEY (cycle_id, domain)
    )
    """,
    # The routing decision of each run (JSON, lora.router.RoutingDecision); NULL when
    # routing was off and the domain's serving adapter answered.
    4: "ALTER TABLE runs ADD COLUMN routing TEXT",
}


@dataclass(frozen=True)
class DecisionRow:
    domain: str
    action: str  # "keep" or "retrain"
    regressed: bool  # a score of the domain regressed beyond noise this cycle
    comparable: bool  # a full cycle, whose scores were judged
    reason: str
    cycle_id: int = 0


class StateError(Exception):
    """state.sqlite cannot be opened, is corrupt, or has an unknown schema version."""


@dataclass(frozen=True)
class CycleRow:
    id: int
    started_at: str
    finished_at: str | None
    trigger: str
    outcome: str
    summary: str
    journal_commit: str | None


class StateStore:
    def __init__(self, path: Path):
        self.path = path
        try:
            # The service opens the store in the main thread and runs cycles in a
            # worker thread, one cycle at a time, so the connection is shared.
            self.connection = sqlite3.connect(
                path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            self.connection.row_factory = sqlite3.Row
            self.connection.execute("PRAGMA journal_mode=WAL")
            self.connection.execute("PRAGMA synchronous=FULL")
            self.connection.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as error:
            raise StateError(
                f"{path} cannot be opened as SQLite ({error}); move it aside to start a fresh "
                "state (the journal keeps every cycle record)"
            ) from error

    def close(self) -> None:
        self.connection.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.connection.execute("BEGIN IMMEDIATE")
        try:
            yield self.connection
        except BaseException:
            self.connection.execute("ROLLBACK")
            raise
        self.connection.execute("COMMIT")

    def _migrate(self) -> None:
        version = self.connection.execute("PRAGMA user_version").fetchone()[0]
        if version > STATE_SCHEMA_VERSION:
            raise StateError(
                f"{self.path} has schema version {version}, but this A3X supports up to "
                f"{STATE_SCHEMA_VERSION}; upgrade A3X"
            )
        for target in range(version + 1, STATE_SCHEMA_VERSION + 1):
            with self.transaction() as db:
                for statement in MIGRATIONS[target].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {target}")

    def begin_cycle(self, started_at: str, trigger: str) -> int:
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO cycles (started_at, trigger, outcome) VALUES (?, ?, 'running')",
                (started_at, trigger),
            )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def add_runs(self, cycle_id: int, runs: Sequence[Run]) -> list[int]:
        """Store a cycle's runs and return their ids, in order."""
        ids = []
        with self.transaction() as db:
            for run in runs:
                cursor = db.execute(
                    """INSERT INTO runs (cycle_id, task_id, domain, language, sample_index,
                    prompt, text, prompt_tokens, completion_tokens, wall_seconds,
                    tokens_per_second, finish_reason, rss_bytes, peak_rss_bytes, adapters, error,
                    routing)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    _run_row(cycle_id, run),
                )
                ids.append(int(cursor.lastrowid or 0))
        return ids

    def finish_cycle(
        self,
        cycle_id: int,
        finished_at: str,
        outcome: Outcome,
        summary: str,
        journal_commit: str | None = None,
    ) -> None:
        """Mark a cycle finished, with its journal commit, in one transaction."""
        with self.transaction() as db:
            db.execute(
                """UPDATE cycles SET finished_at = ?, outcome = ?, summary = ?,
                journal_commit = coalesce(?, journal_commit) WHERE id = ?""",
                (finished_at, outcome.value, summary, journal_commit, cycle_id),
            )

    def add_scores(self, cycle_id: int, scores: Sequence[Score]) -> None:
        with self.transaction() as db:
            db.executemany(
                """INSERT OR REPLACE INTO scores
                (cycle_id, evaluator, name, domain, task_id, value, unit)
                VALUES (?, ?, ?, ?, ?, ?, ?)""",
                [
                    (
                        cycle_id,
                        score.evaluator,
                        score.name,
                        score.domain or "",
                        score.task_id or "",
                        score.value,
                        score.unit,
                    )
                    for score in scores
                ],
            )

    def score_series(
        self, evaluator: str | None = None, domain: str | None = None, last_cycles: int = 0
    ) -> list[sqlite3.Row]:
        """Return stored scores that are not per task, oldest cycle first."""
        query = "SELECT * FROM scores WHERE task_id = ''"
        arguments: list = []
        if evaluator is not None:
            query += " AND evaluator = ?"
            arguments.append(evaluator)
        if domain is not None:
            query += " AND domain = ?"
            arguments.append(domain)
        if last_cycles:
            query += " AND cycle_id > (SELECT coalesce(max(cycle_id), 0) FROM scores) - ?"
            arguments.append(last_cycles)
        return self.connection.execute(query + " ORDER BY cycle_id", arguments).fetchall()

    def run_count(self, cycle_id: int) -> int:
        return int(
            self.connection.execute(
                "SELECT count(*) FROM runs WHERE cycle_id = ?", (cycle_id,)
            ).fetchone()[0]
        )

    def runs_since(self, first_cycle: int, sample_index: int | None = 0) -> list[sqlite3.Row]:
        """Return the runs of cycles >= first_cycle (main answers only by default)."""
        query = "SELECT * FROM runs WHERE cycle_id >= ?"
        arguments: list = [first_cycle]
        if sample_index is not None:
            query += " AND sample_index = ?"
            arguments.append(sample_index)
        return self.connection.execute(query + " ORDER BY cycle_id, id", arguments).fetchall()

    def set_journal_commit(self, cycle_id: int, commit: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE cycles SET journal_commit = ? WHERE id = ?", (commit, cycle_id))

    def unfinished_cycles(self) -> list[CycleRow]:
        rows = self.connection.execute(
            "SELECT * FROM cycles WHERE outcome = 'running' ORDER BY id"
        ).fetchall()
        return [CycleRow(**dict(row)) for row in rows]

    def last_cycle(self) -> CycleRow | None:
        row = self.connection.execute("SELECT * FROM cycles ORDER BY id DESC LIMIT 1").fetchone()
        return CycleRow(**dict(row)) if row else None

    def cycle_count(self) -> int:
        return int(self.connection.execute("SELECT count(*) FROM cycles").fetchone()[0])

    def last_run_cycles(self) -> dict[str, int]:
        """Return the last cycle in which each task ran, by task id."""
        rows = self.connection.execute(
            "SELECT task_id, max(cycle_id) AS cycle_id FROM runs GROUP BY task_id"
        ).fetchall()
        return {row["task_id"]: row["cycle_id"] for row in rows}

    def add_decisions(self, cycle_id: int, rows: Sequence[DecisionRow]) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO decisions VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (cycle_id, r.domain, r.action, int(r.regressed), int(r.comparable), r.reason)
                    for r in rows
                ],
            )

    def decision_history(self, domain: str, before_cycle: int) -> list[DecisionRow]:
        """Return the domain's decisions of finished cycles before `before_cycle`, newest first."""
        rows = self.connection.execute(
            """SELECT d.* FROM decisions d JOIN cycles c ON c.id = d.cycle_id
               WHERE d.domain = ? AND d.cycle_id < ? AND c.outcome != 'running'
               ORDER BY d.cycle_id DESC""",
            (domain, before_cycle),
        ).fetchall()
        return [
            DecisionRow(
                row["domain"],
                row["action"],
                bool(row["regressed"]),
                bool(row["comparable"]),
                row["reason"],
                row["cycle_id"],
            )
            for row in rows
        ]

    def runs_of_cycle(self, cycle_id: int) -> list[sqlite3.Row]:
        return self.connection.execute(
            "SELECT * FROM runs WHERE cycle_id = ? ORDER BY id", (cycle_id,)
        ).fetchall()


def _run_row(cycle_id: int, run: Run) -> tuple:
    return (
        cycle_id,
        run.task_id,
        run.domain,
        run.language,
        run.sample_index,
        run.prompt,
        run.text,
        run.prompt_tokens,
        run.completion_tokens,
        run.wall_seconds,
        run.tokens_per_second,
        run.finish_reason,
        run.rss_bytes,
        run.peak_rss_bytes,
        json.dumps(list(run.adapters)),
        run.error,
        json.dumps(run.routing) if run.routing is not None else None,
    )
