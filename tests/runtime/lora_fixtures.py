"""Tiny LoRA adapters with the same weights in both formats: a PEFT folder for
transformers and a GGUF adapter for llama.cpp. They target v_proj (GGUF attn_v)
in every block, which needs no name or layout mapping beyond the module name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

RANK = 4
ALPHA = 8.0


def lora_weights(seed: int, blocks: int = 2, dim: int = 64, kv_dim: int = 32) -> dict:
    rng = np.random.default_rng(seed)
    return {
        block: (
            (rng.standard_normal((RANK, dim)) * 0.3).astype(np.float32),  # A: (r, in)
            (rng.standard_normal((kv_dim, RANK)) * 0.3).astype(np.float32),  # B: (out, r)
        )
        for block in range(blocks)
    }


def write_gguf_adapter(path: Path, weights: dict, architecture: str = "llama") -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", ALPHA)
    for block, (a, b) in weights.items():
        writer.add_tensor(f"blk.{block}.attn_v.weight.lora_a", a)
        writer.add_tensor(f"blk.{block}.attn_v.weight.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_peft_adapter(folder: Path, weights: dict) -> Path:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.0,
        "target_modules": ["v_proj"],
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = {}
    for block, (a, b) in weights.items():
        prefix = f"base_model.model.model.layers.{block}.self_attn.v_proj"
        tensors[f"{prefix}.lora_A.weight"] = torch.from_numpy(a.copy())
        tensors[f"{prefix}.lora_B.weight"] = torch.from_numpy(b.copy())
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder
