"""Per-layer and per-module scales: derived adapters on the tiny model against
adapters written without the dropped tensors and against llama.cpp's own scale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.adapters import write_synthetic_adapter
from lora.gguf_adapter import read_gguf_adapter
from lora.layers import LayerScales, LayerScalesError, derive_adapter, tensor_factors
from lora.metadata import AdapterMetadata, BaseModelRef, from_gguf_metadata
from runtime.backend import ActiveAdapter
from runtime.gguf_file import GGUFInfo, check_model_file, inspect_gguf, sha256_of_file
from runtime.llama_cpp_backend import LlamaCppBackend

TEXT = "the capital of france is paris and the river is long"
MODULES = ("attn_q", "attn_v")
# A derived lora_b (s * B rounded to float32) and llama.cpp's runtime scale
# may round differently, though they agreed exactly on these adapters. A 1%
# error in one scale moves the log-likelihood by 0.03 or more.
LOG_LIKELIHOOD_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def base(tiny_gguf: Path) -> GGUFInfo:
    return check_model_file(tiny_gguf)


@pytest.fixture(scope="module")
def source(base: GGUFInfo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("layers")
    return write_synthetic_adapter(
        folder / "source.gguf", base, rank=4, seed=3, modules=MODULES, b_std=0.3
    )


@pytest.fixture(scope="module")
def llama(tiny_gguf: Path):
    backend = LlamaCppBackend(tiny_gguf, n_ctx=512, threads=1)
    yield backend
    backend.close()


def log_likelihood(backend: LlamaCppBackend, *adapters: ActiveAdapter) -> float:
    backend.set_adapters(adapters)
    try:
        return backend.log_likelihood(TEXT).total
    finally:
        backend.set_adapters([])


def tensor_names(path: Path) -> list[str]:
    return sorted(tensor.name for tensor in inspect_gguf(path).tensors)


def test_all_ones_equals_source(llama, source, tmp_path):
    derived = derive_adapter(source, {"default": 1.0, "modules": {"attn_v": 1.0}}, tmp_path)
    assert tensor_names(derived) == tensor_names(source)
    expected = log_likelihood(llama, ActiveAdapter(source))
    assert log_likelihood(llama, ActiveAdapter(derived)) == expected


def test_zero_layer_equals_adapter_without_it(llama, base, source, tmp_path):
    derived = derive_adapter(source, {"layers": {"1": 0.0}}, tmp_path / "cache")
    without = write_synthetic_adapter(
        tmp_path / "block0.gguf", base, rank=4, seed=3, modules=MODULES, blocks=[0], b_std=0.3
    )
    assert tensor_names(derived) == tensor_names(without)
    expected = log_likelihood(llama, ActiveAdapter(without))
    assert log_likelihood(llama, ActiveAdapter(derived)) == expected


def test_module_scale_matches_llama_scale(llama, base, source, tmp_path):
    derived = derive_adapter(source, {"modules": {"attn_q": 0.0, "attn_v": 0.6}}, tmp_path)
    value_only = write_synthetic_adapter(
        tmp_path / "v.gguf", base, rank=4, seed=3, modules=["attn_v"], b_std=0.3
    )
    expected = log_likelihood(llama, ActiveAdapter(value_only, 0.6))
    measured = log_likelihood(llama, ActiveAdapter(derived))
    assert measured == pytest.approx(expected, abs=LOG_LIKELIHOOD_TOLERANCE)
    assert measured != pytest.approx(log_likelihood(llama, ActiveAdapter(value_only)), abs=0.01)


def test_module_scales_match_two_adapters(llama, base, source, tmp_path):
    derived = derive_adapter(source, {"modules": {"attn_q": 0.3, "attn_v": -0.8}}, tmp_path)
    query, value = (
        write_synthetic_adapter(
            tmp_path / f"{module}.gguf", base, rank=4, seed=3, modules=[module], b_std=0.3
        )
        for module in MODULES
    )
    expected = log_likelihood(llama, ActiveAdapter(query, 0.3), ActiveAdapter(value, -0.8))
    measured = log_likelihood(llama, ActiveAdapter(derived))
    assert measured == pytest.approx(expected, abs=LOG_LIKELIHOOD_TOLERANCE)


def test_factors_combine_layer_and_module(source):
    adapter = read_gguf_adapter(source, load_tensors=False)
    scales = LayerScales.parse(
        {"default": 0.5, "layers": {"0-0": 2.0}, "modules": {"attn_v": -1.0}}
    )
    factors = tensor_factors(adapter, scales, block_count=2)
    assert factors == {
        "blk.0.attn_q.weight": 2.0,
        "blk.0.attn_v.weight": -2.0,
        "blk.1.attn_q.weight": 0.5,
        "blk.1.attn_v.weight": -0.5,
    }


def test_cache_hit_returns_same_file(source, tmp_path, monkeypatch):
    first = derive_adapter(source, {"layers": {"0": 0.5}}, tmp_path)
    before = first.stat()

    def fail_write(*args, **kwargs):
        raise AssertionError("a cached derived adapter was written again")

    monkeypatch.setattr("lora.layers._write_derived", fail_write)
    second = derive_adapter(source, '{"layers": {"0": 0.5}}', tmp_path)
    assert second == first
    assert second.stat().st_ino == before.st_ino
    assert second.stat().st_mtime_ns == before.st_mtime_ns


def test_equal_scales_share_file(source, tmp_path):
    ranged = derive_adapter(source, {"layers": {"0-1": 0.5}}, tmp_path)
    listed = derive_adapter(source, {"default": 0.5, "layers": {"1": 0.5}}, tmp_path)
    assert ranged == listed


def test_cache_leaves_no_temporary_files(source, tmp_path):
    derive_adapter(source, {"layers": {"0": 0.25}}, tmp_path)
    assert [path.suffix for path in tmp_path.iterdir()] == [".gguf"]


def test_metadata_copied_and_updated(base, tmp_path):
    metadata = AdapterMetadata(
        base=BaseModelRef(base.name, base.architecture, "0" * 64),
        rank=4,
        alpha=4.0,
        targets=("q_proj", "v_proj"),
        resident_bytes=8192,
        peak_bytes={512: 8192 + 100_000},
        domain="geography",
    )
    source = write_synthetic_adapter(
        tmp_path / "meta.gguf", base, rank=4, seed=5, modules=MODULES, metadata=metadata
    )
    derived = derive_adapter(source, {"layers": {"1": 0.0}}, tmp_path / "cache")
    info = inspect_gguf(derived)
    copied = from_gguf_metadata(info.metadata, derived)
    assert copied is not None
    assert copied.domain == "geography"
    assert copied.targets == ("q_proj", "v_proj")
    assert copied.scale_folded
    kept = read_gguf_adapter(derived, load_tensors=False).resident_bytes
    assert kept == 3584  # block 0 only: q 64x4 + 4x64, v 64x4 + 4x32, float32
    assert copied.resident_bytes == kept
    assert copied.peak_bytes == {512: kept + 100_000}
    assert info.metadata["a3x.derived.source_sha256"] == sha256_of_file(source)
    assert json.loads(info.metadata["a3x.derived.factors"])["blk.1.attn_q.weight"] == 0.0
    assert info.metadata["adapter.lora.alpha"] == 4.0


def test_all_tensors_dropped_rejected(source, tmp_path):
    with pytest.raises(LayerScalesError, match="set every tensor .* to 0"):
        derive_adapter(source, {"default": 0.0}, tmp_path)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"modules": {"ffn_up": 0.5}}, "module 'ffn_up' .* is not modified by .*attn_q, attn_v"),
        ({"layers": {"2": 0.5}}, r"layer '2' .* out of range: the model has blocks 0-1"),
        ({"layers": {"0-7": 0.5}}, r"layer '0-7' .* out of range"),
        ({"layers": {"-1": 0.5}}, "layer '-1' .* is negative"),
        ({"layers": {"-1-3": 0.5}}, "layer '-1-3' .* is negative"),
        ({"layers": {"1-0": 0.5}}, "ends before it starts; write it as '0-1'"),
        ({"layers": {"0-1": 0.5, "1": 0.2}}, "overlap"),
        ({"layers": {"first": 0.5}}, "layer 'first' .* is invalid"),
        ({"layers": {"0": "half"}}, "factor of layer '0' is 'half'"),
        ({"default": float("nan")}, "factor of 'default' is nan"),
        ({"default": True}, "factor of 'default' is True"),
        ({"layer": {"0": 0.5}}, "unknown key.*'layer'"),
        ({"modules": ["attn_v"]}, "'modules' .* must be an object"),
        ("[1, 2]", "must be a JSON object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_invalid_scales_rejected(source, tmp_path, spec, message):
    with pytest.raises(LayerScalesError, match=message):
        derive_adapter(source, spec, tmp_path)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_block_count_widens_layer_range(llama, source, tmp_path):
    derived = derive_adapter(source, {"layers": {"2-3": 0.0}}, tmp_path, block_count=4)
    assert log_likelihood(llama, ActiveAdapter(derived)) == log_likelihood(
        llama, ActiveAdapter(source)
    )
