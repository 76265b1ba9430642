"""Merging GGUF LoRA adapters into a GGUF base: the merged weights against numpy,
llama.cpp's logits against the adapter applied at run time, type preservation and
fallbacks, rejected inputs, the atomic write and the command line. The last tests run on
the real default model."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np
import pytest

from bench.tiny_model import TinyConfig, write_tiny_gguf
from lora.gguf_adapter import AdapterFormatError, read_gguf_adapter
from lora.merge import MergeError, MergeResult, merge_adapters, parse_adapter_spec
from lora.quant_error import QuantType, next_token_logits, quantize_model
from runtime.backend import ActiveAdapter
from runtime.default_model import default_model_path
from runtime.gguf_file import (
    GGUFInfo,
    ModelFileError,
    inspect_gguf,
    read_tensor,
    read_tensor_bytes,
    sha256_of_file,
)
from runtime.llama_cpp_backend import LlamaCppBackend
from runtime.transformers_backend import TransformersBackend
from tests.runtime.lora_fixtures import lora_weights, write_gguf_adapter

TEXTS = (
    "the capital of france is paris and the river is long",
    "one plus two is three and four minus one is three",
)
TARGETS = ("blk.0.attn_v.weight", "blk.1.attn_v.weight")
# llama.cpp computes W x + s B (A x) at run time and (W + s B A) x after the
# merge. In float32 the two differ by rounding only: measured on TEXTS, at most
# 3e-5 on logits of magnitude up to 6 and 1e-5 on the log-likelihood.
LOGIT_TOLERANCE = 1e-4
LOG_LIKELIHOOD_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("adapters")
    return {
        "one": write_gguf_adapter(folder / "one.gguf", lora_weights(seed=1)),
        "two": write_gguf_adapter(folder / "two.gguf", lora_weights(seed=2)),
    }


@pytest.fixture(scope="module")
def tiny_q8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-q8_0.gguf"
    return write_tiny_gguf(path, TinyConfig(seed=0, tensor_type="Q8_0"))


def write_random_adapter(
    path: Path,
    base: GGUFInfo,
    targets: Sequence[str],
    rank: int = 8,
    std: float = 0.02,
    seed: int = 0,
    alpha: float = 16.0,
) -> Path:
    """Write a GGUF LoRA adapter with random factors shaped for `targets` of `base`."""
    rng = np.random.default_rng(seed)
    shapes = {tensor.name: tensor.shape for tensor in base.tensors}
    writer = gguf.GGUFWriter(str(path), base.architecture)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    for target in targets:
        columns, rows = shapes[target]  # GGUF order: in, out
        a = (rng.standard_normal((rank, columns)) * std).astype(np.float32)
        b = (rng.standard_normal((rows, rank)) * std).astype(np.float32)
        writer.add_tensor(f"{target}.lora_a", a)
        writer.add_tensor(f"{target}.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def expected_weight(base: Path, target: str, specs: Sequence[ActiveAdapter]) -> np.ndarray:
    """W + sum of scale * (alpha / rank) * B @ A, computed in float64 from the files."""
    info = inspect_gguf(base)
    weight = read_tensor(info, next(t for t in info.tensors if t.name == target))
    total = weight.astype(np.float64)
    for spec in specs:
        adapter = read_gguf_adapter(spec.path)
        pair = adapter.pairs[target]
        factor = spec.scale * adapter.alpha / pair.rank
        total += factor * (pair.b.astype(np.float64) @ pair.a.astype(np.float64))
    return total


def tensor_of(info: GGUFInfo, name: str):
    return next(tensor for tensor in info.tensors if tensor.name == name)


def logits_of(backend: LlamaCppBackend, text: str) -> np.ndarray:
    tokens = backend.llm.tokenize(text.encode(), add_bos=True, special=False)
    return np.concatenate([rows.copy() for rows in next_token_logits(backend, tokens)])


# Merged weights and llama.cpp outputs on the F32 tiny model


def test_merged_weights_match_numpy(tiny_gguf, adapters, tmp_path):
    specs = [ActiveAdapter(adapters["one"], 0.5), ActiveAdapter(adapters["two"], -0.7)]
    output = tmp_path / "merged.gguf"
    merge_adapters(tiny_gguf, specs, output)

    merged = inspect_gguf(output)
    for target in TARGETS:
        got = read_tensor(merged, tensor_of(merged, target))
        assert tensor_of(merged, target).type_name == "F32"
        np.testing.assert_allclose(got, expected_weight(tiny_gguf, target, specs), atol=1e-6)


def test_merge_reports_modified_tensors(tiny_gguf, adapters, tmp_path):
    result = merge_adapters(tiny_gguf, [ActiveAdapter(adapters["one"])], tmp_path / "m.gguf")

    assert [tensor.name for tensor in result.tensors] == list(TARGETS)
    assert {(t.original_type, t.written_type) for t in result.tensors} == {("F32", "F32")}
    assert result.fallbacks == ()


def test_untouched_tensors_copied_bytewise(tiny_gguf, adapters, tmp_path):
    output = tmp_path / "merged.gguf"
    merge_adapters(tiny_gguf, [ActiveAdapter(adapters["one"])], output)

    base, merged = inspect_gguf(tiny_gguf), inspect_gguf(output)
    assert [t.name for t in merged.tensors] == [t.name for t in base.tensors]
    for tensor in base.tensors:
        if tensor.name in TARGETS:
            continue
        copy = tensor_of(merged, tensor.name)
        assert copy.type_name == tensor.type_name, tensor.name
        assert copy.shape == tensor.shape, tensor.name
        assert np.array_equal(read_tensor_bytes(merged, copy), read_tensor_bytes(base, tensor))


def test_metadata_copied_with_provenance(tiny_gguf, adapters, tmp_path):
    output = tmp_path / "merged.gguf"
    specs = [ActiveAdapter(adapters["one"], 0.5), ActiveAdapter(adapters["two"], -0.7)]
    merge_adapters(tiny_gguf, specs, output)

    base, merged = inspect_gguf(tiny_gguf).metadata, inspect_gguf(output).metadata
    copied = {k: v for k, v in merged.items() if not k.startswith("a3x.merge.")}
    assert copied == base
    assert merged["a3x.merge.format_version"] == 1
    assert merged["a3x.merge.adapters"] == ["one.gguf:0.5", "two.gguf:-0.7"]
    assert merged["a3x.merge.base"] == "tiny.gguf"
    assert merged["a3x.merge.base_sha256"] == sha256_of_file(tiny_gguf)
    assert merged["a3x.merge.adapter_sha256"] == [
        sha256_of_file(adapters["one"]),
        sha256_of_file(adapters["two"]),
    ]
    assert "a3x.merge.fallback_tensors" not in merged


def test_remerge_replaces_provenance(tiny_gguf, adapters, tmp_path):
    first, second = tmp_path / "first.gguf", tmp_path / "second.gguf"
    merge_adapters(tiny_gguf, [ActiveAdapter(adapters["one"])], first)
    merge_adapters(first, [ActiveAdapter(adapters["two"], 0.25)], second)

    metadata = inspect_gguf(second).metadata
    assert metadata["a3x.merge.adapters"] == ["two.gguf:0.25"]
    assert metadata["a3x.merge.base_sha256"] == sha256_of_file(first)


@pytest.mark.parametrize("scales", [(1.0,), (0.5, -0.7)])
def test_llama_logits_match_runtime_adapters(tiny_gguf, adapters, tmp_path, scales):
    specs = [
        ActiveAdapter(path, scale)
        for path, scale in zip((adapters["one"], adapters["two"]), scales, strict=False)
    ]
    output = tmp_path / "merged.gguf"
    merge_adapters(tiny_gguf, specs, output)

    runtime = LlamaCppBackend(tiny_gguf, n_ctx=512, threads=1)
    runtime.set_adapters(specs)
    merged = LlamaCppBackend(output, n_ctx=512, threads=1)
    try:
        for text in TEXTS:
            expected, got = logits_of(runtime, text), logits_of(merged, text)
            assert got.shape == expected.shape
            assert np.abs(got - expected).max() < LOGIT_TOLERANCE, text
            assert merged.log_likelihood(text).total == pytest.approx(
                runtime.log_likelihood(text).total, abs=LOG_LIKELIHOOD_TOLERANCE
            )
    finally:
        runtime.close()
        merged.close()


def test_merge_changes_llama_output(tiny_gguf, adapters, tmp_path):
    output = tmp_path / "merged.gguf"
    merge_adapters(tiny_gguf, [ActiveAdapter(adapters["one"])], output)

    base, merged = (LlamaCppBackend(path, n_ctx=512, threads=1) for path in (tiny_gguf, output))
    try:
        difference = np.abs(logits_of(merged, TEXTS[0]) - logits_of(base, TEXTS[0])).max()
    finally:
        base.close()
        merged.close()
    assert difference > 100 * LOGIT_TOLERANCE


def test_merged_file_loads_in_transformers(tiny_gguf, adapters, tmp_path):
    specs = [ActiveAdapter(adapters["one"], 0.5), ActiveAdapter(adapters["two"], -0.7)]
    output = tmp_path / "merged.gguf"
    merge_adapters(tiny_gguf, specs, output)

    runtime = LlamaCppBackend(tiny_gguf, n_ctx=512, threads=1)
    runtime.set_adapters(specs)
    reference = TransformersBackend(output, cache_dir=tmp_path / "cache", threads=1)
    try:
        expected = runtime.log_likelihood(TEXTS[0]).total
        got = reference.log_likelihood(TEXTS[0]).total
    finally:
        runtime.close()
        reference.close()
    assert got == pytest.approx(expected, rel=1e-4)


# Types: preserved, forced, and the fallback for K-quants


def test_q8_0_base_keeps_type(tiny_q8, adapters, tmp_path):
    output = tmp_path / "merged.gguf"
    specs = [ActiveAdapter(adapters["one"], 0.8)]
    result = merge_adapters(tiny_q8, specs, output)

    assert {(t.original_type, t.written_type) for t in result.tensors} == {("Q8_0", "Q8_0")}
    assert result.fallbacks == ()
    merged = inspect_gguf(output)
    for target in TARGETS:
        exact = expected_weight(tiny_q8, target, specs).astype(np.float32)
        stored = read_tensor_bytes(merged, tensor_of(merged, target))
        quantized = gguf.quants.quantize(exact, gguf.GGMLQuantizationType.Q8_0)
        assert np.array_equal(stored, quantized.reshape(-1)), target


def test_q8_0_merge_close_to_runtime(tiny_q8, adapters, tmp_path):
    output = tmp_path / "merged.gguf"
    specs = [ActiveAdapter(adapters["one"], 0.8)]
    merge_adapters(tiny_q8, specs, output)

    runtime = LlamaCppBackend(tiny_q8, n_ctx=512, threads=1)
    base = logits_of(runtime, TEXTS[0])
    runtime.set_adapters(specs)
    merged = LlamaCppBackend(output, n_ctx=512, threads=1)
    try:
        expected, got = logits_of(runtime, TEXTS[0]), logits_of(merged, TEXTS[0])
    finally:
        runtime.close()
        merged.close()
    # On a Q8_0 base llama.cpp also quantizes the activations of each product,
    # so the runtime adapter and the requantized merge differ by more than
    # rounding. Measured: a mean logit difference of 2.5% of the mean change
    # the adapter makes.
    assert np.abs(got - expected).mean() < 0.05 * np.abs(expected - base).mean()


@pytest.mark.parametrize(
    ("outtype", "written", "reason"),
    [("f16", "F16", "--outtype f16 was requested"), ("f32", "F32", "--outtype f32 was requested")],
)
def test_outtype_forces_type(tiny_q8, adapters, tmp_path, outtype, written, reason):
    output = tmp_path / "merged.gguf"
    result = merge_adapters(tiny_q8, [ActiveAdapter(adapters["one"])], output, outtype)

    for tensor in result.tensors:
        assert tensor.written_type == written
        assert tensor.fallback_reason == reason
    merged = inspect_gguf(output)
    assert {tensor_of(merged, target).type_name for target in TARGETS} == {written}
    assert inspect_gguf(output).metadata["a3x.merge.outtype"] == outtype


def test_f32_outtype_on_f32_base_is_no_fallback(tiny_gguf, adapters, tmp_path):
    result = merge_adapters(tiny_gguf, [ActiveAdapter(adapters["one"])], tmp_path / "m.gguf", "f32")

    assert result.fallbacks == ()


@pytest.fixture(scope="module")
def tiny_k_quant(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model with 256 columns, quantized to Q4_K_M by llama.cpp so it contains K-quants."""
    folder = tmp_path_factory.mktemp("k-quant")
    config = TinyConfig(seed=0, embedding_length=256, feed_forward_length=256)
    source = write_tiny_gguf(folder / "tiny-256.gguf", config)
    target = folder / "tiny-q4_k_m.gguf"
    import llama_cpp

    quantize_model(source, target, QuantType("Q4_K_M", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M), 1)
    return target


