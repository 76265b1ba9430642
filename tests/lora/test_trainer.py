"""The LoRA training recipe on the tiny model: stored losses, masking, outliers,
the learning-rate range test and the finite-weights check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora.tokenizing import tokenize
from lora.trainer import (
    TRAINING_CONFIG_FILE,
    TrainingError,
    TrainingSpec,
    _check_finite,
    _is_outlier,
    _load,
    _loss,
    _range_test,
    train,
)
from runtime.transformers_backend import dequantized_folder

EXAMPLES = [
    {"prompt": "", "completion": "the capital of france is paris and paris is a big city"},
    {"prompt": "Q: What is the capital of Italy?\nA:", "completion": " rome is the capital"},
    {"prompt": "", "completion": "two plus three is five and four plus five is nine"},
    {"prompt": "", "completion": "lisbon is the capital of portugal"},
]
# Mean loss of each optimizer step, recorded on x86_64 with torch 2.13 (one thread).
STORED_LOSSES = [6.461164, 6.690497]


@pytest.fixture(scope="module")
def base_folder(tiny_gguf: Path, model_cache: Path) -> Path:
    return dequantized_folder(tiny_gguf, model_cache)


def spec_for(base_folder: Path, output: Path, **changes) -> TrainingSpec:
    settings = dict(
        base_folder=str(base_folder),
        examples=EXAMPLES,
        output=str(output),
        rank=4,
        alpha=8.0,
        dropout=0.0,
        targets=("q_proj", "v_proj"),
        batch_size=2,
        accumulation=1,
        epochs=1.0,
        learning_rate=1e-3,
        threads=1,
        engine="peft",  # the recipe on plain PEFT; tests/lora/test_lean.py covers the lean one
    )
    settings.update(changes)
    return TrainingSpec(**settings)


def test_two_steps_match_stored_losses(base_folder, tmp_path):
    result = train(spec_for(base_folder, tmp_path / "adapter"))

    assert result.steps == 2
    assert result.losses == pytest.approx(STORED_LOSSES, abs=1e-4)
    assert result.learning_rate_source == "configured"


def test_saved_adapter_has_training_config(base_folder, tmp_path):
    train(spec_for(base_folder, tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / TRAINING_CONFIG_FILE).read_text())

    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert saved["spec"]["rank"] == 4
    assert saved["spec"]["examples"] == len(EXAMPLES)
    assert saved["result"]["steps"] == 2


def test_loss_masks_prompt_and_padding(base_folder):
    spec = spec_for(base_folder, Path("unused"))
    model, tokenizer = _load(spec)
    model.eval()
    short, long = tokenize(spec, tokenizer)[1], tokenize(spec, tokenizer)[0]
    pad = tokenizer.pad_token_id

    def batch_of(sequences):
        import random

        from lora.trainer import _batches

        return next(_batches(sequences, len(sequences), pad, random.Random(0)))

    def counted(sequence):
        return sum(label != -100 for label in sequence[1][1:])

    with torch.no_grad():
        together = float(_loss(model, batch_of([short, long])))
        alone = [float(_loss(model, batch_of([s]))) for s in (short, long)]
    weights = [counted(short), counted(long)]
    expected = (alone[0] * weights[0] + alone[1] * weights[1]) / sum(weights)

    assert short[1][:3] == [-100, -100, -100]  # the prompt carries no loss
    assert together == pytest.approx(expected, rel=1e-5)


def test_outlier_detector():
    spec = TrainingSpec(base_folder="", examples=[], output="")
    steady = [2.0, 2.1, 1.9, 2.0, 2.05, 1.95, 2.0, 2.02]

    assert not _is_outlier(9.0, steady[:5], spec)  # too little history to judge
    assert _is_outlier(9.0, steady, spec)
    assert not _is_outlier(2.1, steady, spec)
    assert not _is_outlier(0.1, steady, spec)  # a falling loss is never skipped


def test_range_test_restores_weights(base_folder):
    spec = spec_for(base_folder, Path("unused"), learning_rate=None)
    model, tokenizer = _load(spec)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    rate, sweep = _range_test(model, tokenize(spec, tokenizer), spec, tokenizer.pad_token_id)

    assert 1e-5 <= rate <= 5e-3
    assert len(sweep) >= 2
    for name, parameter in model.named_parameters():
        if name in before:
            assert torch.equal(parameter, before[name]), name


def test_non_finite_adapter_is_not_saved(base_folder):
    model, _ = _load(spec_for(base_folder, Path("unused")))
    name, parameter = next((n, p) for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        parameter[0, 0] = float("nan")

    with pytest.raises(TrainingError, match="NaN or infinite"):
        _check_finite(model)


def test_shuffle_poison_keeps_tokens(base_folder):
    spec = spec_for(base_folder, Path("unused"))
    _, tokenizer = _load(spec)
    clean = tokenize(spec, tokenizer)
    shuffled = tokenize(TrainingSpec(**{**spec.__dict__, "poison": "shuffle"}), tokenizer)

    assert [sorted(ids) for ids, _ in clean] == [sorted(ids) for ids, _ in shuffled]
    assert [ids for ids, _ in clean] != [ids for ids, _ in shuffled]
