"""Routing inside real cycles on the tiny model: each task's adapters come from the
router and the specialization policy, and the decision reaches state, the cycle record
and the cycle page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.config import Config
from daemon.cycle import Agent
from lora.registry import AdapterRegistry, AdapterStatus
from tests.conftest import with_changes
from tests.lora.registry_fixtures import add_version, gate_record


@pytest.fixture
def routed_config(tiny_config: Config, tiny_gguf: Path) -> Config:
    """Geography and arithmetic adapters that beat the base on their own domain only."""
    registry = AdapterRegistry(tiny_config.home / "adapters")
    for seed, domain in enumerate(("geography", "arithmetic")):
        other = "arithmetic" if domain == "geography" else "geography"
        gate = gate_record(domain, -0.2, {other: 0.01})
        add_version(registry, domain, AdapterStatus.ACCEPTED, tiny_gguf, seed, gate)
    return with_changes(
        tiny_config,
        score={"enabled": ("execution",)},
        routing={"enabled": True, "floor": 0.1, "top_k": 2},
    )


def test_routed_cycle_records_decisions(routed_config: Config):
    agent = Agent(routed_config)
    record = agent.run_cycle()
    rows = agent.state.runs_of_cycle(record.cycle)
    agent.close()

    assert record.runs
    for run in record.runs:
        assert run.routing is not None
        assert run.adapters == (f"{run.domain}/v1",), run.routing
        assert run.routing["adapters"][0]["weight"] == pytest.approx(1.0)
        for skipped in run.routing["skipped"]:
            assert not skipped["adapter"].startswith(run.domain)
            assert "not better beyond tolerance" in skipped["reason"]
    stored = {row["task_id"]: json.loads(row["routing"]) for row in rows}
    assert stored == {run.task_id: run.routing for run in record.runs}
    assert record.plan is not None
    assert "adapters by routing" in record.plan.reason
    assert all(task.scales == (1.0,) for task in record.plan.tasks)


def test_routed_cycle_page_and_record(routed_config: Config):
    agent = Agent(routed_config)
    record = agent.run_cycle()
    page = agent.logbook.cycle_page_path(record.cycle).read_text()
    stored = agent.logbook.read_cycle(record.cycle)
    agent.close()

    assert "## Routing" in page
    assert "| geo-france | geography | en | geography/v1 (1.00) |" in page
    assert "| geo-france | geography | geography/v1: 1.00 (" in page
    assert [run.routing for run in stored.runs] == [run.routing for run in record.runs]
    assert stored.plan is not None
    assert stored.plan.tasks == record.plan.tasks


def test_profiles_built_on_first_use(routed_config: Config):
    agent = Agent(routed_config)
    agent.run_cycle()
    agent.close()
    info = json.loads((routed_config.home / "adapters/geography/v1/profile.json").read_text())
    assert info["source"] == "task book"


def test_high_floor_leaves_base(routed_config: Config):
    config = with_changes(routed_config, routing={"enabled": True, "floor": 0.99})
    agent = Agent(config)
    record = agent.run_cycle()
    agent.close()

    # A task whose prompt is the whole profile of its adapter reaches similarity 1.
    below = [run for run in record.runs if run.routing["nearest"]["similarity"] < 0.99]
    assert len(below) >= 3
    assert all(run.adapters == () for run in below)


def test_routing_off_keeps_domain_adapter(routed_config: Config):
    config = with_changes(routed_config, routing={"enabled": False})
    agent = Agent(config)
    record = agent.run_cycle()
    rows = agent.state.runs_of_cycle(record.cycle)
    agent.close()

    assert all(run.adapters == (f"{run.domain}/v1",) for run in record.runs)
    assert all(run.routing is None for run in record.runs)
    assert all(row["routing"] is None for row in rows)


def test_other_base_adapter_not_served(routed_config: Config, tmp_path: Path):
    from bench.tiny_model import TinyConfig, write_tiny_gguf

    other = write_tiny_gguf(tmp_path / "other.gguf", TinyConfig(seed=9))
    config = with_changes(routed_config, model={"path": other})
    agent = Agent(config)
    assert agent.serving_adapters() == {}
    agent.close()


class RecordingBackend:
    """The tiny model, recording adapter prefetches and generations in order."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.name, self.model_path = inner.name, inner.model_path

    def prefetch_adapters(self, adapters):
        loaded = self.inner.prefetch_adapters(adapters)
        domains = [Path(adapter.path).parent.parent.name for adapter in adapters]
        self.calls.append(("prefetch", domains, loaded))
        return loaded

    def generate(self, prompt, params):
        self.calls.append(("generate", prompt, None))
        return self.inner.generate(prompt, params)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_routed_adapters_prefetched_before_the_first_task(routed_config: Config):
    from runtime.loader import open_backend

    backends: list[RecordingBackend] = []

    def recording(config, home):
        backends.append(RecordingBackend(open_backend(config, home)))
        return backends[-1]

    agent = Agent(routed_config, recording)
    record = agent.run_cycle()
    agent.close()
    calls = backends[0].calls
    assert calls[0][0] == "prefetch"
    used = list(dict.fromkeys(name.split("/")[0] for run in record.runs for name in run.adapters))
    assert calls[0][1] == used  # each routed adapter once, in the order of first use
    assert len(calls[0][2]) == len(used)  # both fit the default budget
    assert [kind for kind, _, _ in calls].count("prefetch") == 1