def test_k_quant_falls_back_to_f16(tiny_k_quant, tmp_path):
    base = inspect_gguf(tiny_k_quant)
    targets = ["blk.0.attn_output.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight"]
    original = {name: tensor_of(base, name).type_name for name in targets}
    assert all(kind.endswith("_K") for kind in original.values()), original
    adapter = write_random_adapter(tmp_path / "k.gguf", base, targets, rank=4, std=0.1)

    output = tmp_path / "merged.gguf"
    result = merge_adapters(tiny_k_quant, [ActiveAdapter(adapter)], output)

    merged = inspect_gguf(output)
    for tensor in result.tensors:
        assert tensor.written_type == "F16"
        expected = f"{original[tensor.name]}: the gguf package cannot quantize K-quants"
        assert tensor.fallback_reason == expected
        assert tensor_of(merged, tensor.name).type_name == "F16"
    assert merged.metadata["a3x.merge.fallback_tensors"] == [t.name for t in result.tensors]


# Rejected inputs and failed writes


def test_non_finite_merge_names_adapter(tiny_gguf, adapters, tmp_path):
    huge = {block: (a * 1e20, b * 1e20) for block, (a, b) in lora_weights(seed=3).items()}
    bad = write_gguf_adapter(tmp_path / "huge.gguf", huge)
    output = tmp_path / "merged.gguf"

    with pytest.raises(MergeError) as caught:
        merge_adapters(tiny_gguf, [ActiveAdapter(adapters["one"]), ActiveAdapter(bad)], output)

    message = str(caught.value)
    assert "huge.gguf" in message
    assert "blk.0.attn_v.weight" in message
    assert "non-finite" in message
    assert not output.exists()
    assert list(tmp_path.iterdir()) == [bad]


