"""The a3x command line, run as a user runs it: a subprocess with its own environment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import git
import pytest


def a3x(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def journal_state(home: Path) -> tuple[str, str]:
    """HEAD and `git fsck` result of a home's journal."""
    repo = git.Repo(home / "journal")
    fsck = subprocess.run(
        ["git", "fsck", "--strict"], cwd=home / "journal", capture_output=True, text=True
    )
    assert fsck.returncode == 0, fsck.stderr
    assert not repo.is_dirty(untracked_files=True)
    return repo.head.commit.hexsha, repo.git.log("--format=%s")


def test_cycle_prints_summary_and_journal(env):
    result = a3x(env, "cycle")
    assert result.returncode == 0, result.stderr
    home = Path(env["A3X_HOME"])
    lines = result.stdout.splitlines()
    assert lines[0].startswith("cycle 1: ok, 5/5 answered")
    assert f"journal: {home / 'journal'} (commit " in result.stdout
    assert f"page:    {home / 'journal' / 'cycles' / '000001.md'}" in result.stdout


def test_logs_are_json_lines_off_terminal(env):
    result = a3x(env, "cycle")
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    names = [event["event"] for event in events]
    assert "cycle.started" in names
    assert "cycle.finished" in names
    finished = next(e for e in events if e["event"] == "cycle.finished")
    assert finished["outcome"] == "ok"
    assert finished["level"] == "info"


def test_cycle_json_output(env):
    result = a3x(env, "cycle", "--domain", "arithmetic", "--json")
    record = json.loads(result.stdout)
    assert record["schema_version"] == 1
    assert [run["task_id"] for run in record["execute"]["runs"]] == [
        "sum-two-three",
        "sum-four-five",
    ]


def test_journal_and_status(env):
    a3x(env, "cycle")
    a3x(env, "cycle", "--task", "geo-italy")
    journal = a3x(env, "journal", "--json")
    entries = json.loads(journal.stdout)
    assert [entry["trailers"]["A3X-Cycle"] for entry in entries] == [["2"], ["1"]]
    text = a3x(env, "journal", "--last", "1").stdout
    assert "cycle 2: ok, 1/1 answered" in text
    status = json.loads(a3x(env, "status", "--json").stdout)
    assert status["cycles"] == 2
    assert status["last_cycle"]["outcome"] == "ok"
    assert status["tasks"] == 5


def test_journal_before_first_cycle(env):
    result = a3x(env, "journal")
    assert result.returncode == 2
    assert "no journal at" in result.stderr
    assert "run `a3x cycle` first" in result.stderr


def test_tasks_validate_ok_and_bad(env, small_book, tmp_path):
    ok = a3x(env, "tasks", "validate", str(small_book))
    assert ok.returncode == 0
    assert "ok, 5 tasks in 2 domains" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('schema_version = 1\n[domains.geo]\n[[tasks]]\nid = "x"\ndomain = "geo"\n')
    result = a3x(env, "tasks", "validate", str(bad))
    assert result.returncode == 2
    assert f"invalid task book {bad}:" in result.stderr
    assert "missing key 'prompt'" in result.stderr


def test_tasks_validate_duplicate_across_books(env, small_book, tmp_path):
    copy = tmp_path / "copy.toml"
    copy.write_text(small_book.read_text())
    result = a3x(env, "tasks", "validate", str(small_book), str(copy))
    assert result.returncode == 2
    assert "is already used in" in result.stderr
    assert result.stdout.count(": ok,") == 2  # each book alone is valid


def test_malformed_task_book_keeps_journal(env, tmp_path):
    a3x(env, "cycle")
    home = Path(env["A3X_HOME"])
    before = journal_state(home)
    bad = tmp_path / "bad.toml"
    bad.write_text("schema_version = 1\n[[tasks]\nid=")
    result = a3x({**env, "A3X_TASKS__BOOKS": str(bad)}, "cycle")
    assert result.returncode == 2
    assert (
        f"a3x: error: invalid task book {bad}:\n  - not valid TOML: Expected ']]'" in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert journal_state(home) == before


@pytest.mark.parametrize("damage", ["missing", "truncated", "not_gguf"])
def test_bad_model_file_keeps_journal(env, tmp_path, tiny_gguf, damage):
    a3x(env, "cycle")
    home = Path(env["A3X_HOME"])
    before = journal_state(home)
    model = tmp_path / "model.gguf"
    if damage == "truncated":
        model.write_bytes(tiny_gguf.read_bytes()[:100_000])
    elif damage == "not_gguf":
        model.write_text("<html>404 Not Found</html>" * 10)
    result = a3x({**env, "A3X_MODEL__PATH": str(model)}, "cycle")
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("a3x: error: ")
    assert str(model) in message
    assert "Traceback" not in result.stderr
    assert journal_state(home) == before


@contextmanager
def unwritable(folder: Path) -> Iterator[None]:
    """Make a folder unwritable even for root (immutable flag), or by mode otherwise."""
    if os.geteuid() == 0:
        if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(folder)]).returncode:
            pytest.skip("chattr +i is not available to make a folder unwritable for root")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)