def test_adapter_budget_setting_reaches_the_cache(routed_config: Config):
    from daemon.home import Home
    from runtime.loader import open_backend

    config = with_changes(routed_config, model={"adapter_budget_mb": 3})
    backend = open_backend(config, Home(config.home))
    try:
        assert backend.adapter_cache.budget_bytes == 3 * 2**20
    finally:
        backend.close()


def test_layer_scales_of_the_record_reach_the_backend(routed_config: Config):
    """Per-layer scales set with `a3x adapters layers` apply from the next cycle: the
    llama.cpp backend loads a derived file, cached in the home, for that adapter."""
    from lora.layers import LayerScales

    registry = AdapterRegistry(routed_config.home / "adapters")
    geography = registry.serving("geography")
    registry.set_layer_scales(geography, LayerScales.parse({"layers": {"1": 0.0}}), "test")
    agent = Agent(routed_config)
    record = agent.run_cycle()
    derived = sorted((routed_config.home / "cache/derived-adapters").glob("*.gguf"))
    page = agent.logbook.cycle_page_path(record.cycle).read_text()
    stored = agent.logbook.read_cycle(record.cycle)
    agent.close()
    assert any(run.adapters == ("geography/v1",) and run.ok for run in record.runs)
    assert len(derived) == 1
    scales = {"default": 1.0, "layers": {"1": 0.0}}
    assert stored.plan.layer_scales == {"geography/v1": scales}
    assert 'Per-layer scales of geography/v1: `{"default": 1.0, "layers": {"1": 0.0}}`' in page
    from lora.gguf_adapter import read_gguf_adapter

    targets = read_gguf_adapter(derived[0], load_tensors=False).pairs
    assert sorted(targets) == ["blk.0.attn_v.weight"]  # block 1 at 0 is left out


def test_pinned_version_stays_loaded(routed_config: Config):
    registry = AdapterRegistry(routed_config.home / "adapters")
    geography = registry.pin(registry.serving("geography"), "test")
    agent = Agent(routed_config)
    agent.run_cycle()
    pinned = {e.path for e in agent.backend.adapter_cache.entries() if e.pinned}
    assert pinned == {geography.gguf_path}

    registry.unpin(geography, "test")
    agent.run_cycle()
    pinned = {e.path for e in agent.backend.adapter_cache.entries() if e.pinned}
    agent.close()
    assert pinned == set()


def test_over_budget_fails_tasks_only(routed_config: Config):
    """Every task here is routed to an adapter, so every run fails with the budget
    error, but the execute phase runs them all and records each one."""
    from runtime.loader import open_backend

    def small_budget(config, home):
        backend = open_backend(config, home)
        backend.adapter_cache.budget_bytes = 100  # under any adapter's size
        return backend

    agent = Agent(routed_config, small_budget)
    record = agent.run_cycle()
    agent.close()
    assert record.error is None  # no phase failed
    assert len(record.runs) == len(record.plan.tasks)
    for run in record.runs:
        assert run.adapters
        assert "could not be applied: AdapterBudgetError" in run.error
        assert "[model] adapter_budget_mb" in run.error


def test_candidate_of_an_interrupted_round_marked_failed(routed_config: Config, tiny_gguf: Path):
    """A candidate exists only while its round runs. So one found at the start of a
    cycle was left by a process that stopped during its round."""
    registry = AdapterRegistry(routed_config.home / "adapters")
    candidate = add_version(registry, "geography", AdapterStatus.CANDIDATE, tiny_gguf, 9, {})
    agent = Agent(routed_config)
    agent.run_cycle()
    agent.close()
    after = registry.get(candidate.name)
    assert after.status is AdapterStatus.FAILED
    assert "round was interrupted" in after.record["error"]
    assert registry.serving("geography").version == 1  # the accepted version still serves