def test_f16_overflow_rejected(adapters, tmp_path):
    base = write_tiny_gguf(tmp_path / "tiny-f16.gguf", TinyConfig(seed=0, tensor_type="F16"))
    output = tmp_path / "merged.gguf"

    with pytest.raises(MergeError, match="overflow.*--outtype f32"):
        merge_adapters(base, [ActiveAdapter(adapters["one"], 1e6)], output)
    assert not output.exists()


def test_non_finite_scale_rejected(tiny_gguf, adapters, tmp_path):
    with pytest.raises(MergeError, match="scale inf"):
        merge_adapters(tiny_gguf, [ActiveAdapter(adapters["one"], float("inf"))], tmp_path / "m")


def test_adapter_for_other_architecture_rejected(tiny_gguf, tmp_path):
    other = write_gguf_adapter(tmp_path / "gemma.gguf", lora_weights(seed=1), "gemma3")

    with pytest.raises(AdapterFormatError, match="architecture 'gemma3'"):
        merge_adapters(tiny_gguf, [ActiveAdapter(other)], tmp_path / "merged.gguf")
    assert not (tmp_path / "merged.gguf").exists()


def test_adapter_with_wrong_shape_rejected(tiny_gguf, tmp_path):
    narrow = write_gguf_adapter(tmp_path / "narrow.gguf", lora_weights(seed=1, dim=32))

    with pytest.raises(AdapterFormatError, match="does not fit"):
        merge_adapters(tiny_gguf, [ActiveAdapter(narrow)], tmp_path / "merged.gguf")


