"""The memory profile on the tiny model with fixture adapters, and once on the default model.

Stored bytes are checked against sums computed directly from the tensor
tables and shapes. Activation bytes are measured, so their checks are
relations: positive, equal across identical layers, linear in context and batch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.tiny_model import TinyConfig, write_tiny_gguf
from daemon import cli
from lora.gguf_adapter import AdapterFormatError
from lora.profile import (
    NON_BLOCK,
    PLOT_NAME,
    ProfileError,
    load_base_model,
    measure_activations,
    profile_memory,
)
from runtime.gguf_file import inspect_gguf
from tests.runtime.lora_fixtures import RANK, lora_weights, write_gguf_adapter

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DIM, KV_DIM, BLOCKS = 64, 32, 2  # TinyConfig defaults: embedding 64, 2 of 4 heads for k/v
FLOAT32_BYTES = 4


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("adapters")
    return {
        "one": write_gguf_adapter(folder / "one.gguf", lora_weights(seed=1)),
        "two": write_gguf_adapter(folder / "two.gguf", lora_weights(seed=2)),
        # 48 outputs where the base's attn_v has 32: trained on another base.
        "wide": write_gguf_adapter(folder / "wide.gguf", lora_weights(seed=3, kv_dim=48)),
        "gemma": write_gguf_adapter(
            folder / "gemma.gguf", lora_weights(seed=4), architecture="gemma3"
        ),
    }


@pytest.fixture(scope="module")
def tiny_model(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_base_model(tiny_gguf, tmp_path_factory.mktemp("cache"), threads=1)


@pytest.fixture
def cli_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty config and a fresh home, so the command ignores the user's own."""
    config = tmp_path / "config.toml"
    config.write_text("")
    monkeypatch.setenv("A3X_CONFIG", str(config))
    monkeypatch.setenv("A3X_HOME", str(tmp_path / "home"))
    return tmp_path


def expected_weight_bytes(path: Path) -> dict[str, dict[str, int]]:
    """Bytes by row and tensor type, summed straight from the tensor table."""
    rows: dict[str, dict[str, int]] = {}
    for tensor in inspect_gguf(path).tensors:
        parts = tensor.name.split(".")
        row = f"blk.{parts[1]}" if parts[0] == "blk" else NON_BLOCK
        by_type = rows.setdefault(row, {})
        by_type[tensor.type_name] = by_type.get(tensor.type_name, 0) + tensor.n_bytes
    return rows


# Stored bytes


@pytest.mark.parametrize("tensor_type", ["F32", "Q8_0"])
def test_weight_bytes_match_tensor_table(tmp_path: Path, tensor_type: str):
    base = write_tiny_gguf(tmp_path / "tiny.gguf", TinyConfig(tensor_type=tensor_type))
    profile = profile_memory(base, activations=False)
    expected = expected_weight_bytes(base)
    rows = {row.name: row.weight_bytes_by_type for row in profile.layers}
    assert list(rows) == ["blk.0", "blk.1", NON_BLOCK]
    assert rows == expected
    assert profile.weight_bytes == sum(t.n_bytes for t in inspect_gguf(base).tensors)


def test_quantized_rows_list_each_type(tmp_path: Path):
    base = write_tiny_gguf(tmp_path / "tiny.gguf", TinyConfig(tensor_type="Q8_0"))
    profile = profile_memory(base, activations=False)
    # The norm vectors stay F32, and the 2-D weights are Q8_0 (34 bytes per 32 values).
    assert set(profile.layers[0].weight_bytes_by_type) == {"F32", "Q8_0"}
    norms = 2 * DIM * FLOAT32_BYTES
    assert profile.layers[0].weight_bytes_by_type["F32"] == norms


def test_lora_bytes_match_adapter_shapes(tiny_gguf: Path, adapter_files: dict[str, Path]):
    profile = profile_memory(
        tiny_gguf, [adapter_files["one"], adapter_files["two"]], activations=False
    )
    # Each block has one attn_v pair in float32: A is (rank, 64), B is (32, rank).
    pair_bytes = (RANK * DIM + KV_DIM * RANK) * FLOAT32_BYTES
    for row in profile.layers[:BLOCKS]:
        assert row.adapter_bytes == {"one": pair_bytes, "two": pair_bytes}
    assert profile.layers[-1].adapter_bytes == {"one": 0, "two": 0}
    assert profile.lora_bytes == 2 * BLOCKS * pair_bytes


