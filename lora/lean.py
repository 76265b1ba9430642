"""The lean training model: a transformers decoder whose frozen weights stay in their
GGUF blocks, with LoRA factors on chosen linear layers and a vocabulary-chunked loss.

Plain PEFT training dequantizes the whole base to float32 (about 1.1 GB for
Gemma 3 270M) and materializes logits over the full vocabulary for every
token (262,144 floats each, several copies). Here:

- each frozen linear layer keeps its GGUF bytes (`lora/quantized.py`) and is
  dequantized in forward and again in backward, one layer at a time, so the
  LoRA factors are trained against exactly the weights llama.cpp serves;
- the tied embedding stays in its GGUF type too: rows are gathered for the
  input, and vocabulary chunks are dequantized for the output projection;
- the loss is computed only for the tokens that have a label, chunk by chunk
  over the vocabulary (`lora/chunked_loss.py`), never as a full logits tensor;
- compute runs in bfloat16 when the CPU has native bf16 instructions, in
  float32 otherwise; the LoRA factors and their optimizer state stay float32
  and are cast for each product, as under autocast.

PEFT's LoRA layers wrap `torch.nn.Linear` and read its dense `weight`, which
these layers do not have, so the LoRA factors live in `LoraLinear` below. The
result is saved as a standard PEFT folder (same keys, same config), so PEFT,
the exporter and the check load it like any other adapter.

The transformers model class supplies the architecture (attention, rotary
embeddings, norms); it is built on the meta device, so no dense weight is
ever allocated, and only the norms are read from the dequantized folder.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lora import LoraError
from lora.chunked_loss import chunked_cross_entropy
from lora.names import heads_of, rows_permuted, unpermute_rows
from lora.peft_adapter import write_peft_adapter
from lora.quantized import QuantEmbedding, QuantizedWeight, QuantLinear
from runtime.gguf_file import GGUFInfo, TensorInfo, check_model_file

CACHE_MARKER = "a3x-cache.json"  # written by runtime.transformers_backend.dequantized_folder


class LeanModelError(LoraError):
    """The lean trainer cannot build a model from this base."""


@dataclass(frozen=True)
class LeanSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    dtype: str = "auto"  # "auto", "bfloat16" or "float32"
    checkpointing: bool = False
    loss_chunk: int = 8192
    modules: tuple[str, ...] = ()  # full module paths to adapt; empty: every target


@functools.cache
def cpu_has_bf16() -> bool:
    """Tell whether this CPU runs bfloat16 matrix products natively (AVX512-BF16 or
    AMX); without them, torch emulates bf16 and it is slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    native = any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))
    return native and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def compute_dtype(setting: str) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if setting in ("bfloat16", "float32"):
        return getattr(torch, setting)
    raise LeanModelError(f"precision {setting!r} is not one of auto, bfloat16, float32")


def source_gguf(base_folder: Path, explicit: Path | None = None) -> Path:
    """Return the GGUF file an A3X dequantized folder was built from: `explicit` when its
    SHA-256 is the folder's, else the path recorded when the folder was built."""
    from runtime.gguf_file import sha256_of_file

    marker = base_folder / CACHE_MARKER
    try:
        stored = json.loads(marker.read_text())
        source, sha256 = Path(stored["source"]), str(stored["sha256"])
    except (OSError, KeyError, ValueError) as error:
        raise LeanModelError(
            f"{base_folder} is not an A3X dequantized model folder (no readable {CACHE_MARKER}); "
            "the lean trainer needs the GGUF file the folder was built from"
        ) from error
    if explicit is not None:
        if not explicit.is_file() or sha256_of_file(explicit) != sha256:
            raise LeanModelError(
                f"{explicit} is not the GGUF file {base_folder} was built from (SHA-256 "
                f"{sha256[:12]}...); pass that model, or the folder built from this one"
            )
        return explicit
    if not source.is_file():
        raise LeanModelError(
            f"the GGUF file {source} that {base_folder} was built from is gone; restore it or "
            'set retrain.engine = "peft"'
        )
    return source


