"""The quantization-error view on the tiny model: per-tensor statistics against
numpy, llama.cpp's Q8_0 against gguf-py's, the KL divergence against a direct
computation, the report files and the command line. The last test runs on the
real default model."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from bench.tiny_model import write_tiny_gguf
from lora.quant_error import (
    QuantErrorError,
    QuantErrorReport,
    QuantType,
    measure_quant_error,
    next_token_logits,
    quantize_model,
    read_prompts,
    resolve_quant_type,
)
from runtime.backend import ActiveAdapter
from runtime.default_model import default_model_path
from runtime.gguf_file import inspect_gguf, read_tensor, read_tensor_bytes
from runtime.llama_cpp_backend import LlamaCppBackend
from tests.lora.test_merge import GEMMA_TARGETS, GEMMA_TYPES, write_random_adapter
from tests.runtime.lora_fixtures import lora_weights, write_gguf_adapter

PROMPTS = ("the capital of france is", "one plus two is three and", "the river flows to the sea")
TARGETS = ("blk.0.attn_v.weight", "blk.1.attn_v.weight")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("adapters")
    return write_gguf_adapter(folder / "one.gguf", lora_weights(seed=1))


@pytest.fixture(scope="module")
def q8_report(tiny_gguf, adapter, tmp_path_factory) -> QuantErrorReport:
    """Q8_0 of an F32 base with one adapter at scale 0.8; the models are kept."""
    out = tmp_path_factory.mktemp("q8_0")
    return measure_quant_error(
        tiny_gguf,
        [ActiveAdapter(adapter, 0.8)],
        out,
        quant_type="Q8_0",
        prompts=PROMPTS,
        threads=1,
        keep_models=True,
    )


@pytest.fixture(scope="module")
def f32_report(tiny_gguf, adapter, tmp_path_factory) -> QuantErrorReport:
    out = tmp_path_factory.mktemp("f32")
    return measure_quant_error(
        tiny_gguf, [ActiveAdapter(adapter, 0.8)], out, quant_type="F32", prompts=PROMPTS, threads=1
    )


def tensor_pair(report: QuantErrorReport, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The reference (F32 merged) and the quantized weights of one tensor, from the kept files."""
    arrays = []
    for file_name in ("merged-reference.gguf", f"merged-{report.quant_type.lower()}.gguf"):
        info = inspect_gguf(report.out_dir / file_name)
        arrays.append(read_tensor(info, next(t for t in info.tensors if t.name == name)))
    return arrays[0], arrays[1]


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def all_log_probs(path: Path) -> np.ndarray:
    backend = LlamaCppBackend(path, n_ctx=512, threads=1)
    try:
        rows = []
        for prompt in PROMPTS:
            tokens = backend.llm.tokenize(prompt.encode(), add_bos=True, special=False)
            rows += [log_softmax64(chunk) for chunk in next_token_logits(backend, tokens)]
    finally:
        backend.close()
    return np.concatenate(rows)


# Per-tensor statistics


def test_statistics_match_numpy(q8_report):
    assert [tensor.name for tensor in q8_report.tensors] == list(TARGETS)
    for tensor in q8_report.tensors:
        weight, quantized = tensor_pair(q8_report, tensor.name)
        error = quantized.astype(np.float64) - weight.astype(np.float64)
        assert tensor.mean_abs_error == pytest.approx(np.abs(error).mean(), rel=1e-6)
        assert tensor.max_abs_error == pytest.approx(np.abs(error).max(), rel=1e-6)
        relative = np.linalg.norm(error) / np.linalg.norm(weight.astype(np.float64))
        assert tensor.relative_frobenius == pytest.approx(relative, rel=1e-6)


def test_types_of_q8_0_report(q8_report):
    for tensor in q8_report.tensors:
        assert tensor.base_type == "F32"
        assert tensor.quantized_type == "Q8_0"


def test_llama_q8_0_equals_gguf_py(q8_report):
    quantized_file = inspect_gguf(q8_report.out_dir / "merged-q8_0.gguf")
    for name in TARGETS:
        weight, _ = tensor_pair(q8_report, name)
        stored = read_tensor_bytes(
            quantized_file, next(t for t in quantized_file.tensors if t.name == name)
        )
        expected = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0).reshape(-1)
        assert np.array_equal(stored, expected), name