def test_unwritable_home_keeps_journal(env):
    a3x(env, "cycle")
    home = Path(env["A3X_HOME"])
    before = journal_state(home)
    with unwritable(home):
        result = a3x(env, "cycle")
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"a3x: error: home folder {home} is not writable")
    assert "--home or A3X_HOME" in message
    assert journal_state(home) == before


def test_home_under_a_file(env, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = a3x({**env, "A3X_HOME": str(blocker / "home")}, "cycle")
    assert result.returncode == 2
    assert "is a file, not a folder" in result.stderr


def test_no_command_prints_help(env):
    result = a3x(env)
    assert result.returncode == 2
    assert "usage: a3x" in result.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["cycle", "--domain", ""], "--domain is empty"),
        (["cycle", "--domain", "geography", "--task", "geo-italy"], "either --task or --domain"),
        (["cycle", "--domain", "astrology"], "no task in domain 'astrology'"),
        (["journal", "--last", "0"], "0 is below 1"),
        (["--log-level", "bogus", "status"], "invalid choice: 'bogus'"),
    ],
)
def test_bad_arguments_rejected(env, args, expected):
    result = a3x(env, *args)
    assert result.returncode == 2
    assert expected in result.stderr
    assert not (Path(env["A3X_HOME"]) / "journal" / "cycles").exists()


def test_status_shows_routing_and_budget(env):
    settings = {**env, "A3X_ROUTING__ENABLED": "true", "A3X_MODEL__ADAPTER_BUDGET_MB": "64"}
    text = a3x(settings, "status").stdout
    assert "adapters: by prompt similarity; budget 64 MiB" in text
    status = json.loads(a3x(env, "status", "--json").stdout)
    assert status["adapters"] == {"routing": False, "budget_mb": 256}


def test_failures_of_unknown_domain_rejected(env):
    a3x(env, "cycle")
    result = a3x(env, "failures", "--domain", "nope")
    assert result.returncode == 2
    assert "no domain 'nope' in the task book or the failures; known: " in result.stderr
    known = a3x(env, "failures", "--domain", "geography")
    assert known.returncode == 0
    assert "no failures recorded" in known.stdout


def test_status_on_file_home(env, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = a3x({**env, "A3X_HOME": str(blocker)}, "status")
    assert result.returncode == 2
    assert f"home folder {blocker} is a file, not a folder" in result.stderr


def test_scores_series_printed(env):
    a3x(env, "cycle")
    a3x(env, "cycle")
    text = a3x(env, "scores", "--evaluator", "execution").stdout
    header, *rows = text.splitlines()
    assert header.split()[:3] == ["score", "1", "2"]
    assert any(row.startswith("execution.empty_rate") for row in rows)
    data = json.loads(a3x(env, "scores", "--domain", "geography", "--json").stdout)
    coherence = next(item for item in data if item["score"] == "coherence.coherence")
    assert [point["cycle"] for point in coherence["values"]] == [1, 2]
    assert coherence["domain"] == "geography"


def test_show_prints_page_and_record(env):
    a3x(env, "cycle")
    assert a3x(env, "failures").stdout.strip() == "no failures recorded"
    page = a3x(env, "show", "1")
    assert page.returncode == 0
    assert page.stdout.startswith("# Cycle 1: ok")
    record = json.loads(a3x(env, "show", "1", "--json").stdout)
    assert record["cycle"] == 1
    missing = a3x(env, "show", "9")
    assert missing.returncode == 2
    assert "cycle 9 is not in the journal" in missing.stderr


def test_failures_lists_aborted_cycle(env):
    import sqlite3

    a3x(env, "cycle")
    # What a killed process leaves behind: a cycle row still marked running.
    db = sqlite3.connect(Path(env["A3X_HOME"]) / "state.sqlite")
    db.execute(
        "INSERT INTO cycles (started_at, trigger, outcome) VALUES ('2026-01-01', 'schedule', "
        "'running')"
    )
    db.commit()
    db.close()
    a3x(env, "cycle")
    found = json.loads(a3x(env, "failures", "--json").stdout)
    assert [(f["cycle"], f["kind"]) for f in found] == [(2, "aborted")]
    assert found[0]["reason"].startswith("the process stopped before the cycle finished")
