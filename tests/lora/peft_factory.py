"""PEFT adapters made by PEFT itself on a dequantized GGUF base, with random
(non-zero) lora_B so that every target changes the model's output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from runtime.transformers_backend import dequantized_folder


def make_peft_adapter(
    base_gguf: Path, cache_dir: Path, output: Path, seed: int = 0, **config: Any
) -> Path:
    """Save a PEFT LoRA adapter for the base, created with `LoraConfig(**config)`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = dequantized_folder(base_gguf, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["v_proj"], "lora_dropout": 0.0}
    settings.update(config)
    torch.manual_seed(seed)
    # init_lora_weights=False draws lora_B at random too, instead of zeros.
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **settings))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(0.5)  # keep the change visible but the logits sane
    peft_model.save_pretrained(output)
    return output