def test_lora_bytes_match_adapter_table(tiny_gguf: Path, adapter_files: dict[str, Path]):
    profile = profile_memory(tiny_gguf, [adapter_files["one"]], activations=False)
    tensors = inspect_gguf(adapter_files["one"]).tensors
    for row in profile.layers[:BLOCKS]:
        expected = sum(t.n_bytes for t in tensors if t.name.startswith(f"{row.name}."))
        assert row.adapter_bytes["one"] == expected
    assert profile.adapters[0].tensor_bytes == sum(t.n_bytes for t in tensors)
    assert profile.adapters[0].ranks == (RANK,)


def test_repeated_adapter_names_made_unique(tiny_gguf: Path, adapter_files: dict[str, Path]):
    one = adapter_files["one"]
    profile = profile_memory(tiny_gguf, [one, one], activations=False)
    assert [adapter.name for adapter in profile.adapters] == ["one", "one#2"]


@pytest.mark.parametrize(
    ("adapter", "problem"),
    [
        ("wide", "'blk.0.attn_v.weight': the adapter maps 64 -> 48 but the base weight maps"),
        ("gemma", "the adapter is for architecture 'gemma3'"),
    ],
)
def test_adapter_for_other_base_rejected(
    tiny_gguf: Path, adapter_files: dict[str, Path], adapter: str, problem: str
):
    with pytest.raises(AdapterFormatError) as raised:
        profile_memory(tiny_gguf, [adapter_files["one"], adapter_files[adapter]])
    assert str(adapter_files[adapter]) in str(raised.value)
    assert problem in str(raised.value)
    assert "Was it trained on another base?" in str(raised.value)


def test_context_beyond_model_rejected(tiny_gguf: Path, tmp_path: Path):
    with pytest.raises(ProfileError, match=r"pass --context 512 or less"):
        profile_memory(tiny_gguf, context=513, cache_dir=tmp_path)


# Activations, measured


def test_activation_bytes_positive_and_equal(tiny_model: Any):
    measured = measure_activations(tiny_model, context=64, batch=1)
    assert len(measured.saved_bytes) == BLOCKS
    assert measured.saved_bytes[0] > 0
    assert measured.saved_bytes[0] == measured.saved_bytes[1]
    assert measured.outside_bytes > 0
    # Every layer returns its (batch, context, 64) float32 hidden state.
    assert measured.output_bytes == (64 * DIM * FLOAT32_BYTES,) * BLOCKS


def test_activation_total_counts_every_part(tiny_model: Any):
    measured = measure_activations(tiny_model, context=64, batch=1)
    parts = (
        sum(measured.saved_bytes)
        + measured.shared_bytes
        + measured.outside_bytes
        + measured.logits_bytes
    )
    assert measured.total_bytes == parts


def test_logits_bytes_are_batch_context_vocabulary(tiny_model: Any):
    measured = measure_activations(tiny_model, context=48, batch=3)
    vocabulary = tiny_model.config.vocab_size
    assert measured.vocabulary == vocabulary
    assert measured.logits_bytes == 3 * 48 * vocabulary * FLOAT32_BYTES


def test_activation_bytes_linear_in_context(tiny_model: Any):
    short = measure_activations(tiny_model, context=64, batch=1)
    long = measure_activations(tiny_model, context=128, batch=1)
    # Attention scores (context x context) would break linearity. PyTorch's SDPA
    # CPU kernel saves only its query, key, value, output and log-sum-exp for
    # backward (torch 2.13), all linear in context. The 1% tolerance leaves room
    # for small fixed-size tensors.
    assert short.attention == "sdpa"
    for layer in range(BLOCKS):
        assert long.saved_bytes[layer] == pytest.approx(2 * short.saved_bytes[layer], rel=0.01)
    assert long.shared_bytes == pytest.approx(2 * short.shared_bytes, rel=0.01)
    assert long.outside_bytes == pytest.approx(2 * short.outside_bytes, rel=0.01)


def test_activation_bytes_linear_in_batch(tiny_model: Any):
    single = measure_activations(tiny_model, context=64, batch=1)
    double = measure_activations(tiny_model, context=64, batch=2)
    for layer in range(BLOCKS):
        assert double.saved_bytes[layer] == pytest.approx(2 * single.saved_bytes[layer], rel=0.01)


