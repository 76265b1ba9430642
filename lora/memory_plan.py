"""Predicting the peak memory (RSS) of a LoRA training run before it starts.

The model is read from the training base's config.json, so nothing is loaded.
All tensors are float32 (4 bytes). The terms:

- runtime: the Python process with torch, transformers and PEFT imported,
  plus the tokenizer, which grows with the vocabulary (measured below);
- weights: every parameter of the base, tied embeddings counted once;
- LoRA: the adapter's parameters, their gradients and AdamW's two moments;
- activations: what autograd keeps for the backward pass, per token and
  layer, for the hidden-size and intermediate-size tensors of a decoder layer
  plus the attention probabilities (heads x sequence per token);
- logits: batch x sequence x vocabulary for the logits, their log-softmax,
  its gradient and the loss's working copy, which dominates for large
  vocabularies (Gemma 3: 262,144);
- allocator slack: over many steps of varying length, glibc keeps freed
  activation and logits buffers, so RSS climbs above the one-step peak.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lora import LoraError

FLOAT_BYTES = 4
# Measured on x86_64 Linux with torch 2.13 and transformers 5: 380 MiB after the
# imports, and a peak 461 MiB higher while Gemma 3's 262,144-token tokenizer
# loads, about 1.8 KiB per vocabulary entry.
IMPORTS_BYTES = 380 * 2**20
TOKENIZER_BYTES_PER_TOKEN = 1844
# Floats kept for backward per token and decoder layer, as multiples of the
# hidden size and the intermediate size. Counted from a Llama/Gemma decoder
# layer: norms, q/k/v/o inputs and outputs, rotary copies and residuals on the
# hidden side; gate, up, activation and product on the MLP side.
HIDDEN_FLOATS_PER_TOKEN = 16
INTERMEDIATE_FLOATS_PER_TOKEN = 4
LOGIT_COPIES = 4  # logits, log-softmax output, its gradient, the loss's working copy
# Measured on Gemma 3 270M, batch 1, sequences up to 256 tokens: one step peaked
# at 3,240 MiB, while a 45-step run with varying lengths peaked at 3,929 MiB; the
# difference is 0.5 times the activation and logits bytes of a 256-token step.
ALLOCATOR_SLACK = 0.5


class MemoryBudgetError(LoraError):
    """A training run is predicted to exceed the memory budget."""


@dataclass(frozen=True)
class MemoryPlan:
    runtime_bytes: int
    weights_bytes: int
    lora_bytes: int
    activation_bytes: int
    logits_bytes: int
    allocator_slack_bytes: int

    @property
    def peak_bytes(self) -> int:
        return (
            self.runtime_bytes
            + self.weights_bytes
            + self.lora_bytes
            + self.activation_bytes
            + self.logits_bytes
            + self.allocator_slack_bytes
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "peak_bytes": self.peak_bytes}


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    parameters: int


def read_model_shape(folder: Path) -> ModelShape:
    """Read the shape of a Hugging Face causal LM folder from its config.json."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise LoraError(f"cannot read the training base's config {path}: {error}") from error
    config = config.get("text_config", config)
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads", heads))
    head_dim = int(config.get("head_dim") or hidden // heads)
    intermediate = int(config["intermediate_size"])
    layers = int(config["num_hidden_layers"])
    vocab = int(config["vocab_size"])
    per_layer = (
        hidden * heads * head_dim * 2  # q and o
        + hidden * kv_heads * head_dim * 2  # k and v
        + hidden * intermediate * 3  # gate, up, down
    )
    parameters = layers * per_layer + vocab * hidden
    if not config.get("tie_word_embeddings", True):
        parameters += vocab * hidden
    return ModelShape(layers, hidden, intermediate, heads, kv_heads, head_dim, vocab, parameters)


def lora_parameter_count(shape: ModelShape, rank: int, targets: tuple[str, ...]) -> int:
    q_out, kv_out = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    sizes = {
        "q_proj": (shape.hidden, q_out),
        "k_proj": (shape.hidden, kv_out),
        "v_proj": (shape.hidden, kv_out),
        "o_proj": (q_out, shape.hidden),
        "gate_proj": (shape.hidden, shape.intermediate),
        "up_proj": (shape.hidden, shape.intermediate),
        "down_proj": (shape.intermediate, shape.hidden),
    }
    unknown = [t for t in targets if t not in sizes]
    if unknown:
        raise LoraError(
            f"target modules {', '.join(unknown)} are not linear layers of a decoder block; "
            f"choose from {', '.join(sizes)}"
        )
    return shape.layers * sum(rank * (sizes[t][0] + sizes[t][1]) for t in targets)


def plan_memory(
    shape: ModelShape, rank: int, targets: tuple[str, ...], batch: int, sequence: int
) -> MemoryPlan:
    tokens = batch * sequence
    per_token_layer = (
        HIDDEN_FLOATS_PER_TOKEN * shape.hidden
        + INTERMEDIATE_FLOATS_PER_TOKEN * shape.intermediate
        + shape.heads * sequence  # attention probabilities
    )
    activations = tokens * shape.layers * per_token_layer * FLOAT_BYTES
    logits = tokens * shape.vocab * FLOAT_BYTES * LOGIT_COPIES
    return MemoryPlan(
        runtime_bytes=IMPORTS_BYTES + shape.vocab * TOKENIZER_BYTES_PER_TOKEN,
        weights_bytes=shape.parameters * FLOAT_BYTES,
        lora_bytes=lora_parameter_count(shape, rank, targets) * FLOAT_BYTES * 4,
        activation_bytes=activations,
        logits_bytes=logits,
        allocator_slack_bytes=int((activations + logits) * ALLOCATOR_SLACK),
    )


def check_budget(plan: MemoryPlan, budget_bytes: int, batch: int, sequence: int) -> None:
    """Raise MemoryBudgetError, with what to change, when the plan exceeds the budget."""
    if plan.peak_bytes <= budget_bytes:
        return
    gib = 2**30
    raise MemoryBudgetError(
        f"training is predicted to peak at {plan.peak_bytes / gib:.2f} GiB (weights "
        f"{plan.weights_bytes / gib:.2f}, activations {plan.activation_bytes / gib:.2f}, "
        f"logits {plan.logits_bytes / gib:.2f}) with batch {batch} and sequence {sequence}, "
        f"over the budget of {budget_bytes / gib:.2f} GiB; lower retrain.batch_size or "
        "retrain.max_sequence, or raise retrain.memory_budget_mb"
    )


# The lean engine (lora/lean.py). Measured on x86_64 Linux, torch 2.13, transformers
# 5.25, Gemma 3 270M, bf16, with the training child's fixed 4 MiB mmap threshold:
# - after importing torch, transformers and the model classes: LEAN_IMPORTS_BYTES;
# - the tokenizing child peaks at 723 MiB: TOKENIZER_IMPORTS_BYTES plus
#   TOKENIZER_BYTES_PER_TOKEN per vocabulary entry;
# - per token, activations kept for backward, in compute-dtype elements per unit of
#   (hidden + intermediate) size: LEAN_ACTIVATION_FACTOR per decoder layer, or with
#   checkpointing the layer inputs plus LEAN_CHECKPOINT_FACTOR for the one layer
#   being recomputed;
# - per token and per token of its sequence (attention masks and scores):
#   LEAN_QUADRATIC_BYTES;
# - BLAS and oneDNN buffers, autograd bookkeeping and what the allocator keeps:
#   LEAN_SLACK_BYTES.
# Fitted by least squares on 3-step runs at sequence lengths 128, 256, 512 and 1024,
# batch 1 and 2, with and without checkpointing: every prediction is within 4% of
# its measured peak (docs/lean-training.md has the table).
# NOTE: the runs had fixed lengths and no learning-rate range test. A real round on
# Gemma 3 270M (batch 1, up to 128 tokens) peaked at 0.91 GiB against 0.78 predicted.
LEAN_IMPORTS_BYTES = 376 * 2**20
TOKENIZER_IMPORTS_BYTES = 263 * 2**20
LEAN_ACTIVATION_FACTOR = 10.8
LEAN_CHECKPOINT_FACTOR = 4.8
LEAN_QUADRATIC_BYTES = 19.5
LEAN_SLACK_BYTES = 128 * 2**20


@dataclass(frozen=True)
class LeanPlan:
    """The lean engine's predicted peaks: the training process and, before it, the
    short tokenizing process. Only one of them runs at a time."""

    runtime_bytes: int
    weights_bytes: int
    lora_bytes: int
    activation_bytes: int
    loss_bytes: int
    slack_bytes: int
    tokenizer_bytes: int
    checkpointing: bool

    @property
    def peak_bytes(self) -> int:
        return max(self.training_bytes, self.tokenizer_bytes)

    @property
    def training_bytes(self) -> int:
        return (
            self.runtime_bytes
            + self.weights_bytes
            + self.lora_bytes
            + self.activation_bytes
            + self.loss_bytes
            + self.slack_bytes
        )

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "training_bytes": self.training_bytes,
            "peak_bytes": self.peak_bytes,
        }


