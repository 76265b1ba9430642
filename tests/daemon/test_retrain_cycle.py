"""Retraining inside real cycles on the tiny model: accepted, rejected, failed and
refused rounds, each a journal commit, and an accepted adapter serving the next cycle."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import git
import pytest

from daemon.config import Config
from daemon.cycle import Agent
from daemon.phases import CycleRequest
from lora.registry import AdapterStatus
from tests.conftest import DATA, with_changes

FAST_TRAINING = dict(
    rank=4,
    targets=("q_proj", "v_proj"),
    accumulation=1,
    epochs=4.0,
    learning_rate=0.005,
)


@pytest.fixture
def retrain_config(tiny_config: Config) -> Config:
    return with_changes(
        tiny_config,
        tasks={"books": (DATA / "retrain_book.toml",)},
        score={"enabled": ("execution", "coherence")},
        retrain=FAST_TRAINING,
    )


def trailers(home: Path, key: str) -> list[str]:
    log = git.Repo(home / "journal").git.log(f"--format=%(trailers:key={key},valueonly)")
    return [line for line in log.split("\n") if line.strip()]


def retrain_geography(agent: Agent) -> dict:
    record = agent.run_cycle(CycleRequest(domain="geography", retrain=("geography",)))
    assert record.retrain is not None
    (result,) = record.retrain.rounds
    return result


def test_accepted_adapter_serves_next_cycle(retrain_config: Config):
    config = with_changes(retrain_config, retrain={**FAST_TRAINING, "tolerance": 100.0})
    agent = Agent(config)
    before = agent.run_cycle()
    result = retrain_geography(agent)
    after = agent.run_cycle()
    agent.close()

    assert result["outcome"] == "accepted", result["message"]
    assert result["adapter"] == "geography/v1"
    served = agent.registry.serving("geography")
    assert served is not None and served.gguf_path.exists()
    assert served.record["incumbent"] == ""
    profile = json.loads((served.folder / "profile.json").read_text())
    assert profile["source"] == "training set"
    assert (served.folder / "profile.npy").exists()

    geography = [run for run in after.runs if run.domain == "geography"]
    assert geography and all(run.adapters == ("geography/v1",) for run in geography)
    assert all(not run.adapters for run in after.runs if run.domain == "arithmetic")
    old = {run.task_id: run.text for run in before.runs}
    assert any(run.text != old[run.task_id] for run in geography if run.task_id in old)

    home = config.home
    assert "accepted" in trailers(home, "A3X-Decision")
    assert "geography/v1" in trailers(home, "A3X-Adapter")
    page = (home / "journal" / "decisions" / "geography-v1.md").read_text()
    assert "## Evidence" in page
    assert "geography (retrained) | held-out perplexity" in page
    assert (home / "journal" / "decisions" / "geography-v1-loss.png").stat().st_size > 1000
    cycle_page = (home / "journal" / "cycles" / f"{after.cycle:06d}.md").read_text()
    assert "| geography/v1 |" in cycle_page


def test_rejected_adapter_is_kept_but_not_served(retrain_config: Config):
    config = with_changes(retrain_config, retrain={**FAST_TRAINING, "min_gain": 0.99})
    agent = Agent(config)
    result = retrain_geography(agent)
    next_cycle = agent.run_cycle()
    agent.close()

    assert result["outcome"] == "rejected"
    assert "does not pass the gain needed" in result["message"]
    (adapter,) = agent.registry.versions("geography")
    assert adapter.status is AdapterStatus.REJECTED
    assert adapter.gguf_path.exists()
    assert agent.registry.serving("geography") is None
    assert all(not run.adapters for run in next_cycle.runs)
    assert "rejected" in trailers(config.home, "A3X-Decision")


def test_killed_training_leaves_agent_working(retrain_config: Config, monkeypatch):
    import lora.child
    import lora.retrain

    original = lora.child.run_training_child

    def kill_after_start(spec, budget, stop=None, on_event=None, on_start=None):
        def on_start_kill(pid: int) -> None:
            threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()

        return original(spec, budget, stop, on_event, on_start_kill)

    monkeypatch.setattr(lora.retrain, "run_training_child", kill_after_start)
    config = with_changes(retrain_config, retrain={**FAST_TRAINING, "epochs": 10_000.0})
    agent = Agent(config)
    result = retrain_geography(agent)
    later = agent.run_cycle()
    agent.close()

    assert result["outcome"] == "failed"
    assert "killed by signal 9" in result["message"]
    (adapter,) = agent.registry.versions("geography")
    assert adapter.status is AdapterStatus.FAILED
    assert later.outcome.value == "ok"
    assert "failed" in trailers(config.home, "A3X-Decision")


def test_over_budget_round_is_refused(retrain_config: Config):
    config = with_changes(retrain_config, retrain={**FAST_TRAINING, "memory_budget_mb": 256})
    agent = Agent(config)
    result = retrain_geography(agent)
    agent.close()

    assert result["outcome"] == "refused"
    assert "over the budget of 0.25 GiB" in result["message"]
    assert "retrain.memory_budget_mb" in result["message"]
    assert agent.registry.versions("geography") == []
    assert "refused" in trailers(config.home, "A3X-Decision")
    pages = list((config.home / "journal" / "decisions").glob("geography-cycle*.md"))
    assert len(pages) == 1


def test_unknown_domain_to_retrain(retrain_config: Config):
    agent = Agent(retrain_config)
    with pytest.raises(KeyError, match="unknown domain"):
        agent.run_cycle(CycleRequest(retrain=("history",)))
    agent.close()