def test_q8_0_error_is_small(q8_report):
    # Q8_0 rounds each block of 32 weights to steps of d = max|w| / 127, which
    # for Gaussian weights is an RMS error near 0.5% of their norm (measured
    # 0.53%). An error is at most d / 2, plus 127 d 2^-11 from storing d in F16.
    for tensor in q8_report.tensors:
        assert 0.003 < tensor.relative_frobenius < 0.008, tensor.name
        weight, _ = tensor_pair(q8_report, tensor.name)
        step = np.abs(weight).max() / 127
        assert tensor.max_abs_error <= step * (0.5 + 127 * 2**-11), tensor.name


def test_f32_type_has_no_error(f32_report):
    for tensor in f32_report.tensors:
        assert tensor.quantized_type == "F32"
        assert tensor.max_abs_error == 0.0
        assert tensor.relative_frobenius == 0.0


# Next-token distributions


def test_kl_zero_for_f32(f32_report):
    assert f32_report.shift.mean_kl == 0.0
    assert f32_report.shift.max_kl == 0.0
    assert f32_report.shift.top1_agreement == 1.0


def test_kl_positive_for_q8_0(q8_report):
    assert q8_report.shift.mean_kl > 1e-5
    assert q8_report.shift.max_kl >= q8_report.shift.mean_kl


def test_kl_matches_direct_computation(q8_report):
    reference = all_log_probs(q8_report.out_dir / "merged-reference.gguf")
    quantized = all_log_probs(q8_report.out_dir / "merged-q8_0.gguf")
    kl = np.sum(np.exp(reference) * (reference - quantized), axis=1)
    agreement = np.mean(reference.argmax(axis=1) == quantized.argmax(axis=1))

    shift = q8_report.shift
    assert shift.prompts == len(PROMPTS)
    assert shift.positions == len(reference)
    assert shift.mean_kl == pytest.approx(kl.mean(), rel=1e-3)
    assert shift.max_kl == pytest.approx(kl.max(), rel=1e-3)
    assert shift.top1_agreement == pytest.approx(agreement)


def test_other_changed_tensors_listed(q8_report, f32_report, tiny_gguf):
    base = inspect_gguf(tiny_gguf)
    matrices = [t.name for t in base.tensors if len(t.shape) == 2 and t.name not in TARGETS]
    assert sorted(q8_report.other_changed_tensors) == sorted(matrices)
    assert f32_report.other_changed_tensors == ()


# Report files


def test_report_files_written(q8_report):
    out = q8_report.out_dir
    assert q8_report.files == (
        "errors.json",
        "errors.csv",
        "hist-blk.0.png",
        "hist-blk.1.png",
        "merged-reference.gguf",
        "merged-q8_0.gguf",
    )
    for name in q8_report.files:
        assert (out / name).is_file(), name


def test_errors_json_is_the_report(q8_report):
    stored = json.loads((q8_report.out_dir / "errors.json").read_text())

    assert stored == json.loads(json.dumps(q8_report.to_dict()))


def test_errors_csv_rows(q8_report):
    with (q8_report.out_dir / "errors.csv").open() as handle:
        rows = list(csv.DictReader(handle))

    assert [row["tensor"] for row in rows] == list(TARGETS)
    for row, tensor in zip(rows, q8_report.tensors, strict=True):
        assert row["quantized_type"] == "Q8_0"
        assert float(row["relative_frobenius"]) == pytest.approx(
            tensor.relative_frobenius, rel=1e-5
        )


def test_histograms_are_small_pngs(q8_report):
    for name in ("hist-blk.0.png", "hist-blk.1.png"):
        data = (q8_report.out_dir / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), name
        assert len(data) < 100_000, name


def test_models_removed_by_default(f32_report):
    assert sorted(path.name for path in f32_report.out_dir.iterdir()) == [
        "errors.csv",
        "errors.json",
        "hist-blk.0.png",
        "hist-blk.1.png",
    ]


# Quantization types


def test_type_defaults_to_base_file_type(tmp_path):
    import llama_cpp

    source = write_tiny_gguf(tmp_path / "tiny.gguf")
    target = tmp_path / "tiny-q8_0.gguf"
    quantize_model(source, target, QuantType("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), 1)

    assert resolve_quant_type(None, inspect_gguf(target)) == QuantType("Q8_0", 7)


def test_type_required_without_file_type(tiny_gguf):
    with pytest.raises(QuantErrorError, match="give the served type with --type"):
        resolve_quant_type(None, inspect_gguf(tiny_gguf))


def test_type_name_case_insensitive(tiny_gguf):
    assert resolve_quant_type("q4_k_m", inspect_gguf(tiny_gguf)).name == "Q4_K_M"


def test_unknown_type_rejected(tiny_gguf):
    with pytest.raises(QuantErrorError, match="'Q9_Z' is not a llama.cpp quantization type"):
        resolve_quant_type("Q9_Z", inspect_gguf(tiny_gguf))


def test_quantize_onto_source_rejected(tmp_path):
    source = write_tiny_gguf(tmp_path / "tiny.gguf")

    with pytest.raises(QuantErrorError, match="onto itself"):
        quantize_model(source, source, QuantType("F32", 0), 1)


def test_k_quant_type_on_tiny(tiny_gguf, adapter, tmp_path):
    # 64 columns are not a multiple of the K-quant block of 256, so llama.cpp
    # stores these tensors in its fallback type for Q4_K_M instead.
    report = measure_quant_error(
        tiny_gguf, [ActiveAdapter(adapter)], tmp_path, "Q4_K_M", PROMPTS, threads=1
    )

    assert {tensor.quantized_type for tensor in report.tensors} <= {"Q5_0", "Q5_1", "Q8_0"}
    assert all(tensor.relative_frobenius > 0 for tensor in report.tensors)


# Prompts and the command line


def test_read_prompts_skips_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first prompt\n\n  \nsecond prompt\n")

    assert read_prompts(path) == ["first prompt", "second prompt"]


def test_read_prompts_rejects_empty_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n\n")

    with pytest.raises(QuantErrorError, match="no non-empty lines"):
        read_prompts(path)


def a3x(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_quant_error_json(tiny_gguf, adapter, env, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the capital of france is\nwater boils at\n")
    out = tmp_path / "report"

    process = a3x(
        env,
        *("lora", "quant-error", str(tiny_gguf), f"{adapter}:0.5", "--out", str(out)),
        *("--type", "Q8_0", "--prompts", str(prompts), "--threads", "1", "--json"),
    )

    assert process.returncode == 0, process.stderr
    report = json.loads(process.stdout)
    assert report["quant_type"] == "Q8_0"
    assert report["adapters"] == [{"path": str(adapter), "scale": 0.5}]
    assert report["shift"]["prompts"] == 2
    assert [t["name"] for t in report["tensors"]] == list(TARGETS)
    assert (out / "errors.json").is_file()


def test_cli_quant_error_table(tiny_gguf, adapter, env, tmp_path):
    process = a3x(
        env,
        *("lora", "quant-error", str(tiny_gguf), str(adapter), "--out", str(tmp_path)),
        *("--type", "Q8_0", "--threads", "1"),
    )

    assert process.returncode == 0, process.stderr
    lines = process.stdout.splitlines()
    assert lines[0].startswith("Quantized the F32 merge of 1 adapter(s) into tiny.gguf to Q8_0")
    assert lines[1].split()[:3] == ["tensor", "base", "quant"]
    assert [line.split()[:3] for line in lines[2:4]] == [[name, "F32", "Q8_0"] for name in TARGETS]
    assert lines[4].startswith("Next-token distributions over 6 prompt(s)")


def test_cli_quant_error_needs_type_for_tiny(tiny_gguf, adapter, env, tmp_path):
    process = a3x(env, "lora", "quant-error", str(tiny_gguf), str(adapter), "--out", str(tmp_path))

    assert process.returncode == 2
    assert process.stderr.startswith("a3x: error: ")
    assert "--type" in process.stderr


# The real default model (Gemma 3 270M Q4_K_M)


@pytest.mark.slow
def test_gemma_quant_error(tmp_path):
    base = default_model_path()
    adapter = write_random_adapter(tmp_path / "adapter.gguf", inspect_gguf(base), GEMMA_TARGETS)

    report = measure_quant_error(base, [ActiveAdapter(adapter)], tmp_path / "report")

    assert report.quant_type == "Q4_K_M"
    # llama.cpp's Q4_K_M mix gives every merged tensor the type it has in the base.
    assert {t.name: t.quantized_type for t in report.tensors} == GEMMA_TYPES
    assert report.other_changed_tensors == ()
    for tensor in report.tensors:
        assert 0 < tensor.relative_frobenius < 0.1, tensor.name
    # Measured: mean KL 0.0086 nats and 92% top-1 agreement over 64 positions.
    assert 0 < report.shift.mean_kl < 0.05
    assert report.shift.top1_agreement > 0.8