class LoraLinear(nn.Module):
    """A frozen layer plus a trainable low-rank update, `y = base(x) + s * B(A(drop(x)))`,
    with PEFT's initialization (A Kaiming-uniform, B zero) and scaling s = alpha / r."""

    def __init__(self, base: QuantLinear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        # The update runs in the compute dtype, as under autocast: the float32 factors
        # are cast for the product and their gradients come back in float32. A float32
        # copy of every adapted layer's input would cost more than the factors.
        dtype = result.dtype
        hidden = F.linear(self.dropout(x.to(dtype)), self.lora_A.weight.to(dtype))
        update = F.linear(hidden, self.lora_B.weight.to(dtype))
        return result + update * self.scaling


class LeanCausalLM(nn.Module):
    """A decoder with quantized frozen weights and LoRA factors; `forward` returns an
    object with `.loss` like a transformers model called with labels."""

    def __init__(
        self,
        decoder: nn.Module,
        output: Any,
        config: Any,
        settings: LeanSettings,
        target_layers: tuple[str, ...],
        base_folder: Path,
    ):
        super().__init__()
        self.decoder = decoder  # the transformers base model (embeddings, layers, final norm)
        self.output = output  # QuantizedWeight of the output projection (tied or not)
        self.config = config
        self.settings = settings
        self.dtype = compute_dtype(settings.dtype)
        self.target_layers = target_layers  # every layer the targets name, adapted or not
        self.base_folder = base_folder  # named as the base in the saved adapter config

    def forward(self, input_ids: Any, attention_mask: Any, labels: Any) -> Any:
        hidden = self.decoder(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        # Position i predicts token i + 1; only labelled positions reach the output layer.
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        targets = labels[:, 1:].reshape(-1)
        keep = targets != -100
        loss = chunked_cross_entropy(
            hidden[keep],
            self.output,
            targets[keep],
            chunk_size=self.settings.loss_chunk,
            compute_dtype=self.dtype,
            softcap=getattr(self.config, "final_logit_softcapping", None),
        )
        return _Output(loss)

    def lora_modules(self) -> dict[str, LoraLinear]:
        """Return the adapted layers by their transformers module path."""
        return {
            _hf_path(name): module
            for name, module in self.decoder.named_modules()
            if isinstance(module, LoraLinear)
        }

    def drop_lora(self, keep: set[str]) -> None:
        """Remove the LoRA factors of every adapted layer not in `keep` (module paths)."""
        for path, module in self.lora_modules().items():
            if path not in keep:
                parent, child = _parent_of(self.decoder, _decoder_path(path))
                setattr(parent, child, module.base_layer)

    def probe_impact(self, batches: Any, count: int) -> dict[str, float]:
        """Rank the adapted layers by the gradient norm of their B factor over `count`
        batches. B starts at zero, so this is the first-order loss change a unit update
        of each layer buys: the layers with the largest norms matter most."""
        modules = self.lora_modules()
        for module in modules.values():
            module.lora_B.weight.grad = None
        for _ in range(count):
            batch = next(batches)
            self(batch.input_ids, batch.attention_mask, batch.labels).loss.backward()
        impact = {}
        for path, module in modules.items():
            grad = module.lora_B.weight.grad
            impact[path] = float(grad.norm()) if grad is not None else 0.0
        self.zero_grad(set_to_none=True)
        return impact

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the LoRA factors as a PEFT folder that PeftModel.from_pretrained loads."""
        factors = {
            path: (
                module.lora_A.weight.detach().float().numpy(),
                module.lora_B.weight.detach().float().numpy(),
            )
            for path, module in self.lora_modules().items()
        }
        paths = sorted(factors)
        complete = set(paths) == set(self.target_layers)
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": str(self.base_folder),
            "r": self.settings.rank,
            "lora_alpha": self.settings.alpha,
            "lora_dropout": self.settings.dropout,
            # Every layer of the targets: their short names; a sparse selection: full paths.
            "target_modules": sorted(self.settings.targets) if complete else paths,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "modules_to_save": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "inference_mode": True,
        }
        return write_peft_adapter(Path(folder), config, factors)


@dataclass
class _Output:
    loss: torch.Tensor


def build_lean_model(
    base_folder: Path, settings: LeanSettings, gguf_path: Path | None = None
) -> LeanCausalLM:
    """Build the lean model from an A3X dequantized folder (config and norms) and the
    GGUF file it came from (every linear layer and the embedding, kept quantized).
    Without `gguf_path`, the file recorded in the folder is used."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = compute_dtype(settings.dtype)
    gguf_path = source_gguf(base_folder, gguf_path)
    config = AutoConfig.from_pretrained(base_folder)
    config = getattr(config, "text_config", config)
    config.use_cache = False
    with torch.device("meta"):
        causal = AutoModelForCausalLM.from_config(config)
    decoder = causal.model

    info = check_model_file(gguf_path)
    architecture = info.architecture
    blocks = info.block_count or config.num_hidden_layers
    tensors = {tensor.name: tensor for tensor in info.tensors}

    # Linear layers of the decoder blocks: quantized, frozen.
    from lora.names import gguf_name_of_module

    for name, module in list(decoder.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        path = f"model.{name}"
        tensor_name = gguf_name_of_module(path, architecture, blocks)
        if tensor_name not in tensors:
            raise LeanModelError(
                f"{gguf_path} has no tensor for layer '{path}' ({tensor_name}); the dequantized "
                f"folder {base_folder} and the GGUF file do not describe the same model"
            )
        weight = _load_weight(info, tensors[tensor_name])
        if weight.shape != (module.out_features, module.in_features):
            raise LeanModelError(
                f"GGUF tensor {tensor_name} has shape {weight.shape}, but layer '{path}' needs "
                f"{(module.out_features, module.in_features)}"
            )
        if rows_permuted(architecture, tensor_name):
            heads = heads_of(tensor_name, info.metadata, architecture)
            weight = weight.permute_rows(unpermute_rows(np.arange(weight.shape[0]), heads))
        layer = QuantLinear(weight, compute_dtype=dtype)
        parent, child = _parent_of(decoder, name)
        setattr(parent, child, layer)

    # Embedding (and the tied output projection): quantized, frozen.
    embedding = _load_weight(info, tensors["token_embd.weight"])
    scale = getattr(decoder.embed_tokens, "scalar_embed_scale", None)
    decoder.embed_tokens = QuantEmbedding(embedding, scale=scale, compute_dtype=dtype)
    if getattr(config, "tie_word_embeddings", True) or "output.weight" not in tensors:
        output = embedding
    else:
        output = _load_weight(info, tensors["output.weight"])

    # Norms and any other small parameter: from the dequantized folder.
    with safe_open(str(base_folder / "model.safetensors"), framework="pt") as stored:
        names = set(stored.keys())
        for name, parameter in list(decoder.named_parameters()):
            key = f"model.{name}"
            if key not in names:
                raise LeanModelError(
                    f"{base_folder}/model.safetensors has no '{key}'; rebuild the folder by "
                    "deleting it (A3X writes it again from the GGUF file)"
                )
            value = stored.get_tensor(key).to(dtype)
            if value.shape != parameter.shape:
                raise LeanModelError(
                    f"'{key}' has shape {tuple(value.shape)}, expected {tuple(parameter.shape)}"
                )
            parent, child = _parent_of(decoder, name)
            parent._parameters[child] = nn.Parameter(value, requires_grad=False)

    # Buffers computed at construction (rotary frequencies) were built on the meta device.
    for name, module in list(decoder.named_modules()):
        if any(buffer.is_meta for buffer in module.buffers(recurse=False)):
            parent, child = _parent_of(decoder, name)
            setattr(parent, child, type(module)(config))
    leftover = [n for n, t in [*decoder.named_parameters(), *decoder.named_buffers()] if t.is_meta]
    if leftover:
        raise LeanModelError(
            f"the lean trainer cannot build {config.model_type} models: no weights for "
            f'{", ".join(leftover[:4])}; set retrain.engine = "peft"'
        )

    target_layers = _add_lora(decoder, settings)
    if settings.checkpointing:
        options = {"use_reentrant": False}
        if hasattr(causal, "activation_checkpointing_enable"):  # transformers >= 5.x
            causal.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            causal.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    model = LeanCausalLM(decoder, output, config, settings, target_layers, base_folder)
    model.train()
    return model


def _add_lora(decoder: nn.Module, settings: LeanSettings) -> tuple[str, ...]:
    """Wrap the chosen target layers in LoraLinear; return every target layer's path."""
    chosen = set(settings.modules)
    found, candidates = [], []
    for name, module in list(decoder.named_modules()):
        if not isinstance(module, QuantLinear) or name.rsplit(".", 1)[-1] not in settings.targets:
            continue
        path = _hf_path(name)
        candidates.append(path)
        if chosen and path not in chosen:
            continue
        parent, child = _parent_of(decoder, name)
        setattr(parent, child, LoraLinear(module, settings.rank, settings.alpha, settings.dropout))
        found.append(path)
    if not found:
        raise LeanModelError(
            f"no layer matches the LoRA targets {', '.join(settings.targets)}"
            + (f" and modules {', '.join(sorted(chosen)[:3])}" if chosen else "")
        )
    missing = chosen - set(found)
    if missing:
        raise LeanModelError(f"modules {', '.join(sorted(missing)[:3])} are not LoRA targets")
    return tuple(candidates)


def _hf_path(decoder_name: str) -> str:
    return f"model.{decoder_name}"


def _decoder_path(hf_path: str) -> str:
    return hf_path.removeprefix("model.")


def _parent_of(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


def _load_weight(info: GGUFInfo, tensor: TensorInfo) -> QuantizedWeight:
    """Read one tensor's blocks straight into a torch buffer (one copy, no staging)."""
    import gguf

    blocks = torch.empty(tensor.n_bytes, dtype=torch.uint8)
    with info.path.open("rb") as handle:
        handle.seek(tensor.offset)
        read = handle.readinto(blocks.numpy().data)
    if read != tensor.n_bytes:
        raise LeanModelError(
            f"{info.path} is truncated: tensor '{tensor.name}' has {read} of its "
            f"{tensor.n_bytes} bytes; the file is damaged, copy or write it again"
        )
    columns, rows = tensor.shape  # GGUF order: the contiguous dimension first
    return QuantizedWeight(
        blocks.view(rows, -1), gguf.GGMLQuantizationType(tensor.type_id), (rows, columns)
    )
