"""The specialization policy on gate records: own domain, chains of incumbents, other
domains, records without an incumbent, and the owner's activation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora.registry import RECORD_FILE, AdapterRegistry, AdapterStatus
from lora.specialize import SpecializationPolicy, incumbent_of, specialization
from tests.lora.registry_fixtures import add_version, gate_record

ACCEPTED, REJECTED = AdapterStatus.ACCEPTED, AdapterStatus.REJECTED


@pytest.fixture
def registry(tmp_path: Path) -> AdapterRegistry:
    return AdapterRegistry(tmp_path / "adapters")


def test_gain_over_base_beats_base(registry, tiny_gguf):
    adapter = add_version(registry, "geo", ACCEPTED, tiny_gguf, 1, gate_record("geo", -0.2))
    verdict = specialization(registry, adapter, "geo")
    assert verdict.beats_base
    assert verdict.base_perplexity == pytest.approx(20.0)
    assert verdict.adapter_perplexity == pytest.approx(16.0)
    assert "against the base" in verdict.reason


def test_gain_within_noise_leaves_base(registry, tiny_gguf):
    adapter = add_version(registry, "geo", REJECTED, tiny_gguf, 1, gate_record("geo", -0.01))
    verdict = specialization(registry, adapter, "geo")
    assert not verdict.beats_base
    assert "not beyond the gain needed (2.0%)" in verdict.reason


def test_chain_of_gains_beats_base(registry, tiny_gguf):
    add_version(registry, "geo", ACCEPTED, tiny_gguf, 1, gate_record("geo", -0.2))
    second = add_version(
        registry, "geo", ACCEPTED, tiny_gguf, 2, gate_record("geo", -0.1), incumbent="geo/v1"
    )
    verdict = specialization(registry, second, "geo")
    assert verdict.beats_base
    assert "against geo/v1" in verdict.reason
    assert verdict.base_perplexity == pytest.approx(20.0)


def test_gain_over_weak_incumbent_leaves_base(registry, tiny_gguf):
    add_version(registry, "geo", REJECTED, tiny_gguf, 1, gate_record("geo", 0.01))
    second = add_version(
        registry, "geo", ACCEPTED, tiny_gguf, 2, gate_record("geo", -0.1), incumbent="geo/v1"
    )
    verdict = specialization(registry, second, "geo")
    assert not verdict.beats_base
    assert "geo/v1 does not beat the base" in verdict.reason


def test_removed_incumbent_leaves_base(registry, tiny_gguf):
    first = add_version(registry, "geo", ACCEPTED, tiny_gguf, 1, gate_record("geo", -0.2))
    second = add_version(
        registry, "geo", ACCEPTED, tiny_gguf, 2, gate_record("geo", -0.1), incumbent="geo/v1"
    )
    registry.remove(first, force=True)
    verdict = specialization(registry, second, "geo")
    assert not verdict.beats_base
    assert "no longer in the registry" in verdict.reason


def test_record_without_incumbent_reads_older_accepted(registry, tiny_gguf):
    add_version(registry, "geo", ACCEPTED, tiny_gguf, 1, gate_record("geo", -0.2))
    add_version(registry, "geo", REJECTED, tiny_gguf, 2, gate_record("geo", 0.0))
    third = add_version(registry, "geo", ACCEPTED, tiny_gguf, 3, gate_record("geo", -0.1))
    path = third.folder / RECORD_FILE
    record = json.loads(path.read_text())
    del record["incumbent"]
    path.write_text(json.dumps(record))
    assert incumbent_of(registry, registry.get("geo/v3")) == "geo/v1"


@pytest.mark.parametrize(
    ("change", "beats"), [(-0.10, True), (-0.03, False), (0.04, False)], ids=str
)
def test_other_domain_needs_gain_beyond_tolerance(registry, tiny_gguf, change, beats):
    gate = gate_record("geo", -0.2, {"science": change})
    adapter = add_version(registry, "geo", ACCEPTED, tiny_gguf, 1, gate)
    verdict = specialization(registry, adapter, "science")
    assert verdict.beats_base is beats
    assert verdict.base_perplexity == pytest.approx(30.0)


def test_unmeasured_domain_leaves_base(registry, tiny_gguf):
    adapter = add_version(registry, "geo", ACCEPTED, tiny_gguf, 1, gate_record("geo", -0.2))
    verdict = specialization(registry, adapter, "code")
    assert not verdict.beats_base
    assert verdict.reason == "its gate record has no evidence on code"


def test_ungated_adapter_leaves_base(registry, tiny_gguf):
    adapter = add_version(registry, "geo", REJECTED, tiny_gguf, 1, gate=None)
    assert not specialization(registry, adapter, "geo").beats_base


def test_owner_activation_allows_own_domain(registry, tiny_gguf):
    adapter = add_version(registry, "geo", REJECTED, tiny_gguf, 1, gate_record("geo", 0.0))
    activated = registry.activate(adapter, by="alice")
    policy = SpecializationPolicy(registry, {activated.name: activated})
    assert policy.judge("geo/v1", "geo").beats_base
    assert policy.judge("geo/v1", "geo").reason == "activated by the owner"
    assert not policy.judge("geo/v1", "science").beats_base