def test_measurement_restores_requires_grad(tiny_model: Any):
    before = [parameter.requires_grad for parameter in tiny_model.parameters()]
    measure_activations(tiny_model, context=16, batch=1)
    assert [parameter.requires_grad for parameter in tiny_model.parameters()] == before


# Command line


def run_profile(arguments: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["--log-level", "warning", "lora", "profile", *arguments])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_json_and_png_written(
    tiny_gguf: Path,
    adapter_files: dict[str, Path],
    cli_environment: Path,
    capsys: pytest.CaptureFixture[str],
):
    out = cli_environment / "plots"
    arguments = [str(tiny_gguf), str(adapter_files["one"]), "--context", "32"]
    code, stdout, _ = run_profile([*arguments, "--out", str(out), "--json"], capsys)
    assert code == 0
    data = json.loads(stdout)
    assert data["schema_version"] == 1
    assert data["plot"] == str(out / PLOT_NAME)
    assert (out / PLOT_NAME).read_bytes().startswith(PNG_MAGIC)
    assert [row["layer"] for row in data["layers"]] == ["blk.0", "blk.1", NON_BLOCK]
    assert data["weight_bytes"] == sum(t.n_bytes for t in inspect_gguf(tiny_gguf).tensors)
    assert data["activations"]["context"] == 32
    assert data["layers"][0]["saved_bytes"] > 0
    # The dequantized base went to the cache of the A3X home.
    assert (cli_environment / "home" / "cache" / "dequantized").is_dir()


def test_cli_table_names_measurement(
    tiny_gguf: Path,
    adapter_files: dict[str, Path],
    cli_environment: Path,
    capsys: pytest.CaptureFixture[str],
):
    out = cli_environment / "plots"
    arguments = [str(tiny_gguf), str(adapter_files["one"]), "--out", str(out), "--context", "32"]
    code, stdout, _ = run_profile(arguments, capsys)
    assert code == 0
    assert "saved: bytes autograd keeps for backward inside the layer" in stdout
    assert "output: bytes of the hidden state the layer returns" in stdout
    assert "logits:" in stdout
    assert "process RSS growth:" in stdout
    assert stdout.rstrip().endswith(f"plot: {out / PLOT_NAME}")


def test_cli_no_activations_skips_pass(
    tiny_gguf: Path, cli_environment: Path, capsys: pytest.CaptureFixture[str]
):
    out = cli_environment / "plots"
    code, stdout, _ = run_profile([str(tiny_gguf), "--no-activations", "--out", str(out)], capsys)
    assert code == 0
    assert "saved" not in stdout
    assert not (cli_environment / "home").exists()
    assert (out / PLOT_NAME).read_bytes().startswith(PNG_MAGIC)


def test_cli_rejects_adapter_for_other_base(
    tiny_gguf: Path,
    adapter_files: dict[str, Path],
    cli_environment: Path,
    capsys: pytest.CaptureFixture[str],
):
    arguments = [str(tiny_gguf), str(adapter_files["wide"]), "--out", str(cli_environment)]
    code, stdout, stderr = run_profile(arguments, capsys)
    assert code == 2
    assert stdout == ""
    assert f"adapter {adapter_files['wide']} does not fit base" in stderr
    assert not (cli_environment / PLOT_NAME).exists()


# The default model


@pytest.fixture(scope="module")
def dequantized_cache(model_cache: Path) -> Path:
    return model_cache


@pytest.mark.slow
def test_default_model_profile(dequantized_cache: Path):
    from runtime.default_model import default_model_path

    gemma = default_model_path()
    profile = profile_memory(gemma, context=256, batch=1, cache_dir=dequantized_cache)
    measured = profile.activations
    assert measured is not None

    expected = expected_weight_bytes(gemma)
    assert {row.name: row.weight_bytes_by_type for row in profile.layers} == expected
    assert len(measured.saved_bytes) == 18
    assert min(measured.saved_bytes) > 0
    # At 256 tokens, under the 512-token sliding window, sliding-window and
    # full-attention layers keep the same bytes. At 512 tokens the sliding ones
    # keep one more context x context float32 tensor (measured once with
    # transformers 5.25, not tested here).
    assert len(set(measured.saved_bytes)) == 1
    assert measured.output_bytes[0] == 256 * 640 * FLOAT32_BYTES
    assert measured.logits_bytes == 256 * 262_144 * FLOAT32_BYTES
