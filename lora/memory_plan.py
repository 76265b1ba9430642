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