def gguf_weight_bytes(gguf_path: Path, shape: ModelShape, dtype_bytes: int) -> int:
    """Return the bytes the lean engine holds for the base: every 2-D tensor in its
    GGUF type, and the norms (1-D) in the compute dtype."""
    from runtime.gguf_file import inspect_gguf

    total = 0
    for tensor in inspect_gguf(gguf_path).tensors:
        if len(tensor.shape) >= 2:
            total += tensor.n_bytes
        else:
            total += int(tensor.shape[0]) * dtype_bytes
    return total


def plan_lean_memory(
    shape: ModelShape,
    weights_bytes: int,
    rank: int,
    targets: tuple[str, ...],
    batch: int,
    sequence: int,
    dtype_bytes: int,
    checkpointing: bool,
    loss_chunk: int = 8192,
) -> LeanPlan:
    tokens = batch * sequence
    width = shape.hidden + shape.intermediate
    if checkpointing:
        per_token = (shape.layers * shape.hidden + LEAN_CHECKPOINT_FACTOR * width) * dtype_bytes
    else:
        per_token = shape.layers * LEAN_ACTIVATION_FACTOR * width * dtype_bytes
    activations = tokens * per_token + tokens * sequence * LEAN_QUADRATIC_BYTES
    # The chunked loss's working set (lora/chunked_loss.py), for every token as an
    # upper bound, plus one dequantized vocabulary chunk in float32.
    chunk = min(loss_chunk, shape.vocab)
    loss = (
        tokens * shape.hidden * (3 * FLOAT_BYTES + 2 * dtype_bytes)
        + tokens * chunk * (2 * FLOAT_BYTES + dtype_bytes)
        + chunk * shape.hidden * (FLOAT_BYTES + dtype_bytes)
    )
    return LeanPlan(
        runtime_bytes=LEAN_IMPORTS_BYTES,
        weights_bytes=weights_bytes,
        lora_bytes=lora_parameter_count(shape, rank, targets) * FLOAT_BYTES * 4,
        activation_bytes=int(activations),
        loss_bytes=loss,
        slack_bytes=LEAN_SLACK_BYTES,
        tokenizer_bytes=TOKENIZER_IMPORTS_BYTES + shape.vocab * TOKENIZER_BYTES_PER_TOKEN,
        checkpointing=checkpointing,
    )


def choose_lean_plan(
    shape: ModelShape,
    weights_bytes: int,
    rank: int,
    targets: tuple[str, ...],
    batch: int,
    sequence: int,
    dtype_bytes: int,
    checkpointing: str = "auto",
) -> LeanPlan:
    """Plan with and without gradient checkpointing and choose. "auto" checkpoints when
    that lowers the predicted peak by more than CHECKPOINT_GAIN: on a CPU the
    recomputed forward costs little next to the vocabulary-wide loss (measured: the
    same CPU time per step on Gemma 3 270M, batch 2, sequence 256)."""
    plans = {
        flag: plan_lean_memory(
            shape, weights_bytes, rank, targets, batch, sequence, dtype_bytes, flag
        )
        for flag in (False, True)
    }
    if checkpointing in ("on", "off"):
        return plans[checkpointing == "on"]
    saved = 1 - plans[True].peak_bytes / plans[False].peak_bytes
    return plans[True] if saved > CHECKPOINT_GAIN else plans[False]


CHECKPOINT_GAIN = 0.05


def check_lean_budget(plan: LeanPlan, budget_bytes: int, batch: int, sequence: int) -> None:
    """Raise MemoryBudgetError, with what to change, when a lean plan exceeds the budget."""
    if plan.peak_bytes <= budget_bytes:
        return
    gib = 2**30
    if plan.tokenizer_bytes > budget_bytes >= plan.training_bytes:
        raise MemoryBudgetError(
            f"tokenizing is predicted to peak at {plan.tokenizer_bytes / gib:.2f} GiB, over the "
            f"budget of {budget_bytes / gib:.2f} GiB (the tokenizer's vocabulary sets this "
            "peak); raise retrain.memory_budget_mb"
        )
    raise MemoryBudgetError(
        f"training is predicted to peak at {plan.training_bytes / gib:.2f} GiB (weights "
        f"{plan.weights_bytes / gib:.2f}, activations {plan.activation_bytes / gib:.2f}, loss "
        f"{plan.loss_bytes / gib:.2f}, checkpointing {'on' if plan.checkpointing else 'off'}) "
        f"with batch {batch} and sequence {sequence}, over the budget of "
        f"{budget_bytes / gib:.2f} GiB; lower retrain.batch_size or retrain.max_sequence, or "
        "raise retrain.memory_budget_mb"
    )
