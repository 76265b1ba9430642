"""`a3x adapters`, run as a user runs it, on a home with real adapter versions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.tiny_model import TinyConfig, write_tiny_gguf
from lora.registry import AdapterRegistry, AdapterStatus
from tests.lora.registry_fixtures import add_version, gate_record


def a3x(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def home(env: dict[str, str], tiny_gguf: Path, tmp_path: Path) -> Path:
    """geography/v1 accepted and v2 rejected for the configured base; science/v1
    accepted for another base."""
    root = Path(env["A3X_HOME"])
    registry = AdapterRegistry(root / "adapters")
    gate = gate_record("geography", -0.2, {"science": -0.1})
    add_version(registry, "geography", AdapterStatus.ACCEPTED, tiny_gguf, 1, gate)
    add_version(
        registry, "geography", AdapterStatus.REJECTED, tiny_gguf, 2, gate_record("geography", 0.0)
    )
    other = write_tiny_gguf(tmp_path / "other.gguf", TinyConfig(seed=7))
    add_version(registry, "science", AdapterStatus.ACCEPTED, other, 3, gate_record("science", -0.3))
    return root


def test_list_json(env, home):
    result = a3x(env, "adapters", "list", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {"geography/v1", "geography/v2", "science/v1"}
    assert rows["geography/v1"]["serving"] == "gate"
    assert rows["geography/v2"]["serving"] is None
    assert rows["geography/v1"]["base_mismatch"] is None
    assert "configured model is a3x-tiny-llama" in rows["science/v1"]["base_mismatch"]


def test_list_text(env, home):
    result = a3x(env, "adapters", "list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "STATUS", "SERVING", "PINNED", "CYCLE", "GATE"]
    assert lines[1].split()[:3] == ["geography/v1", "accepted", "gate"]
    assert any(line.strip().startswith("other base: adapter science/v1") for line in lines)


def test_list_empty_home(env):
    result = a3x(env, "adapters", "list")
    assert result.returncode == 0, result.stderr
    assert "no adapters in" in result.stdout


def test_activate_records_owner(env, home):
    result = a3x(env, "adapters", "activate", "geography/v2")
    assert result.returncode == 0, result.stderr
    assert "geography/v2: activated by" in result.stdout
    assert "geography is served by geography/v2" in result.stdout
    record = json.loads((home / "adapters/geography/v2/record.json").read_text())
    assert record["owner"]["serving"] is True
    assert record["owner"]["by"]
    assert record["schema_version"] == 2


def test_deactivate_leaves_base(env, home):
    result = a3x(env, "adapters", "deactivate", "geography/v1", "--json")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["domain_served_by"] is None
    assert reply["record"]["owner"]["serving"] is False


def test_activate_other_base_rejected(env, home, tiny_gguf):
    result = a3x(env, "adapters", "activate", "science/v1")
    assert result.returncode == 2
    message = result.stderr
    assert "not activated: adapter science/v1 was trained on base" in message
    assert "but the configured model is a3x-tiny-llama (llama, sha256" in message
    record = json.loads((home / "adapters/science/v1/record.json").read_text())
    assert "owner" not in record


def test_remove_refuses_serving_then_forced(env, home):
    refused = a3x(env, "adapters", "remove", "geography/v1")
    assert refused.returncode == 2
    assert "it serves its domain" in refused.stderr
    assert (home / "adapters/geography/v1").is_dir()
    forced = a3x(env, "adapters", "remove", "geography/v1", "--force")
    assert forced.returncode == 0, forced.stderr
    assert not (home / "adapters/geography/v1").exists()


def test_pin_then_remove_refused(env, home):
    assert a3x(env, "adapters", "pin", "geography/v2").returncode == 0
    refused = a3x(env, "adapters", "remove", "geography/v2")
    assert refused.returncode == 2
    assert "it is pinned" in refused.stderr
    assert a3x(env, "adapters", "unpin", "geography/v2").returncode == 0
    assert a3x(env, "adapters", "remove", "geography/v2").returncode == 0


def test_show_prints_evidence_and_routing(env, home):
    result = a3x(env, "adapters", "show", "geography/v1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "geography/v1: accepted, serving: gate" in out
    assert "geography (domain) held-out perplexity: 20 -> 16 (better)" in out
    assert "routing on geography: beats the base" in out
    assert "routing on science: beats the base: held-out perplexity -10.0%" in out
    assert "A3X metadata format 1" in out


def test_unknown_adapter_named(env, home):
    result = a3x(env, "adapters", "show", "geography/v7")
    assert result.returncode == 2
    assert "no adapter geography/v7" in result.stderr
    assert "known adapters: geography/v1, geography/v2, science/v1" in result.stderr


def test_layer_scales_set_shown_and_cleared(env, home):
    spec = '{"layers": {"0": 0.5}, "modules": {"attn_v": -1}}'
    result = a3x(env, "adapters", "layers", "geography/v1", spec)
    assert result.returncode == 0, result.stderr
    assert "per-layer scales" in result.stdout
    record = json.loads((home / "adapters/geography/v1/record.json").read_text())
    stored = record["layer_scales"]
    assert stored["scales"] == {"default": 1.0, "layers": {"0": 0.5}, "modules": {"attn_v": -1.0}}
    assert stored["by"] and stored["at"]
    assert record["owner_history"][-1]["action"] == "set layer scales"
    assert record["schema_version"] == 2  # an A3X that would ignore the scales rejects it

    printed = json.loads(a3x(env, "adapters", "layers", "geography/v1", "--json").stdout)
    assert printed == {"adapter": "geography/v1", "layer_scales": stored["scales"]}
    assert "per-layer scales" in a3x(env, "adapters", "show", "geography/v1").stdout

    cleared = a3x(env, "adapters", "layers", "geography/v1", "--clear")
    assert cleared.returncode == 0, cleared.stderr
    assert "no per-layer scales" in cleared.stdout
    record = json.loads((home / "adapters/geography/v1/record.json").read_text())
    assert "layer_scales" not in record


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ('{"modules": {"attn_q": 2}}', "module 'attn_q' in the layer scales is not modified"),
        ('{"layers": {"0-9": 1}}', "the model has blocks 0-1"),
        ('{"default": 0}', "set every tensor of geography/v1 to 0"),
        ("{}", "set every factor of geography/v1 to 1, which changes nothing"),
        ('{"layers": [1]}', "'layers' in the layer scales must be an object"),
        ("{oops", "layer scales are not valid JSON"),
    ],
    ids=["module", "block", "all-zero", "identity", "shape", "json"],
)
def test_bad_layer_scales_rejected_record_kept(env, home, spec, message):
    path = home / "adapters/geography/v1/record.json"
    before = path.read_bytes()
    result = a3x(env, "adapters", "layers", "geography/v1", spec)
    assert result.returncode == 2
    assert message in result.stderr
    assert path.read_bytes() == before
