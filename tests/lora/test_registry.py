"""The adapter registry: which version serves, the owner's overrides, pins, removal,
record versions and the base check, on real version folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.tiny_model import TinyConfig, write_tiny_gguf
from lora import LoraError
from lora.metadata import BaseModelRef
from lora.registry import (
    RECORD_FILE,
    AdapterRegistry,
    AdapterStatus,
    base_mismatch,
    parse_adapter_name,
)
from runtime.gguf_file import check_model_file, sha256_of_file
from tests.lora.registry_fixtures import add_version, gate_record

ACCEPTED, REJECTED = AdapterStatus.ACCEPTED, AdapterStatus.REJECTED


@pytest.fixture
def registry(tmp_path: Path) -> AdapterRegistry:
    return AdapterRegistry(tmp_path / "adapters")


@pytest.fixture
def geography(registry: AdapterRegistry, tiny_gguf: Path) -> AdapterRegistry:
    """geography/v1 accepted, v2 rejected, v3 accepted."""
    add_version(registry, "geography", ACCEPTED, tiny_gguf, 1, gate_record("geography", -0.2))
    add_version(registry, "geography", REJECTED, tiny_gguf, 2, gate_record("geography", 0.0))
    add_version(registry, "geography", ACCEPTED, tiny_gguf, 3, gate_record("geography", -0.1))
    return registry


def serving_name(registry: AdapterRegistry, domain: str = "geography") -> str | None:
    adapter = registry.serving(domain)
    return adapter.name if adapter else None


def test_gate_choice_serves(geography):
    assert serving_name(geography) == "geography/v3"


def test_activate_overrides_gate(geography):
    changed = geography.activate(geography.get("geography/v2"), by="alice")
    assert serving_name(geography) == "geography/v2"
    assert changed.record["owner"]["serving"] is True
    assert changed.record["owner"]["by"] == "alice"
    assert changed.record["owner_history"][-1]["action"] == "activate"
    assert changed.record["schema_version"] == 2


def test_second_activation_replaces_first(geography):
    geography.activate(geography.get("geography/v2"), by="alice")
    geography.activate(geography.get("geography/v1"), by="alice")
    assert serving_name(geography) == "geography/v1"
    assert geography.get("geography/v2").owner_serving is None


def test_deactivated_gate_choice_leaves_base(geography):
    geography.deactivate(geography.get("geography/v3"), by="alice")
    assert serving_name(geography) is None
    assert geography.get("geography/v3").owner_serving is False


def test_deactivated_activation_returns_to_gate(geography):
    geography.activate(geography.get("geography/v1"), by="alice")
    geography.deactivate(geography.get("geography/v1"), by="alice")
    assert serving_name(geography) == "geography/v3"


def test_candidate_cannot_be_activated(geography, tiny_gguf):
    candidate = add_version(geography, "geography", AdapterStatus.CANDIDATE, tiny_gguf, 4)
    with pytest.raises(LoraError, match="candidate still in its retraining round"):
        geography.activate(candidate)


def test_failed_version_cannot_serve(geography):
    failed = geography.set_status(geography.get("geography/v2"), AdapterStatus.FAILED)
    with pytest.raises(LoraError, match="is failed .* cannot serve"):
        geography.activate(failed)


def test_pin_blocks_removal(geography):
    geography.pin(geography.get("geography/v1"), by="alice")
    with pytest.raises(LoraError, match="it is pinned"):
        geography.remove(geography.get("geography/v1"))
    assert [a.name for a in geography.pinned()] == ["geography/v1"]


def test_repeated_pin_and_unpin_change_nothing(geography):
    first = geography.pin(geography.get("geography/v1"), by="alice")
    again = geography.pin(geography.get("geography/v1"), by="bob")
    assert again.record == first.record  # still alice's pin, one history entry
    assert [e["action"] for e in again.record["owner_history"]] == ["pin"]
    geography.unpin(again, by="alice")
    unpinned = geography.unpin(geography.get("geography/v1"), by="alice")
    assert [e["action"] for e in unpinned.record["owner_history"]] == ["pin", "unpin"]


def test_serving_version_not_removed(geography):
    with pytest.raises(LoraError, match="it serves its domain .* or pass --force"):
        geography.remove(geography.get("geography/v3"))
    assert geography.get("geography/v3").folder.exists()


def test_force_removes_serving_version(geography):
    folder = geography.get("geography/v3").folder
    geography.remove(geography.get("geography/v3"), force=True)
    assert not folder.exists()
    assert serving_name(geography) == "geography/v1"


def test_unpinned_version_removed(geography):
    geography.pin(geography.get("geography/v2"), by="alice")
    geography.unpin(geography.get("geography/v2"), by="alice")
    geography.remove(geography.get("geography/v2"))
    assert [a.version for a in geography.versions("geography")] == [1, 3]


def test_plain_record_stays_version_one(geography):
    record = json.loads((geography.get("geography/v1").folder / RECORD_FILE).read_text())
    assert record["schema_version"] == 1


def test_newer_record_rejected(geography):
    path = geography.get("geography/v1").folder / RECORD_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), "schema_version": 3}))
    with pytest.raises(LoraError, match="schema_version 3; this A3X reads versions 1, 2"):
        geography.versions("geography")


def test_unknown_name_lists_known(geography):
    with pytest.raises(LoraError, match="no adapter geography/v9 .* geography/v1, geography/v2"):
        geography.get("geography/v9")


@pytest.mark.parametrize("name", ["geography", "geography/2", "/v1", "geo graphy/v1"])
def test_invalid_name_rejected(name):
    with pytest.raises(LoraError, match="write domain/vN"):
        parse_adapter_name(name)


def test_same_base_fits(geography, tiny_gguf):
    info = check_model_file(tiny_gguf)
    base = BaseModelRef(info.name, info.architecture, sha256_of_file(tiny_gguf))
    assert base_mismatch(geography.get("geography/v1"), base) is None


def test_other_base_named(geography, tmp_path):
    other = write_tiny_gguf(tmp_path / "other.gguf", TinyConfig(seed=5))
    sha = sha256_of_file(other)
    problem = base_mismatch(geography.get("geography/v1"), BaseModelRef("other", "llama", sha))
    assert problem is not None
    assert f"configured model is other (llama, sha256 {sha[:12]})" in problem
    assert "was trained on base" in problem