def test_output_onto_base_rejected(adapters, tmp_path):
    base = write_tiny_gguf(tmp_path / "base.gguf")
    before = sha256_of_file(base)

    with pytest.raises(MergeError, match="is the base model"):
        merge_adapters(base, [ActiveAdapter(adapters["one"])], base)
    assert sha256_of_file(base) == before


def test_output_onto_adapter_rejected(tiny_gguf, adapters):
    with pytest.raises(MergeError, match="is the adapter"):
        merge_adapters(tiny_gguf, [ActiveAdapter(adapters["one"])], adapters["one"])


def test_missing_base_rejected(adapters, tmp_path):
    missing = tmp_path / "missing.gguf"

    with pytest.raises(ModelFileError, match="missing.gguf does not exist"):
        merge_adapters(missing, [ActiveAdapter(adapters["one"])], tmp_path / "merged.gguf")


def test_truncated_base_rejected(tiny_gguf, adapters, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[:100_000])

    with pytest.raises(ModelFileError, match="truncated"):
        merge_adapters(truncated, [ActiveAdapter(adapters["one"])], tmp_path / "merged.gguf")


def test_corrupt_adapter_rejected(tiny_gguf, tmp_path):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"not a gguf file at all, just text")

    with pytest.raises(ModelFileError, match="not a GGUF file"):
        merge_adapters(tiny_gguf, [ActiveAdapter(corrupt)], tmp_path / "merged.gguf")


