"""The training memory planner: its terms, their scaling, and the budget refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora.memory_plan import MemoryBudgetError, check_budget, plan_memory, read_model_shape

GEMMA_270M = {
    "hidden_size": 640,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "intermediate_size": 2048,
    "num_hidden_layers": 18,
    "vocab_size": 262144,
    "tie_word_embeddings": True,
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture
def shape(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps(GEMMA_270M))
    return read_model_shape(tmp_path)


def test_gemma_shape_counts_parameters(shape):
    # 268,098,176 in the released model: the difference is its norm weights.
    assert shape.parameters == 268_042_240


def test_gemma_plan_matches_measured_run(shape):
    plan = plan_memory(shape, 8, TARGETS, batch=1, sequence=256)

    # A 45-step run of this configuration peaked at 3,929 MiB (see the constants).
    assert plan.peak_bytes / 2**20 == pytest.approx(3924, abs=2)
    assert plan.lora_bytes == 18 * 8 * (640 + 1024 + 640 + 256 + 640 + 256 + 1024 + 640) * 16


def test_tokens_scale_activations_and_logits(shape):
    one = plan_memory(shape, 8, TARGETS, batch=1, sequence=128)
    two = plan_memory(shape, 8, TARGETS, batch=2, sequence=128)

    assert two.logits_bytes == 2 * one.logits_bytes
    assert two.activation_bytes == 2 * one.activation_bytes
    assert two.weights_bytes == one.weights_bytes


def test_over_budget_is_refused_with_fix(shape):
    plan = plan_memory(shape, 8, TARGETS, batch=2, sequence=256)

    with pytest.raises(MemoryBudgetError, match="lower retrain.batch_size"):
        check_budget(plan, 4096 * 2**20, batch=2, sequence=256)
    check_budget(plan, plan.peak_bytes, batch=2, sequence=256)


def test_unknown_target_is_refused(shape):
    with pytest.raises(Exception, match="embed_tokens"):
        plan_memory(shape, 8, ("embed_tokens",), batch=1, sequence=64)


# The default model's GGUF bytes as the lean engine holds them (Q4_K_M file: linear
# layers and the Q8_0 embedding in their blocks, norms in bf16).
GEMMA_LEAN_WEIGHTS = 246_476_032


def lean_plan(shape, batch=2, sequence=256, checkpointing=True):
    from lora.memory_plan import plan_lean_memory

    return plan_lean_memory(
        shape, GEMMA_LEAN_WEIGHTS, 8, TARGETS, batch, sequence, 2, checkpointing
    )


def test_lean_plan_terms_scale(shape):
    short, long = lean_plan(shape, sequence=128), lean_plan(shape, sequence=1024)
    assert long.activation_bytes > 8 * short.activation_bytes  # a quadratic part
    assert long.weights_bytes == short.weights_bytes == GEMMA_LEAN_WEIGHTS
    assert (
        lean_plan(shape, checkpointing=False).activation_bytes > lean_plan(shape).activation_bytes
    )
    assert short.peak_bytes == max(short.training_bytes, short.tokenizer_bytes)


def test_lean_plan_chooses_checkpointing_when_it_saves(shape):
    from lora.memory_plan import choose_lean_plan

    chosen = choose_lean_plan(shape, GEMMA_LEAN_WEIGHTS, 8, TARGETS, 2, 256, 2)
    assert chosen.checkpointing
    forced = choose_lean_plan(shape, GEMMA_LEAN_WEIGHTS, 8, TARGETS, 2, 256, 2, "off")
    assert not forced.checkpointing


def test_lean_budget_refusals_name_the_fix(shape):
    from lora.memory_plan import check_lean_budget

    plan = lean_plan(shape)
    with pytest.raises(MemoryBudgetError, match="lower retrain.batch_size"):
        check_lean_budget(plan, plan.training_bytes - 1, batch=2, sequence=256)
    tiny_tokens = lean_plan(shape, batch=1, sequence=16)
    if tiny_tokens.tokenizer_bytes > tiny_tokens.training_bytes:
        with pytest.raises(MemoryBudgetError, match="tokenizing"):
            check_lean_budget(tiny_tokens, tiny_tokens.training_bytes, batch=1, sequence=16)
    check_lean_budget(plan, plan.peak_bytes, batch=2, sequence=256)


def test_gguf_weight_bytes_counts_blocks(tiny_gguf, tmp_path):
    from lora.memory_plan import gguf_weight_bytes
    from runtime.gguf_file import inspect_gguf

    info = inspect_gguf(tiny_gguf)
    (tmp_path / "config.json").write_text(json.dumps(GEMMA_270M))
    counted = gguf_weight_bytes(tiny_gguf, read_model_shape(tmp_path), 2)
    matrices = sum(t.n_bytes for t in info.tensors if len(t.shape) >= 2)
    vectors = sum(t.shape[0] for t in info.tensors if len(t.shape) == 1)
    assert counted == matrices + 2 * vectors
