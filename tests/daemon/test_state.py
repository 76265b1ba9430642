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
    with pytest.raises(StateError, match="schema version 99, but this A3X supports up to 3"):
        StateStore(path)


def test_corrupt_database_named(tmp_path: Path):
    path = tmp_path / "state.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError, match=f"{path} cannot be opened as SQLite"):
        StateStore(path)
