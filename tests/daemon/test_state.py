import sqlite3
from pathlib import Path

import pytest

from daemon.state import MIGRATIONS, STATE_SCHEMA_VERSION, StateError, StateStore


def test_version_one_database_migrated(tmp_path: Path):
    path = tmp_path / "state.sqlite"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[1])
    db.execute("INSERT INTO cycles (started_at, trigger, outcome) VALUES ('t', 'manual', 'ok')")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()

    store = StateStore(path)
    assert store.connection.execute("PRAGMA user_version").fetchone()[0] == STATE_SCHEMA_VERSION
    tables = {row[0] for row in store.connection.execute("SELECT name FROM sqlite_master")}
    assert {"facts", "entities", "relations", "scores", "runs", "cycles"} <= tables
    assert store.cycle_count() == 1


def test_newer_database_rejected(tmp_path: Path):
    path = tmp_path / "state.sqlite"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    expected = f"schema version 99, but this A3X supports up to {STATE_SCHEMA_VERSION}"
    with pytest.raises(StateError, match=expected):
        StateStore(path)


def test_version_three_runs_gain_routing(tmp_path: Path):
    path = tmp_path / "state.sqlite"
    db = sqlite3.connect(path)
    for version in (1, 2, 3):
        db.executescript(MIGRATIONS[version])
    db.execute("INSERT INTO cycles (started_at, trigger, outcome) VALUES ('t', 'manual', 'ok')")
    db.execute(
        """INSERT INTO runs (cycle_id, task_id, domain, language, prompt, text, prompt_tokens,
        completion_tokens, wall_seconds, tokens_per_second, finish_reason, rss_bytes,
        peak_rss_bytes) VALUES (1, 'geo', 'geography', 'en', 'Q', 'A', 1, 1, 0.1, 10, 'stop',
        1, 1)"""
    )
    db.execute("PRAGMA user_version = 3")
    db.commit()
    db.close()

    store = StateStore(path)
    (row,) = store.runs_of_cycle(1)
    assert row["routing"] is None
    assert row["text"] == "A"


def test_corrupt_database_named(tmp_path: Path):
    path = tmp_path / "state.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError, match=f"{path} cannot be opened as SQLite"):
        StateStore(path)
