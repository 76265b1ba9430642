"""Cycles with every evaluator, on answers that stress them."""

from __future__ import annotations

import json
from dataclasses import replace

import git
import pytest

from daemon.cycle import Agent
from daemon.records import Outcome
from runtime.backend import Generation
from runtime.loader import open_backend


class ScriptedBackend:
    """The tiny model, but with answers chosen by prompt substring."""

    def __init__(self, inner, answers: dict[str, str]):
        self.inner, self.answers = inner, answers
        self.name, self.model_path = inner.name, inner.model_path

    def generate(self, prompt, params) -> Generation:
        for key, text in self.answers.items():
            if key in prompt:
                return Generation(text, 5, max(1, len(text) // 4), 0.01, "stop")
        return self.inner.generate(prompt, params)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def scripted_agent(config, answers):
    return Agent(config, lambda c, h: ScriptedBackend(open_backend(c, h), answers))


def scores_of(record):
    return {(s.evaluator, s.name, s.domain, s.task_id): s for s in record.score.scores}


def test_cycle_has_every_evaluator(tiny_config):
    agent = Agent(tiny_config)
    record = agent.run_cycle()
    agent.close()
    assert record.score.evaluators == (
        "execution",
        "coherence",
        "diversity",
        "efficiency",
        "consistency",
        "perplexity",
    )
    assert record.score.notes == ()
    names = {(s.evaluator, s.name) for s in record.score.scores}
    assert ("coherence", "coherence") in names
    assert ("diversity", "entropy") in names
    assert ("consistency", "agreement") in names
    assert record.execute.samples
    assert record.phase_seconds.keys() >= {"plan", "execute", "ingest", "score", "decide"}


def test_contradiction_reaches_journal(tiny_config):
    agent = scripted_agent(
        tiny_config,
        {
            "France": "The capital of France is Paris.",
            "Italy": "The capital of France is Lyon.",
        },
    )
    record = agent.run_cycle()
    agent.close()
    scores = scores_of(record)
    coherence = scores[("coherence", "coherence", None, None)]
    assert coherence.value < 1.0
    evidence = coherence.evidence["contradictions"][0]
    assert {f["task"] for f in evidence["facts"]} == {"geo-france", "geo-italy"}
    assert all(len(f["runs"]) == 1 for f in evidence["facts"])
    page = (agent.home.journal_path / "cycles" / "000001.md").read_text()
    assert "functional: france capital paris (task geo-france; cycle 1)" in page
    assert "france capital lyon (task geo-italy; cycle 1)" in page


def test_baseline_flags_drop_after_history(tiny_config):
    agreeing = {
        "France": "The capital of France is Paris.",
        "Italy": "Rome is the capital of Italy.",
    }
    agent = scripted_agent(tiny_config, agreeing)
    for _ in range(4):
        agent.run_cycle()
    agent.close()
    clashing = {
        "France": "The capital of France is Paris.",
        "Italy": "The capital of France is Nice.",
    }
    agent = scripted_agent(tiny_config, clashing)
    record = agent.run_cycle()
    agent.close()
    coherence = scores_of(record)[("coherence", "coherence", "geography", None)]
    assert coherence.baseline["verdict"] == "worse"
    assert coherence.baseline["count"] == 4
    assert "regressed beyond noise: coherence.coherence" in record.decide.decisions[1].reason
    assert "coherence" in record.summary


@pytest.mark.parametrize(
    ("answer", "label"),
    [
        ("", "empty"),
        ("bad \udcff bytes \ud800 here", "lone surrogates"),
        ("Paris is the capital of France. " * 3200, "100,000 characters"),
    ],
)
def test_bad_answers_get_defined_scores(tiny_config, answer, label):
    agent = scripted_agent(tiny_config, {"Q:": answer, "P:": answer})
    record = agent.run_cycle()
    agent.close()
    assert record.error is None, label
    assert record.score.notes == (), label
    assert record.outcome in (Outcome.OK, Outcome.DEGRADED)
    data = json.loads((agent.home.journal_path / "cycles" / "000001.json").read_text())
    assert data["cycle"] == 1
    for score in record.score.scores:
        assert score.value == score.value, f"{score.evaluator}.{score.name} is NaN for {label}"


def test_corrupt_memory_rebuilt(tiny_config):
    agent = Agent(tiny_config)
    agent.run_cycle()
    agent.close()
    memory_file = tiny_config.home / "memory.faiss"
    memory_file.write_bytes(b"\x00garbage" * 50)

    agent = Agent(tiny_config)
    record = agent.run_cycle()
    agent.close()
    assert record.outcome is Outcome.OK
    assert "moved to" in record.ingest.note
    # The rebuild reads every stored answer: 5 of cycle 1 and the 4 just answered.
    assert "memory rebuilt from 9 stored answers" in record.ingest.note
    assert list(tiny_config.home.glob("memory.faiss.corrupt-*"))
    from knowledge.memory import AnswerMemory

    assert len(AnswerMemory(memory_file, 384)) == 9


def test_failing_evaluator_noted(tiny_config):
    from daemon.config import ScoreConfig

    agent = Agent(replace(tiny_config, score=ScoreConfig(enabled=("execution", "perplexity"))))

    def broken(context):
        raise RuntimeError("corpus exploded")

    agent.evaluators[1].score = broken
    record = agent.run_cycle()
    agent.close()
    assert record.outcome is Outcome.OK
    assert record.score.notes == ("perplexity failed: RuntimeError: corpus exploded",)
    page = (agent.home.journal_path / "cycles" / "000001.md").read_text()
    assert "Note: perplexity failed" in page


def test_plots_committed_each_cycle(tiny_config):
    agent = Agent(tiny_config)
    agent.run_cycle()
    agent.run_cycle()
    agent.close()
    repo = git.Repo(tiny_config.home / "journal")
    changed = repo.git.show("--name-only", "--format=", "HEAD").split()
    assert "plots/coherence-coherence.png" in changed
    assert (tiny_config.home / "journal" / "plots" / "diversity-entropy.png").stat().st_size > 1000
