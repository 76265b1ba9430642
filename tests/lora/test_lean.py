"""The lean training model against plain PEFT on the same weights: the same loss and
LoRA gradients, a standard PEFT folder on save, sparse updates and checkpointing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora.lean import LeanModelError, LeanSettings, build_lean_model, cpu_has_bf16
from lora.peft_adapter import read_peft_adapter
from lora.tokenizing import load_tokenizer, tokenize, tokenize_in_child
from lora.trainer import TrainingSpec, _batches, _load, train
from runtime.transformers_backend import dequantized_folder

EXAMPLES = [
    {"prompt": "", "completion": "the capital of france is paris and paris is a big city"},
    {"prompt": "Q: What is the capital of Italy?\nA:", "completion": " rome is the capital"},
    {"prompt": "", "completion": "two plus three is five and four plus five is nine"},
    {"prompt": "", "completion": "lisbon is the capital of portugal"},
]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def base_folder(tiny_gguf: Path, model_cache: Path) -> Path:
    folder = dequantized_folder(tiny_gguf, model_cache)
    global TINY_GGUF
    TINY_GGUF = tiny_gguf
    return folder


TINY_GGUF: Path | None = None


def spec_for(base_folder: Path, output: Path, **changes) -> TrainingSpec:
    settings = dict(
        base_folder=str(base_folder),
        examples=EXAMPLES,
        output=str(output),
        rank=4,
        alpha=8.0,
        dropout=0.0,
        targets=TARGETS,
        batch_size=2,
        accumulation=1,
        epochs=1.0,
        learning_rate=1e-3,
        threads=1,
        precision="float32",
        base_gguf=str(TINY_GGUF),
    )
    settings.update(changes)
    return TrainingSpec(**settings)


def lean(base_folder: Path, **changes) -> torch.nn.Module:
    settings = dict(rank=4, alpha=8.0, dropout=0.0, targets=TARGETS, dtype="float32")
    settings.update(changes)
    return build_lean_model(base_folder, LeanSettings(**settings), TINY_GGUF)


def a_batch(base_folder: Path):
    spec = spec_for(base_folder, Path("unused"))
    tokenizer = load_tokenizer(str(base_folder))
    sequences = tokenize(spec, tokenizer)
    import random

    return next(_batches(sequences, 4, tokenizer.pad_token_id, random.Random(0)))


def randomize_lora(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every B factor nonzero values, so the adapters change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def peft_twin(base_folder: Path, lean_model, tmp_path: Path):
    """Save the lean model's factors and load them with PEFT on the dequantized base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = lean_model.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    return PeftModel.from_pretrained(base, folder, is_trainable=True)


def test_loss_and_gradients_match_peft(base_folder, tmp_path):
    torch.manual_seed(0)
    model = lean(base_folder)
    randomize_lora(model)
    twin = peft_twin(base_folder, model, tmp_path)
    batch = a_batch(base_folder)

    ours = model(batch.input_ids, batch.attention_mask, batch.labels).loss
    theirs = twin(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
    ).loss
    ours.backward()
    theirs.backward()

    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-5)
    peft_grads = {
        name.removeprefix("base_model.model.").replace(".default", ""): p.grad
        for name, p in twin.named_parameters()
        if p.requires_grad
    }
    for path, module in model.lora_modules().items():
        for factor in ("lora_A", "lora_B"):
            expected = peft_grads[f"{path}.{factor}.weight"]
            got = getattr(module, factor).weight.grad
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_saved_folder_is_a_peft_adapter(base_folder, tmp_path):
    model = lean(base_folder)
    randomize_lora(model)
    folder = model.save_pretrained(tmp_path / "adapter")
    adapter = read_peft_adapter(folder)
    config = json.loads((folder / "adapter_config.json").read_text())

    assert config["target_modules"] == sorted(TARGETS)
    assert config["base_model_name_or_path"] == str(base_folder)
    assert len(adapter.factors) == 2 * len(TARGETS)  # the tiny model has two blocks
    assert adapter.scaling("model.layers.0.self_attn.q_proj") == 2.0


def test_frozen_weights_take_no_gradient(base_folder):
    model = lean(base_folder)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_checkpointing_gives_the_same_loss_and_gradients(base_folder):
    batch = a_batch(base_folder)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = lean(base_folder, checkpointing=checkpointing)
        randomize_lora(model)
        loss = model(batch.input_ids, batch.attention_mask, batch.labels).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((float(loss), grads))
    (loss_off, grads_off), (loss_on, grads_on) = results
    assert loss_on == pytest.approx(loss_off, rel=1e-6)
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad)


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bfloat16")
def test_bfloat16_loss_is_close_to_float32(base_folder):
    batch = a_batch(base_folder)
    losses = []
    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)
        model = lean(base_folder, dtype=dtype)
        randomize_lora(model)
        losses.append(float(model(batch.input_ids, batch.attention_mask, batch.labels).loss))
    assert losses[1] == pytest.approx(losses[0], rel=0.02)


def test_sparse_selection_keeps_the_most_affected_layers(base_folder, tmp_path):
    model = lean(base_folder)
    batches = iter([a_batch(base_folder)] * 2)
    impact = model.probe_impact(batches, 2)
    assert set(impact) == set(model.target_layers)
    assert all(value > 0 for value in impact.values())
    top = sorted(impact, key=impact.__getitem__, reverse=True)[:3]

    model.drop_lora(set(top))
    folder = model.save_pretrained(tmp_path / "sparse")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert sorted(model.lora_modules()) == sorted(top)
    assert config["target_modules"] == sorted(top)  # full paths: not every layer
    assert sorted(read_peft_adapter(folder).factors) == sorted(top)


