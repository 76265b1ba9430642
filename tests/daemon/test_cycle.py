"""Cycles on the tiny model with real SQLite and a real Git journal."""

from __future__ import annotations

import random
import sqlite3
import subprocess
import threading

import git
import pytest

from daemon.cycle import Agent, CycleRequest
from daemon.phases import plan_phase, weighted_sample
from daemon.records import Outcome
from daemon.taskbook import load_book
from runtime.backend import Generation
from tests.conftest import with_changes


@pytest.fixture
def agent(tiny_config):
    agent = Agent(tiny_config)
    yield agent
    agent.close()


def test_cycle_records_every_task(agent):
    record = agent.run_cycle()
    assert record.outcome is Outcome.OK
    assert record.cycle == 1
    assert [run.task_id for run in record.runs] == [
        "geo-france",
        "geo-italy",
        "geo-brasil-pt",
        "sum-two-three",
        "sum-four-five",
    ]
    assert all(run.text.strip() for run in record.runs)
    assert all(run.completion_tokens > 0 and run.wall_seconds > 0 for run in record.runs)
    assert record.summary.startswith("5/5 answered")


def test_cycle_committed_with_trailers(agent):
    agent.run_cycle()
    repo = git.Repo(agent.home.journal_path)
    message = repo.head.commit.message
    assert message.startswith("cycle 1: ok, 5/5 answered")
    assert "A3X-Cycle: 1\n" in message
    assert "A3X-Outcome: ok" in message
    files = repo.git.ls_files().split()
    assert [f for f in files if not f.startswith("plots/")] == [
        "cycles/000001.json",
        "cycles/000001.md",
        "index.json",
        "index.md",
    ]
    assert "plots/coherence-coherence.png" in files
    assert repo.is_dirty(untracked_files=True) is False


def test_cycle_page_lists_answers(agent):
    record = agent.run_cycle()
    page = (agent.home.journal_path / "cycles" / "000001.md").read_text()
    assert page.startswith("# Cycle 1: ok")
    assert "| geo-france | geography | en |" in page
    assert "### sum-four-five" in page
    assert record.runs[0].text.strip() in page
    assert "- geography: keep (no score regressed beyond noise)" in page


