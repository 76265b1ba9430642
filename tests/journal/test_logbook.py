import json
from pathlib import Path

import git
import pytest

from daemon.records import (
    CycleRecord,
    DecideRecord,
    Decision,
    ExecuteRecord,
    Outcome,
    RecordVersionError,
    Run,
    cycle_from_json,
)
from journal.logbook import Logbook, parse_trailers


def make_record(cycle: int, outcome: Outcome = Outcome.OK, text: str = "Paris.") -> CycleRecord:
    run = Run(
        task_id="geo-france",
        domain="geography",
        language="en",
        prompt="Q: capital?\nA:",
        text=text,
        prompt_tokens=7,
        completion_tokens=3,
        wall_seconds=0.5,
        tokens_per_second=6.0,
        finish_reason="stop",
        rss_bytes=1,
        peak_rss_bytes=2,
        adapters=("geo/3",),
    )
    return CycleRecord(
        cycle=cycle,
        outcome=outcome,
        started_at="2026-12-04T10:00:00+00:00",
        finished_at="2026-12-04T10:00:05+00:00",
        trigger="manual",
        model={"name": "tiny", "backend": "llama_cpp", "sha256": "ab" * 32},
        summary="1/1 answered",
        execute=ExecuteRecord((run,), 0.5),
        decide=DecideRecord((Decision("geography", "retrain", "coherence fell"),), "test"),
    )


def test_commit_has_trailers(tmp_path: Path):
    logbook = Logbook(tmp_path / "journal")
    sha = logbook.commit_cycle(make_record(1))
    message = git.Repo(tmp_path / "journal").commit(sha).message
    assert parse_trailers(message) == {
        "A3X-Cycle": ["1"],
        "A3X-Outcome": ["ok"],
        "A3X-Decision": ["geography retrain"],
        "A3X-Adapter": ["geo/3"],
    }


def test_plain_git_reads_trailers(tmp_path: Path):
    logbook = Logbook(tmp_path / "journal")
    logbook.commit_cycle(make_record(1))
    logbook.commit_cycle(make_record(2, Outcome.DEGRADED))
    repo = git.Repo(tmp_path / "journal")
    outcomes = repo.git.log("--format=%(trailers:key=A3X-Outcome,valueonly)").split()
    assert outcomes == ["degraded", "ok"]


def test_entries_newest_first(tmp_path: Path):
    logbook = Logbook(tmp_path / "journal")
    for cycle in (1, 2, 3):
        logbook.commit_cycle(make_record(cycle))
    entries = list(logbook.entries(last=2))
    assert [entry.cycle for entry in entries] == [3, 2]
    assert entries[0].outcome == "ok"
    assert entries[0].subject == "cycle 3: ok, 1/1 answered"


def test_index_lists_newest_first(tmp_path: Path):
    logbook = Logbook(tmp_path / "journal")
    logbook.commit_cycle(make_record(1))
    logbook.commit_cycle(make_record(2, Outcome.FAILED))
    index = (tmp_path / "journal" / "index.md").read_text()
    rows = [line for line in index.splitlines() if line.startswith("| [")]
    assert rows[0].startswith("| [2](cycles/000002.md) |")
    assert "| failed |" in rows[0]
    assert rows[1].startswith("| [1](cycles/000001.md) |")


def test_record_round_trip(tmp_path: Path):
    logbook = Logbook(tmp_path / "journal")
    record = make_record(4)
    logbook.commit_cycle(record)
    assert logbook.read_cycle(4) == record


def test_newer_schema_rejected(tmp_path: Path):
    data = make_record(1).to_json()
    data["schema_version"] = 99
    with pytest.raises(RecordVersionError, match="schema_version 99; this A3X reads version 1"):
        cycle_from_json(data)


def test_backticks_in_answer_stay_fenced(tmp_path: Path):
    logbook = Logbook(tmp_path / "journal")
    logbook.commit_cycle(make_record(1, text="```\n# not a heading\n```"))
    page = (tmp_path / "journal" / "cycles" / "000001.md").read_text()
    assert "````text\n```\n# not a heading\n```\n````" in page


def test_pipe_in_answer_escaped(tmp_path: Path):
    logbook = Logbook(tmp_path / "journal")
    logbook.commit_cycle(make_record(1, text="a | b"))
    page = (tmp_path / "journal" / "cycles" / "000001.md").read_text()
    assert "| a \\| b |" in page


def test_json_record_has_schema_version(tmp_path: Path):
    logbook = Logbook(tmp_path / "journal")
    logbook.commit_cycle(make_record(1))
    data = json.loads((tmp_path / "journal" / "cycles" / "000001.json").read_text())
    assert data["schema_version"] == 1
    assert data["execute"]["runs"][0]["text"] == "Paris."


def test_trailers_ignore_body_lines():
    message = "subject\n\nA3X-Cycle: 9 in the body\n\nA3X-Cycle: 1\nSigned-off-by: x"
    assert parse_trailers(message) == {"A3X-Cycle": ["1"]}