def test_train_with_sparse_updates_end_to_end(base_folder, tmp_path):
    spec = spec_for(base_folder, tmp_path / "out", module_fraction=0.5, probe_batches=2)
    result = train(spec)

    assert result.engine == "lean"
    assert result.precision == "float32"
    assert (result.modules_total, result.modules_trained) == (8, 4)
    assert len(result.module_impact) == 8
    assert result.tokenizer_peak_rss_bytes > 0
    assert len(read_peft_adapter(tmp_path / "out").factors) == 4


def test_lean_and_peft_engines_train_alike(base_folder, tmp_path):
    """Same data, same seed, float32: the two engines' step losses agree closely (their
    LoRA initializations draw from the same generator in a different order, so only
    the first step's loss, before any update, is equal)."""
    lean_result = train(spec_for(base_folder, tmp_path / "lean"))
    peft_result = train(spec_for(base_folder, tmp_path / "peft", engine="peft"))
    assert lean_result.losses[0] == pytest.approx(peft_result.losses[0], rel=1e-4)


def test_tokenizing_child_matches_in_process(base_folder):
    spec = spec_for(base_folder, Path("unused"))
    sequences, pad_id, peak = tokenize_in_child(spec)
    tokenizer = load_tokenizer(str(base_folder))
    assert sequences == tokenize(spec, tokenizer)
    assert pad_id == tokenizer.pad_token_id
    assert peak > 10 * 2**20


def test_folder_without_source_is_refused(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    with pytest.raises(LeanModelError, match="not an A3X dequantized model folder"):
        lean(folder)


def test_gone_gguf_is_named(base_folder, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(base_folder, copy)
    marker = json.loads((copy / "a3x-cache.json").read_text())
    marker["source"] = str(tmp_path / "moved.gguf")
    (copy / "a3x-cache.json").write_text(json.dumps(marker))
    with pytest.raises(LeanModelError, match="moved.gguf"):
        build_lean_model(copy, LeanSettings(targets=TARGETS))


def test_another_gguf_is_refused(base_folder, tmp_path):
    other = tmp_path / "other.gguf"
    other.write_bytes(TINY_GGUF.read_bytes() + b"\0")
    with pytest.raises(LeanModelError, match="is not the GGUF file"):
        build_lean_model(base_folder, LeanSettings(targets=TARGETS), other)


def test_peft_engine_loads_plain_model(base_folder):
    model, _ = _load(spec_for(base_folder, Path("unused"), engine="peft"))
    assert type(model).__name__ == "PeftModelForCausalLM"


def test_lean_training_in_a_child(base_folder, tmp_path):
    from lora.child import allocator_settings, run_training_child

    spec = spec_for(base_folder, tmp_path / "child")
    result = run_training_child(spec, 4 * 2**30)
    assert result.engine == "lean"
    assert result.steps == 2
    assert result.peak_rss_bytes > 0
    assert result.tokenizer_peak_rss_bytes > 0
    assert allocator_settings(spec) == {"MALLOC_MMAP_THRESHOLD_": str(4 * 2**20)}
    assert allocator_settings(spec_for(base_folder, tmp_path, engine="peft")) == {}


def test_moved_gguf_is_recorded_as_the_source(tiny_gguf, model_cache, tmp_path):
    moved = tmp_path / "moved.gguf"
    moved.write_bytes(tiny_gguf.read_bytes())
    folder = dequantized_folder(moved, model_cache)
    assert json.loads((folder / "a3x-cache.json").read_text())["source"] == str(moved)
    dequantized_folder(tiny_gguf, model_cache)  # put the session's file back


def test_lean_memory_bench_measures_and_predicts(tiny_gguf, model_cache):
    from bench.lean_memory import measure

    points = measure(tiny_gguf, model_cache, [1], [32], [True], steps=1)
    (point,) = points
    assert point.measured_bytes > 100 * 2**20  # a process with torch imported
    assert point.predicted_bytes > 0
    assert point.tokenizer_measured_bytes > 0


def test_lean_compile_bench_runs_both_sides(base_folder):
    from bench.lean_compile import measure

    result = measure(base_folder, TINY_GGUF, steps=3, batch=1, sequence=16, threads=1)
    assert len(result["eager"]) == len(result["compiled"]) == 3
    assert result["ratio"] > 0


def test_padding_to_a_multiple_keeps_the_loss(base_folder):
    import random

    spec = spec_for(base_folder, Path("unused"))
    tokenizer = load_tokenizer(str(base_folder))
    sequences = tokenize(spec, tokenizer)
    pad = tokenizer.pad_token_id
    tight = next(_batches(sequences, 4, pad, random.Random(0)))
    padded = next(_batches(sequences, 4, pad, random.Random(0), multiple=32))
    assert (
        padded.input_ids.shape[1] % 32 == 0 and padded.input_ids.shape[1] > tight.input_ids.shape[1]
    )

    model = lean(base_folder)
    randomize_lora(model)
    with torch.no_grad():
        losses = [
            float(model(b.input_ids, b.attention_mask, b.labels).loss) for b in (tight, padded)
        ]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