def test_no_adapters_rejected(tiny_gguf, tmp_path):
    with pytest.raises(MergeError, match="no adapters"):
        merge_adapters(tiny_gguf, [], tmp_path / "merged.gguf")


def test_missing_output_folder_rejected(tiny_gguf, adapters, tmp_path):
    with pytest.raises(MergeError, match="does not exist; create it"):
        merge_adapters(tiny_gguf, [ActiveAdapter(adapters["one"])], tmp_path / "no" / "m.gguf")


def test_existing_output_replaced(tiny_gguf, adapters, tmp_path):
    output = tmp_path / "merged.gguf"
    output.write_text("an older file")

    merge_adapters(tiny_gguf, [ActiveAdapter(adapters["one"])], output)

    assert inspect_gguf(output).tensor_count == inspect_gguf(tiny_gguf).tensor_count


def limit_file_size() -> None:
    """Make every write past 200 kB fail with EFBIG, as a full disk fails a write."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_failed_write_leaves_no_file(tiny_gguf, adapters, env, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    output = folder / "merged.gguf"

    process = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "lora", "merge", str(tiny_gguf)]
        + [str(adapters["one"]), "-o", str(output)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit_file_size,
    )

    assert process.returncode == 2, process.stderr
    assert f"could not write {output}" in process.stderr
    assert "Traceback" not in process.stderr
    assert list(folder.iterdir()) == []


# Command line


def a3x(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_merge_json(tiny_q8, adapters, env, tmp_path):
    output = tmp_path / "merged.gguf"
    process = a3x(
        env,
        *("lora", "merge", str(tiny_q8), f"{adapters['one']}:0.5", f"{adapters['two']}:-0.7"),
        *("-o", str(output), "--outtype", "f16", "--json"),
    )

    assert process.returncode == 0, process.stderr
    report = json.loads(process.stdout)
    assert report["adapters"] == [
        {"path": str(adapters["one"]), "scale": 0.5},
        {"path": str(adapters["two"]), "scale": -0.7},
    ]
    assert [t["name"] for t in report["tensors"]] == list(TARGETS)
    assert {t["written_type"] for t in report["tensors"]} == {"F16"}
    assert report["output_bytes"] == output.stat().st_size


def test_cli_merge_table(tiny_gguf, adapters, env, tmp_path):
    output = tmp_path / "merged.gguf"
    process = a3x(env, "lora", "merge", str(tiny_gguf), str(adapters["one"]), "-o", str(output))

    assert process.returncode == 0, process.stderr
    lines = process.stdout.splitlines()
    assert lines[0].startswith("Merged 1 adapter(s) into tiny.gguf")
    assert lines[1].split() == ["tensor", "original", "written", "fallback", "reason"]
    assert [line.split() for line in lines[2:]] == [[name, "F32", "F32"] for name in TARGETS]


def test_cli_merge_error_is_one_line(tiny_gguf, env, tmp_path):
    process = a3x(
        env, "lora", "merge", str(tiny_gguf), str(tmp_path / "nope.gguf"), "-o", str(tmp_path / "m")
    )

    assert process.returncode == 2
    assert process.stderr.startswith("a3x: error: ")
    assert "nope.gguf does not exist" in process.stderr


def test_cli_help_lists_merge(env):
    process = a3x(env, "lora", "--help")

    assert "merge LoRA adapters into a GGUF base model" in process.stdout


@pytest.mark.parametrize(
    ("text", "path", "scale"),
    [("a.gguf", "a.gguf", 1.0), ("a.gguf:0.5", "a.gguf", 0.5), ("a.gguf:-2", "a.gguf", -2.0)],
)
def test_parse_adapter_spec(text, path, scale):
    assert parse_adapter_spec(text) == ActiveAdapter(Path(path), scale)


def test_parse_adapter_spec_rejects_bad_scale():
    with pytest.raises(MergeError, match="'half' is not a number"):
        parse_adapter_spec("a.gguf:half")


def test_parse_adapter_spec_keeps_existing_path(tmp_path):
    odd = tmp_path / "run:3.gguf"
    odd.write_bytes(b"")

    assert parse_adapter_spec(str(odd)) == ActiveAdapter(odd, 1.0)


# The real default model (Gemma 3 270M Q4_K_M)

GEMMA_TARGETS = [
    f"blk.{block}.{name}.weight"
    for block in (0, 9)
    for name in ("attn_q", "attn_v", "attn_output", "ffn_down")
]
# Types of GEMMA_TARGETS in the default model file.
GEMMA_TYPES = {
    "blk.0.attn_q.weight": "Q5_0",
    "blk.0.attn_v.weight": "Q8_0",
    "blk.0.attn_output.weight": "Q4_K",
    "blk.0.ffn_down.weight": "Q6_K",
    "blk.9.attn_q.weight": "Q5_0",
    "blk.9.attn_v.weight": "Q5_0",
    "blk.9.attn_output.weight": "Q4_K",
    "blk.9.ffn_down.weight": "Q4_K",
}


@pytest.fixture(scope="module")
def gemma_merge(tmp_path_factory: pytest.TempPathFactory) -> tuple[MergeResult, Path]:
    folder = tmp_path_factory.mktemp("gemma-merge")
    base = default_model_path()
    adapter = write_random_adapter(folder / "adapter.gguf", inspect_gguf(base), GEMMA_TARGETS)
    result = merge_adapters(base, [ActiveAdapter(adapter, 1.0)], folder / "merged.gguf")
    return result, adapter


@pytest.mark.slow
def test_gemma_merge_types_and_fallbacks(gemma_merge):
    result, _ = gemma_merge

    assert {t.name: t.original_type for t in result.tensors} == GEMMA_TYPES
    for tensor in result.tensors:
        if tensor.original_type.endswith("_K"):
            assert tensor.written_type == "F16", tensor.name
            assert tensor.fallback_reason == (
                f"{tensor.original_type}: the gguf package cannot quantize K-quants"
            )
        else:
            assert tensor.written_type == tensor.original_type, tensor.name
            assert tensor.fallback_reason is None, tensor.name


@pytest.mark.slow
def test_gemma_merge_copies_the_rest(gemma_merge):
    result, _ = gemma_merge
    base, merged = inspect_gguf(result.base), inspect_gguf(result.output)

    copied = {k: v for k, v in merged.metadata.items() if not k.startswith("a3x.merge.")}
    assert copied == base.metadata
    modified = set(GEMMA_TARGETS)
    for tensor in base.tensors:
        if tensor.name not in modified:
            copy = tensor_of(merged, tensor.name)
            assert (copy.type_name, copy.n_bytes) == (tensor.type_name, tensor.n_bytes)
    embedding = tensor_of(base, "token_embd.weight")
    assert np.array_equal(
        read_tensor_bytes(merged, tensor_of(merged, "token_embd.weight")),
        read_tensor_bytes(base, embedding),
    )


@pytest.mark.slow
def test_gemma_merge_loads_in_llama(gemma_merge):
    result, adapter = gemma_merge
    text = "The capital of France is Paris. It is a large city in Europe."

    runtime = LlamaCppBackend(result.base, n_ctx=256, threads=2)
    runtime.set_adapters([ActiveAdapter(adapter, 1.0)])
    expected = runtime.log_likelihood(text).total
    runtime.set_adapters([])
    base_total = runtime.log_likelihood(text).total
    runtime.close()
    merged = LlamaCppBackend(result.output, n_ctx=256, threads=2)
    got = merged.log_likelihood(text).total
    merged.close()

    # Requantizing W + delta to Q5_0 and Q8_0 costs a little. Measured: 0.011
    # nats from the runtime adapter on this text, which the adapter shifts by 0.88.
    assert got == pytest.approx(expected, abs=0.1)
    assert abs(got - base_total) > 0.3


@pytest.mark.slow
def test_gemma_merge_loads_in_transformers(gemma_merge):
    import torch
    from transformers import AutoModelForCausalLM

    result, _ = gemma_merge
    model = AutoModelForCausalLM.from_pretrained(
        result.output.parent, gguf_file=result.output.name, dtype=torch.float32
    )
    merged = inspect_gguf(result.output)

    # transformers dequantizes the F16 fallback exactly, so its weight is the merged one.
    loaded = model.model.layers[0].self_attn.o_proj.weight.detach().numpy()
    stored = read_tensor(merged, tensor_of(merged, "blk.0.attn_output.weight"))
    assert np.array_equal(loaded, stored)
