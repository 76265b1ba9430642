"""Reading and writing PEFT LoRA adapter folders (`adapter_config.json` and
`adapter_model.safetensors`) as plain numpy factors, with PEFT's own scaling rules.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lora import LoraError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"

# base_model.model.<module>.lora_A[.<adapter_name>].weight
LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$"
)


class PeftAdapterError(LoraError):
    """A PEFT adapter folder is missing, malformed, or uses a feature A3X cannot convert."""


@dataclass(frozen=True)
class PeftAdapter:
    folder: Path
    config: dict[str, Any]
    factors: dict[str, tuple[np.ndarray, np.ndarray]]  # module path -> (A (r, in), B (out, r))
    header: dict[str, str] = field(default_factory=dict)  # safetensors __metadata__

    @property
    def lora_alpha(self) -> float:
        return float(self.config.get("lora_alpha", 8))

    def rank(self, module: str) -> int:
        return int(self.factors[module][0].shape[0])

    def scaling(self, module: str) -> float:
        """Return PEFT's scaling of `B @ A` for this module (alpha / r, or alpha / sqrt(r)
        with rsLoRA), honouring `rank_pattern` and `alpha_pattern` as PEFT resolves them."""
        from peft.utils.other import get_pattern_key

        alpha_pattern = self.config.get("alpha_pattern") or {}
        alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), self.lora_alpha)
        rank = self.rank(module)
        if self.config.get("use_rslora"):
            return float(alpha) / math.sqrt(rank)
        return float(alpha) / rank

    @property
    def target_names(self) -> list[str]:
        """Return the last component of every modified module (`q_proj`, `v_proj`, ...)."""
        return sorted({module.rsplit(".", 1)[-1] for module in self.factors})


def read_peft_adapter(folder: Path | str) -> PeftAdapter:
    """Read a PEFT LoRA folder; raise PeftAdapterError for what A3X cannot convert faithfully."""
    folder = Path(folder).expanduser()
    config = _read_config(folder)
    _reject_unsupported_config(folder, config)
    tensors, header = _read_weights(folder)
    factors = _collect_factors(folder, tensors)
    return PeftAdapter(folder=folder, config=config, factors=factors, header=header)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise PeftAdapterError(f"PEFT adapter folder {folder} does not exist or is not a folder")
    if not path.exists():
        raise PeftAdapterError(
            f"{folder} has no {CONFIG_FILE}; point at the folder that PEFT's save_pretrained wrote"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PeftAdapterError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise PeftAdapterError(f"{path} holds a {type(config).__name__}, not a JSON object")
    return config


def _reject_unsupported_config(folder: Path, config: dict[str, Any]) -> None:
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise PeftAdapterError(
            f"{folder} is a {peft_type or 'untyped'} adapter; only LoRA adapters convert to GGUF"
        )
    if config.get("use_dora"):
        raise PeftAdapterError(
            f"{folder} is a DoRA adapter (use_dora=true). Its magnitude vectors rescale whole "
            "weight columns, which llama.cpp's LoRA format cannot express; merge it with PEFT "
            "(merge_and_unload) and convert the merged model instead"
        )
    saved = config.get("modules_to_save") or []
    if saved:
        raise PeftAdapterError(
            f"{folder} saves full copies of {', '.join(map(str, saved))} (modules_to_save). "
            "llama.cpp adapters hold LoRA factors only, so these trained weights would be "
            "lost; retrain without modules_to_save, or merge with PEFT and convert the model"
        )
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise PeftAdapterError(
            f"{folder} trains biases (bias={config.get('bias')!r}, "
            f"lora_bias={config.get('lora_bias')!r}); llama.cpp adapters have no bias terms, "
            "retrain with bias='none'"
        )
    if config.get("use_rslora") and (config.get("rank_pattern") or config.get("alpha_pattern")):
        raise PeftAdapterError(
            f"{folder} combines use_rslora with rank_pattern or alpha_pattern, which PEFT "
            "itself rejects; fix the adapter config"
        )


def _read_weights(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    path = folder / WEIGHTS_FILE
    if not path.exists():
        legacy = " (it has the older adapter_model.bin; load and save it again with PEFT)"
        raise PeftAdapterError(
            f"{folder} has no {WEIGHTS_FILE}"
            + (legacy if (folder / LEGACY_WEIGHTS_FILE).exists() else "")
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = dict(handle.metadata() or {})
            tensors = {
                key: handle.get_tensor(key).float().numpy()
                for key in handle.keys()  # noqa: SIM118
            }
    except (SafetensorError, OSError, ValueError) as error:
        raise PeftAdapterError(
            f"{path} is not a readable safetensors file ({error}); save the adapter again"
        ) from error
    return tensors, header


def _collect_factors(
    folder: Path, tensors: dict[str, np.ndarray]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    # Special tensors first: with an embedding target PEFT also saves the full
    # embedding weights, and the embedding is the reason to name.
    for key in tensors:
        if "lora_magnitude_vector" in key:
            raise PeftAdapterError(
                f"{folder} holds DoRA magnitude vectors ('{key}'); llama.cpp's LoRA format "
                "cannot express them, so merge with PEFT and convert the merged model instead"
            )
        if "lora_embedding_" in key:
            raise PeftAdapterError(
                f"{folder} has a LoRA on an embedding ('{key}'); A3X exports LoRA on linear "
                "layers only, so retrain without embed_tokens in target_modules"
            )
    found: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = LORA_KEY.match(key)
        if match is None:
            raise PeftAdapterError(
                f"{folder}: tensor '{key}' is not a LoRA factor (a full weight from "
                "modules_to_save, or a bias); llama.cpp adapters hold LoRA factors only"
            )
        found.setdefault(match["module"], {})[match["factor"]] = value
    factors = {}
    for module, pair in sorted(found.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise PeftAdapterError(f"{folder}: module '{module}' has no {missing} tensor")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise PeftAdapterError(
                f"{folder}: module '{module}' has lora_A {list(a.shape)} and lora_B "
                f"{list(b.shape)}; expected (rank, in) and (out, rank)"
            )
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise PeftAdapterError(
                f"{folder}: module '{module}' has NaN or infinite LoRA weights; the training "
                "diverged, do not use this adapter"
            )
        factors[module] = (a, b)
    if not factors:
        raise PeftAdapterError(f"{folder}/{WEIGHTS_FILE} contains no LoRA tensors")
    return factors


def write_peft_adapter(
    folder: Path,
    config: dict[str, Any],
    factors: dict[str, tuple[np.ndarray, np.ndarray]],
    header: dict[str, str] | None = None,
) -> Path:
    """Write a PEFT folder that `PeftModel.from_pretrained` loads; refuses an existing folder."""
    import torch
    from safetensors.torch import save_file

    if folder.exists() and any(folder.iterdir()):
        raise PeftAdapterError(f"{folder} exists and is not empty; choose a new output folder")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in factors.items():
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = torch.from_numpy(np.ascontiguousarray(a))
        tensors[f"{prefix}.lora_B.weight"] = torch.from_numpy(np.ascontiguousarray(b))
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt", **(header or {})})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder
