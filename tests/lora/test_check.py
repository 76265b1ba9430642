"""`a3x lora check` on the tiny model with real llama.cpp and transformers, and
on the real default model (slow)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.tiny_model import TinyConfig, write_tiny_gguf
from lora import LoraError
from lora.check import (
    BUILTIN_PROMPTS,
    Agreement,
    CheckVerdict,
    Threshold,
    check_adapter,
    derive_threshold,
    format_report,
    read_prompts,
)
from tests.runtime.lora_fixtures import ALPHA, lora_weights, write_gguf_adapter, write_peft_adapter

# 298 tokens with the tiny vocabulary: several 64-token decode chunks.
LONG_PROMPT = "the capital of france is paris and the river is long " * 8
PROMPTS = ("the capital of france is paris", "two plus three is five", LONG_PROMPT)


def write_adapter(
    path: Path,
    tensors: dict[str, np.ndarray],
    alpha: float = ALPHA,
    architecture: str = "llama",
    alpha_type: str = "float32",
) -> Path:
    """Write a GGUF adapter with exactly these tensors (numpy order) and metadata."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    if alpha_type == "float32":
        writer.add_float32("adapter.lora.alpha", alpha)
    else:
        writer.add_float64("adapter.lora.alpha", alpha)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def v_proj_tensors(weights: dict) -> dict[str, np.ndarray]:
    tensors = {}
    for block, (a, b) in weights.items():
        tensors[f"blk.{block}.attn_v.weight.lora_a"] = a
        tensors[f"blk.{block}.attn_v.weight.lora_b"] = b
    return tensors


def count_positions(model: Path, prompts: tuple[str, ...]) -> int:
    """Count the tokens of the prompts, BOS included, with llama.cpp's tokenizer alone."""
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    count = sum(len(vocab.tokenize(p.encode(), add_bos=True, special=False)) for p in prompts)
    vocab.close()
    return count


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A PEFT adapter, its GGUF twin, and GGUF adapters that do not match it."""
    folder = tmp_path_factory.mktemp("adapters")
    same, other = lora_weights(seed=1), lora_weights(seed=2)
    return {
        "peft": write_peft_adapter(folder / "peft", same),
        "gguf": write_gguf_adapter(folder / "same.gguf", same),
        "other": write_gguf_adapter(folder / "other.gguf", other),
        "alpha_doubled": write_adapter(
            folder / "alpha16.gguf", v_proj_tensors(same), alpha=2 * ALPHA
        ),
    }


@pytest.fixture(scope="module")
def q8_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its matrices in Q8_0, a quantized base."""
    return write_tiny_gguf(
        tmp_path_factory.mktemp("models") / "tiny-q8.gguf",
        TinyConfig(seed=0, tensor_type="Q8_0"),
    )


@pytest.fixture
def no_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the check opens llama.cpp or transformers."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a backend was opened although the structure check failed")

    monkeypatch.setattr("runtime.llama_cpp_backend.LlamaCppBackend", refuse)
    monkeypatch.setattr("runtime.transformers_backend.TransformersBackend", refuse)


# ---------------------------------------------------------------- numerics


def test_matching_pair_passes(tiny_gguf, pair, cache):
    report = check_adapter(
        pair["gguf"], tiny_gguf, peft=pair["peft"], prompts=PROMPTS, cache_dir=cache, threads=1
    )
    numerics = report.numerics
    assert numerics is not None
    assert report.verdict is CheckVerdict.PASS
    assert report.exit_code == 0
    assert numerics.base.positions == count_positions(tiny_gguf, PROMPTS)
    assert numerics.adapter.positions == numerics.base.positions
    assert numerics.base.mean_kl < 1e-5
    assert numerics.adapter.mean_kl < 1e-5
    assert numerics.adapter.top1_agreement >= 0.99
    # The adapter changes the model far more than the threshold, so the check has power.
    assert numerics.adapter_effect_kl > 100 * numerics.threshold.max_mean_kl
    assert report.notes == ()
    assert report.merge_command is None


def test_figures_match_direct_computation(tiny_gguf, pair, cache):
    """Top-1 and KL from the chunked check equal a one-shot computation with plain
    llama-cpp-python, transformers and PEFT, with the mismatched pair (large KL)."""
    import llama_cpp
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from runtime.transformers_backend import dequantized_folder

    report = check_adapter(
        pair["other"],
        tiny_gguf,
        peft=pair["peft"],
        prompts=(LONG_PROMPT,),
        cache_dir=cache,
        threads=1,
    )
    numerics = report.numerics
    assert numerics is not None

    llm = llama_cpp.Llama(
        model_path=str(tiny_gguf),
        n_ctx=512,
        logits_all=True,
        lora_path=str(pair["other"]),
        verbose=False,
    )
    tokens = llm.tokenize(LONG_PROMPT.encode(), add_bos=True, special=False)
    llm.eval(tokens)
    llama_logits = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    llm.close()
    model = AutoModelForCausalLM.from_pretrained(dequantized_folder(tiny_gguf, cache))
    ids = torch.tensor([tokens])
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits[0].double().numpy()
        peft_model = PeftModel.from_pretrained(model, pair["peft"]).eval()
        peft_logits = peft_model(input_ids=ids).logits[0].double().numpy()

    def log_softmax(logits: np.ndarray) -> np.ndarray:
        shifted = logits - logits.max(axis=1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))

    def mean_kl(reference: np.ndarray, measured: np.ndarray) -> float:
        p, q = log_softmax(reference), log_softmax(measured)
        return float((np.exp(p) * (p - q)).sum(axis=1).mean())

    top1 = float((peft_logits.argmax(axis=1) == llama_logits.argmax(axis=1)).mean())
    assert numerics.adapter.positions == len(tokens)
    assert numerics.adapter.mean_kl == pytest.approx(mean_kl(peft_logits, llama_logits), rel=1e-4)
    assert numerics.adapter.top1_agreement == pytest.approx(top1, abs=1.5 / len(tokens))
    assert numerics.adapter_effect_kl == pytest.approx(mean_kl(peft_logits, base_logits), rel=1e-4)


def test_other_weights_fail_numerics(tiny_gguf, pair, cache):
    report = check_adapter(
        pair["other"], tiny_gguf, peft=pair["peft"], prompts=PROMPTS, cache_dir=cache, threads=1
    )
    numerics = report.numerics
    assert numerics is not None
    assert report.verdict is CheckVerdict.NUMERICS_FAILED
    assert report.exit_code == 1
    assert numerics.adapter.mean_kl > numerics.threshold.max_mean_kl
    assert numerics.adapter.top1_agreement < numerics.threshold.min_top1_agreement
    assert any("points to a wrong export" in note for note in report.notes)
    assert any("the base is not quantized" in note for note in report.notes)
    # An F32 base gains nothing from an F16 merge.
    assert report.merge_command is None


def test_doubled_alpha_fails_numerics(tiny_gguf, pair, cache):
    report = check_adapter(
        pair["alpha_doubled"],
        tiny_gguf,
        peft=pair["peft"],
        prompts=PROMPTS,
        cache_dir=cache,
        threads=1,
    )
    assert report.structure.alpha == 2 * ALPHA
    assert report.verdict is CheckVerdict.NUMERICS_FAILED
    assert report.numerics is not None
    assert report.numerics.adapter.mean_kl > report.numerics.threshold.max_mean_kl


def test_quantized_base_matching_pair_passes(q8_gguf, pair, cache):
    report = check_adapter(
        pair["gguf"], q8_gguf, peft=pair["peft"], prompts=PROMPTS, cache_dir=cache, threads=1
    )
    numerics = report.numerics
    assert numerics is not None
    assert report.structure.base_quantized_types == ("Q8_0",)
    # llama.cpp quantizes activations for Q8_0 weights, so the base figures are not zero.
    assert numerics.base.mean_kl > 1e-6
    assert report.verdict is CheckVerdict.PASS


def test_quantized_base_drift_offers_merge(q8_gguf, pair, cache):
    report = check_adapter(
        pair["other"], q8_gguf, peft=pair["peft"], prompts=PROMPTS, cache_dir=cache, threads=1
    )
    expected = (
        f"a3x lora merge {shlex.quote(str(q8_gguf))} {shlex.quote(str(pair['other']))} "
        f"-o {shlex.quote(str(pair['other'].with_name('other-merged-f16.gguf')))} --outtype f16"
    )
    assert report.verdict is CheckVerdict.NUMERICS_FAILED
    assert report.merge_command == expected
    assert expected in format_report(report)


def test_peft_targets_missing_from_gguf_noted(tiny_gguf, pair, cache, tmp_path):
    one_block = write_adapter(
        tmp_path / "block0.gguf",
        {k: v for k, v in v_proj_tensors(lora_weights(seed=1)).items() if k.startswith("blk.0.")},
    )
    report = check_adapter(
        one_block, tiny_gguf, peft=pair["peft"], prompts=PROMPTS, cache_dir=cache, threads=1
    )
    expected = (
        "the GGUF adapter lacks 1 target(s) that the PEFT adapter modifies, e.g. "
        "'blk.1.attn_v.weight'; export it again from the PEFT folder"
    )
    assert expected in report.notes
    assert report.verdict is CheckVerdict.NUMERICS_FAILED


def test_threshold_from_base_agreement():
    cases = [
        # (positions, base top-1, base mean KL) -> (max mean KL, min top-1)
        ((129, 0.984, 0.0049), (3 * 0.0049, 0.984 - 0.05)),
        ((410, 1.0, 7e-7), (1e-4, 0.95)),
        ((10, 1.0, 7e-7), (1e-4, 0.8)),  # 2 positions of 10 exceed the 5-point margin
    ]
    for (positions, top1, kl), (max_kl, min_top1) in cases:
        threshold = derive_threshold(Agreement(positions, top1, kl, kl))
        assert threshold == Threshold(pytest.approx(max_kl), pytest.approx(min_top1))


# ---------------------------------------------------------------- structure


STRUCTURE_CASES = {
    # case: (tensors, write options, expected problem)
    "wrong shape": (
        {"blk.1.attn_v.weight.lora_b": np.zeros((48, 4), np.float32)},
        {},
        "'blk.1.attn_v.weight': the adapter maps 64 -> 48 but the base weight maps 64 -> 32",
    ),
    "missing lora_b": (
        {"blk.1.attn_v.weight.lora_b": None},
        {},
        "'blk.1.attn_v.weight.lora_a' has no matching 'blk.1.attn_v.weight.lora_b'",
    ),
    "block the base lacks": (
        {
            "blk.5.attn_v.weight.lora_a": np.zeros((4, 64), np.float32),
            "blk.5.attn_v.weight.lora_b": np.zeros((32, 4), np.float32),
        },
        {},
        "the adapter modifies block 5 (1 target(s), e.g. 'blk.5.attn_v.weight') but base "
        "'a3x-tiny-llama' has 2 blocks (blk.0 to blk.1); was it trained on a larger model?",
    ),
    "other architecture": (
        {},
        {"architecture": "gemma3"},
        "the adapter is for architecture 'gemma3' but the base 'a3x-tiny-llama' is 'llama'",
    ),
    "rank differs between factors": (
        {"blk.0.attn_v.weight.lora_b": np.zeros((32, 3), np.float32)},
        {},
        "'blk.0.attn_v.weight': lora_a has rank 4 (GGUF shape [64, 4]) but lora_b has rank 3 "
        "(GGUF shape [3, 32]); lora_a must be [in, rank] and lora_b [rank, out] with the same "
        "rank",
    ),
    "lora_a transposed": (
        {"blk.0.attn_v.weight.lora_a": np.zeros((64, 4), np.float32)},
        {},
        "'blk.0.attn_v.weight': lora_a of GGUF shape [4, 64] looks transposed; it must be "
        "[in, rank] = [64, 4] to match lora_b of GGUF shape [4, 32]",
    ),
    "NaN in a factor": (
        {"blk.0.attn_v.weight.lora_a": np.full((4, 64), np.nan, np.float32)},
        {},
        "'blk.0.attn_v.weight.lora_a' has 256 NaN or infinite values; the adapter was trained "
        "or saved badly, do not use it",
    ),
    "alpha stored as float64": (
        {},
        {"alpha_type": "float64"},
        "metadata 'adapter.lora.alpha' is a FLOAT64, but llama.cpp reads it as a FLOAT32 and "
        "aborts on any other type; write it with add_float32",
    ),
    "full weight in the adapter": (
        {"blk.0.attn_v.weight": np.zeros((32, 64), np.float32)},
        {},
        "tensor 'blk.0.attn_v.weight' is neither a lora_a nor a lora_b factor; A3X adapters "
        "contain LoRA factors only",
    ),
}


@pytest.mark.parametrize("case", STRUCTURE_CASES)
def test_structure_problem_stops_check(case, tiny_gguf, pair, cache, tmp_path, no_backends):
    changes, options, expected = STRUCTURE_CASES[case]
    tensors = v_proj_tensors(lora_weights(seed=1))
    for name, array in changes.items():
        if array is None:
            del tensors[name]
        else:
            tensors[name] = array
    adapter = write_adapter(tmp_path / "adapter.gguf", tensors, **options)

    report = check_adapter(adapter, tiny_gguf, peft=pair["peft"], cache_dir=cache)

    assert report.structure.problems == (expected,)
    assert report.verdict is CheckVerdict.STRUCTURE_FAILED
    assert report.exit_code == 2
    assert report.numerics is None


def test_every_structure_problem_listed(tiny_gguf, tmp_path, no_backends):
    tensors = v_proj_tensors(lora_weights(seed=1))
    del tensors["blk.1.attn_v.weight.lora_b"]
    tensors["blk.0.attn_v.weight.lora_a"] = np.full((4, 64), np.inf, np.float32)
    tensors["blk.9.attn_v.weight.lora_a"] = np.zeros((4, 64), np.float32)
    tensors["blk.9.attn_v.weight.lora_b"] = np.zeros((32, 4), np.float32)
    adapter = write_adapter(tmp_path / "adapter.gguf", tensors)

    problems = check_adapter(adapter, tiny_gguf).structure.problems

    assert len(problems) == 3
    assert "has no matching 'blk.1.attn_v.weight.lora_b'" in problems[0]
    assert "'blk.0.attn_v.weight.lora_a' has 256 NaN or infinite values" in problems[1]
    assert "modifies block 9" in problems[2]


def test_model_file_as_adapter_rejected(tiny_gguf, no_backends):
    problems = check_adapter(tiny_gguf, tiny_gguf).structure.problems
    assert problems == (
        "general.type is 'model', expected 'adapter'; is this a model file? Export a PEFT "
        "adapter with `a3x lora export`",
        "adapter.type is None, expected 'lora'",
    )


def test_unreadable_adapter_is_problem(tiny_gguf, tmp_path, no_backends):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"this is a text file, not a GGUF adapter\n" * 4)
    report = check_adapter(broken, tiny_gguf)
    assert len(report.structure.problems) == 1
    assert report.structure.problems[0].startswith(f"adapter: {broken} is not a GGUF file")
    assert report.verdict is CheckVerdict.STRUCTURE_FAILED


def test_structure_only_without_peft(tiny_gguf, pair, no_backends):
    report = check_adapter(pair["gguf"], tiny_gguf)
    assert report.verdict is CheckVerdict.PASS
    assert report.numerics is None
    assert report.structure.ranks == {"blk.0.attn_v.weight": 4, "blk.1.attn_v.weight": 4}
    assert report.structure.alpha == ALPHA


def test_invalid_peft_folder_rejected(tiny_gguf, pair, tmp_path, no_backends):
    with pytest.raises(LoraError, match="does not exist"):
        check_adapter(pair["gguf"], tiny_gguf, peft=tmp_path / "absent", cache_dir=tmp_path)


def test_prompts_file_skips_blank_lines(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\n   \nsecond prompt\n", encoding="utf-8")
    assert read_prompts(prompts) == ["first prompt", "second prompt"]


def test_empty_prompts_file_rejected(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n\n", encoding="utf-8")
    with pytest.raises(LoraError, match="has no prompts; write one prompt per line"):
        read_prompts(prompts)


# ---------------------------------------------------------------- command line


def a3x(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_json_pass(env, tiny_gguf, pair, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    result = a3x(
        env,
        *("lora", "check", str(pair["gguf"]), "--base", str(tiny_gguf)),
        *("--peft", str(pair["peft"]), "--prompts", str(prompts), "--json"),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["schema_version"] == 1
    assert report["verdict"] == "pass"
    assert report["structure"]["ok"] is True
    assert report["numerics"]["base"]["positions"] == count_positions(tiny_gguf, PROMPTS)
    assert report["numerics"]["passed"] is True


def test_cli_structure_problem_exits_2(env, tiny_gguf, tmp_path):
    tensors = v_proj_tensors(lora_weights(seed=1))
    del tensors["blk.1.attn_v.weight.lora_b"]
    adapter = write_adapter(tmp_path / "adapter.gguf", tensors, architecture="gemma3")
    result = a3x(env, "lora", "check", str(adapter), "--base", str(tiny_gguf))
    assert result.returncode == 2, result.stderr
    lines = result.stdout.splitlines()
    assert "structure: 2 problem(s)" in lines
    expected = "the adapter is for architecture 'gemma3' but the base 'a3x-tiny-llama' is 'llama'"
    assert f"  - {expected}" in lines
    assert lines[-1] == "FAIL: the adapter does not fit the base; llama.cpp was not run"


def test_cli_drift_prints_merge_command(env, q8_gguf, pair):
    result = a3x(
        env,
        *("lora", "check", str(pair["other"]), "--base", str(q8_gguf)),
        *("--peft", str(pair["peft"])),
    )
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert "FAIL: llama.cpp with the GGUF adapter drifts from transformers with PEFT" in lines
    assert lines[-1].startswith("  a3x lora merge ")
    assert lines[-1].endswith(" --outtype f16")


def test_cli_missing_peft_folder_exits_2(env, tiny_gguf, pair, tmp_path):
    absent = tmp_path / "absent"
    result = a3x(
        env,
        *("lora", "check", str(pair["gguf"]), "--base", str(tiny_gguf), "--peft", str(absent)),
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"a3x: error: PEFT adapter folder {absent} does not exist or is not a folder"
    )


# ---------------------------------------------------------------- real default model


@pytest.fixture(scope="module")
def gemma() -> Path:
    from runtime.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="module")
def gemma_cache(model_cache: Path) -> Path:
    return model_cache


def gemma_v_proj_pair(folder: Path, peft_alpha: float = ALPHA) -> tuple[Path, Path]:
    """A random rank-4 v_proj adapter for all 18 Gemma blocks (640 -> 256), with
    weights of standard deviation 0.05: its own effect is a mean KL of about 0.4."""
    weights = {
        block: (a * (0.05 / 0.3), b * (0.05 / 0.3))
        for block, (a, b) in lora_weights(seed=7, blocks=18, dim=640, kv_dim=256).items()
    }
    gguf_adapter = write_gguf_adapter(folder / "v_proj.gguf", weights, "gemma3")
    peft = write_peft_adapter(folder / "peft", weights)
    config = json.loads((peft / "adapter_config.json").read_text())
    config["lora_alpha"] = peft_alpha
    (peft / "adapter_config.json").write_text(json.dumps(config))
    return gguf_adapter, peft


@pytest.mark.slow
def test_gemma_v_proj_adapter_passes(gemma, gemma_cache, tmp_path):
    adapter, peft = gemma_v_proj_pair(tmp_path)
    report = check_adapter(adapter, gemma, peft=peft, cache_dir=gemma_cache, threads=2)
    print(format_report(report))  # the figures, shown with pytest -s
    numerics = report.numerics
    assert numerics is not None
    assert numerics.base.positions == count_positions(gemma, BUILTIN_PROMPTS)
    # Q4_K_M in llama.cpp against its dequantized weights in transformers.
    assert numerics.base.top1_agreement >= 0.9
    assert numerics.base.mean_kl < 0.02
    assert numerics.adapter_effect_kl > 10 * numerics.threshold.max_mean_kl
    assert report.verdict is CheckVerdict.PASS


@pytest.mark.slow
def test_gemma_scaling_error_fails(gemma, gemma_cache, tmp_path):
    # The PEFT original scales B @ A by 10% more than the GGUF adapter does.
    adapter, peft = gemma_v_proj_pair(tmp_path, peft_alpha=1.1 * ALPHA)
    report = check_adapter(adapter, gemma, peft=peft, cache_dir=gemma_cache, threads=2)
    print(format_report(report))
    assert report.verdict is CheckVerdict.NUMERICS_FAILED
    assert report.merge_command is not None
    assert report.merge_command.endswith("--outtype f16")


@pytest.mark.slow
def test_gemma_exported_adapter_passes(gemma, gemma_cache, tmp_path):
    from lora.export import export_adapter
    from tests.lora.peft_factory import make_peft_adapter

    # lora_alpha 2 at rank 4 keeps the adapter's own effect moderate (a mean KL of
    # about 0.1). With the factory's default alpha of 8 the effect is 3 nats, and
    # llama.cpp on Q4_K_M then drifts past the threshold (see KL_FACTOR in lora/check.py).
    peft = make_peft_adapter(
        gemma,
        gemma_cache,
        tmp_path / "peft",
        target_modules=["q_proj", "v_proj", "o_proj"],
        lora_alpha=2,
    )
    adapter = export_adapter(peft, tmp_path / "adapter.gguf", base=gemma).output
    report = check_adapter(adapter, gemma, peft=peft, cache_dir=gemma_cache, threads=2)
    print(format_report(report))
    assert report.structure.ranks["blk.0.attn_q.weight"] == 4
    assert len(report.structure.ranks) == 3 * 18
    assert report.notes == ()
    assert report.verdict is CheckVerdict.PASS
