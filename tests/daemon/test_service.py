"""`a3x run` as a real process: scheduled cycles, SIGHUP reload, clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import git
import pytest


def start(env: dict[str, str], **extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "run"],
        env={**env, **extra},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_cycles(home: Path, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (home / "journal" / "cycles" / f"{count:06d}.json").exists():
            time.sleep(0.3)  # let the commit land
            return
        time.sleep(0.1)
    raise AssertionError(f"no cycle {count} within {timeout} s")


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_scheduled_cycles_then_clean_stop(env, stop_signal):
    home = Path(env["A3X_HOME"])
    # 0.02 minutes: a cycle every 1.2 s, the first one at start.
    process = start(env, A3X_SCHEDULE__RUN_ON_START="true", A3X_SCHEDULE__INTERVAL_MINUTES="0.02")
    try:
        wait_for_cycles(home, 2)
    finally:
        process.send_signal(stop_signal)
        stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    names = [event["event"] for event in events(stdout)]
    assert names[0] in ("model.probing", "model.loaded")
    assert "service.started" in names
    assert names[-1] == "service.stopped"
    repo = git.Repo(home / "journal")
    subjects = repo.git.log("--format=%s").splitlines()
    assert all(": ok, " in subject for subject in subjects)
    assert len(subjects) >= 2
    assert not repo.is_dirty(untracked_files=True)


def test_sighup_reloads_task_book(env, tmp_path):
    process = start(env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if '"service.started"' in line:
                break
        process.send_signal(signal.SIGHUP)
        time.sleep(1.0)
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, _ = process.communicate(timeout=60)
    assert process.returncode == 0
    reloaded = [e for e in events(stdout) if e["event"] == "service.reloaded"]
    assert reloaded and reloaded[0]["tasks"] == 5


def test_sigterm_mid_cycle_records_stop(env, tmp_path):
    slow = tmp_path / "slow.toml"
    slow.write_text(
        "schema_version = 1\n[domains.geo]\n"
        + "".join(
            f'[[tasks]]\nid = "t{i}"\ndomain = "geo"\nprompt = "the capital is"\n'
            "[tasks.sampling]\nmax_tokens = 400\ntemperature = 0.0\n"
            for i in range(200)
        )
    )
    home = Path(env["A3X_HOME"])
    process = start(env, A3X_SCHEDULE__RUN_ON_START="true", A3X_TASKS__BOOKS=str(slow))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if '"cycle.started"' in process.stdout.readline():
                break
        time.sleep(1.0)
    finally:
        process.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        process.communicate(timeout=60)
    assert process.returncode == 0
    assert time.monotonic() - stopped_at < 30
    record = json.loads((home / "journal" / "cycles" / "000001.json").read_text())
    assert record["outcome"] == "degraded"
    assert record["execute"]["stopped_early"] is True
    assert 0 < len(record["execute"]["runs"]) < 200
    page = (home / "journal" / "cycles" / "000001.md").read_text()
    assert "Stopped early" in page