def test_cycle_rows_in_state(agent):
    agent.run_cycle()
    db = sqlite3.connect(agent.home.state_path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT id, outcome FROM cycles").fetchall() == [(1, "ok")]
    main = "SELECT count(*) FROM runs WHERE cycle_id = 1 AND sample_index = 0"
    samples = "SELECT count(*) FROM runs WHERE cycle_id = 1 AND sample_index > 0"
    assert db.execute(main).fetchone()[0] == 5
    # Consistency samples: 2 extra answers for 1 task a cycle.
    assert db.execute(samples).fetchone()[0] == 2
    commit = db.execute("SELECT journal_commit FROM cycles").fetchone()[0]
    assert commit == git.Repo(agent.home.journal_path).head.commit.hexsha


def test_every_two_skips_task_next_cycle(agent):
    agent.run_cycle()
    second = agent.run_cycle()
    third = agent.run_cycle()
    assert "geo-brasil-pt" not in [run.task_id for run in second.runs]
    assert second.plan.skipped_not_due == 1
    assert "geo-brasil-pt" in [run.task_id for run in third.runs]


def test_request_by_domain_and_task(agent):
    by_domain = agent.run_cycle(CycleRequest(domain="arithmetic"))
    assert {run.domain for run in by_domain.runs} == {"arithmetic"}
    by_task = agent.run_cycle(CycleRequest(task_ids=("geo-italy",)))
    assert [run.task_id for run in by_task.runs] == ["geo-italy"]


def test_unknown_task_request_rejected(agent):
    with pytest.raises(KeyError, match="unknown task id"):
        agent.run_cycle(CycleRequest(task_ids=("nope",)))


def test_weighted_sample_is_seeded(small_book):
    tasks = load_book(small_book).tasks
    first = weighted_sample(tasks, 2, random.Random(7))
    again = weighted_sample(tasks, 2, random.Random(7))
    assert [t.id for t in first] == [t.id for t in again]
    assert len(first) == 2


def test_weighted_sample_follows_weight(small_book):
    tasks = load_book(small_book).tasks  # sum-four-five weighs 3, the other four 1
    picks = [weighted_sample(tasks, 1, random.Random(seed))[0].id for seed in range(2000)]
    share = picks.count("sum-four-five") / len(picks)
    assert share == pytest.approx(3 / 7, abs=0.04)


def test_max_per_cycle_caps_plan(small_book):
    book = load_book(small_book)
    plan = plan_phase(book, CycleRequest(), {}, cycle_id=1, max_per_cycle=3)
    assert len(plan.tasks) == 3
    assert "3 picked by weight" in plan.reason


class FailingBackend:
    """Wraps a backend and raises on chosen prompts."""

    def __init__(self, inner, failing: set[str]):
        self.inner, self.failing = inner, failing
        self.name, self.model_path = inner.name, inner.model_path

    def generate(self, prompt, params) -> Generation:
        if any(word in prompt for word in self.failing):
            raise RuntimeError("decode failed")
        return self.inner.generate(prompt, params)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_failing_task_degrades_cycle(tiny_config):
    from runtime.loader import open_backend

    agent = Agent(tiny_config, lambda c, h: FailingBackend(open_backend(c, h), {"Italy"}))
    record = agent.run_cycle()
    agent.close()
    assert record.outcome is Outcome.DEGRADED
    failed = [run for run in record.runs if run.error]
    assert [run.task_id for run in failed] == ["geo-italy"]
    assert failed[0].error == "RuntimeError: decode failed"


def test_all_tasks_failing_fails_cycle(tiny_config):
    from runtime.loader import open_backend

    agent = Agent(tiny_config, lambda c, h: FailingBackend(open_backend(c, h), {""}))
    record = agent.run_cycle()
    agent.close()
    assert record.outcome is Outcome.FAILED
    message = git.Repo(agent.home.journal_path).head.commit.message
    assert "A3X-Outcome: failed" in message


def test_backend_load_error_recorded_as_failed(tiny_config):
    def broken(config, home):
        raise RuntimeError("out of memory while loading")

    agent = Agent(tiny_config, broken)
    record = agent.run_cycle()
    agent.close()
    assert record.outcome is Outcome.FAILED
    assert record.error == "RuntimeError: out of memory while loading"
    assert "failed before any task ran" in record.summary


def test_stop_event_ends_execute_early(agent):
    stop = threading.Event()
    stop.set()
    record = agent.run_cycle(stop=stop)
    assert record.runs == ()
    assert record.execute.stopped_early
    assert record.outcome is Outcome.DEGRADED


def test_unfinished_cycle_recorded_as_aborted(tiny_config):
    first = Agent(tiny_config)
    first.run_cycle()
    # A process that died mid-cycle leaves a 'running' row and maybe stray files.
    first.state.begin_cycle("2026-01-01T00:00:00+00:00", "schedule")
    (first.home.journal_path / "cycles" / "000002.json").write_text("{half")
    (first.home.journal_path / "index.md").write_text("garbage")
    (first.home.journal_path / ".git" / "index.lock").write_text("")
    first.close()

    second = Agent(tiny_config)
    record = second.run_cycle()
    second.close()

    assert record.cycle == 3
    log = git.Repo(tiny_config.home / "journal").git.log("--format=%s")
    assert log.splitlines()[1] == "cycle 2: aborted, the process stopped before the cycle finished"
    aborted = second.logbook.read_cycle(2)
    assert aborted.outcome is Outcome.ABORTED
    assert aborted.error == "found unfinished at the next start"
    fsck = subprocess.run(
        ["git", "fsck", "--strict"],
        cwd=tiny_config.home / "journal",
        capture_output=True,
        text=True,
    )
    assert fsck.returncode == 0, fsck.stderr


def test_cycle_committed_but_state_stale_is_synced(tiny_config):
    agent = Agent(tiny_config)
    record = agent.run_cycle()
    # Simulate a kill between the journal commit and the state update.
    agent.state.connection.execute(
        "UPDATE cycles SET outcome = 'running', journal_commit = NULL WHERE id = 1"
    )
    agent.state.connection.execute("DELETE FROM runs")
    agent.close()

    again = Agent(tiny_config)
    again.run_cycle()
    again.close()
    db = sqlite3.connect(tiny_config.home / "state.sqlite")
    assert db.execute("SELECT outcome FROM cycles WHERE id = 1").fetchone()[0] == "ok"
    assert db.execute("SELECT count(*) FROM runs WHERE cycle_id = 1").fetchone()[0] == len(
        record.execute.samples
    ) + len(record.runs)
    subjects = git.Repo(tiny_config.home / "journal").git.log("--format=%s").splitlines()
    assert not any("aborted" in subject for subject in subjects)
    commit = db.execute("SELECT journal_commit FROM cycles WHERE id = 1").fetchone()[0]
    assert commit == git.Repo(tiny_config.home / "journal").git.log(
        "-1", "--format=%H", "--", "cycles/000001.json"
    )


def test_second_cycle_waits_for_lock(tiny_config):
    from daemon.home import CycleBusyError, CycleLock

    agent = Agent(tiny_config)
    with CycleLock(agent.home.lock_path):
        with pytest.raises(CycleBusyError, match="another cycle is running in this home"):
            agent.run_cycle()
    agent.close()


def test_task_text_is_not_executed(tiny_config, tmp_path):
    marker = tmp_path / "pwned"
    book = tmp_path / "book.toml"
    book.write_text(
        'schema_version = 1\n[domains.geo]\n[[tasks]]\nid = "inject"\ndomain = "geo"\n'
        f'prompt = "$(touch {marker}); `touch {marker}` {{{{os.system}}}}"\n'
    )
    agent = Agent(with_changes(tiny_config, tasks={"books": (book,)}))
    record = agent.run_cycle()
    agent.close()
    assert record.outcome is Outcome.OK
    assert not marker.exists()
    assert f"$(touch {marker})" in record.runs[0].prompt
