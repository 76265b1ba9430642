"""`a3x lora import`: a GGUF LoRA adapter back to a PEFT folder.

The inverse of export: GGUF tensor names become transformers module paths,
row reordering of llama query/key projections is undone, and ranks that
differ between tensors go into `rank_pattern`. Exporting the imported folder
again for the same base gives the same tensors.
(The module is not named `import`, which is a Python keyword.)
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lora import LoraError
from lora.gguf_adapter import GGUFAdapter, check_fits_base, read_gguf_adapter
from lora.metadata import from_gguf_metadata, safetensors_metadata
from lora.names import block_of, heads_of, module_of_gguf_name, rows_permuted, unpermute_rows
from lora.peft_adapter import write_peft_adapter
from runtime.gguf_file import GGUFInfo, check_model_file


class AdapterImportError(LoraError):
    """A GGUF adapter cannot be turned into a PEFT folder."""


@dataclass(frozen=True)
class ImportResult:
    folder: Path
    config: dict[str, Any]
    modules: tuple[str, ...]


def import_adapter(
    adapter_path: Path | str, output: Path | str, base: Path | str | None = None
) -> ImportResult:
    """Write a PEFT folder with the GGUF adapter's factors and an equivalent scaling."""
    adapter = read_gguf_adapter(adapter_path)
    base_info = check_model_file(base) if base else None
    if base_info is not None:
        check_fits_base(adapter, base_info)
    block_count = _block_count(adapter, base_info)

    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for target, pair in sorted(adapter.pairs.items()):
        module = module_of_gguf_name(target, adapter.architecture, block_count)
        b = pair.b
        if rows_permuted(adapter.architecture, target):
            if base_info is None:
                raise AdapterImportError(
                    f"{adapter.path} modifies '{target}', whose rows llama.cpp stores in a "
                    "reordered layout; pass the base GGUF with --base so they can be restored"
                )
            b = unpermute_rows(b, heads_of(target, base_info.metadata, adapter.architecture))
        factors[module] = (pair.a, b)

    config = _peft_config(adapter, factors, Path(base) if base else None)
    metadata = from_gguf_metadata(adapter.info.metadata, adapter.path)
    header = safetensors_metadata(metadata) if metadata else None
    folder = write_peft_adapter(Path(output).expanduser(), config, factors, header)
    return ImportResult(folder, config, tuple(factors))


def _block_count(adapter: GGUFAdapter, base: GGUFInfo | None) -> int:
    if base is not None and base.block_count:
        return base.block_count
    blocks = [block_of(target) for target in adapter.pairs]
    return max((b for b in blocks if b is not None), default=0) + 1


def _peft_config(
    adapter: GGUFAdapter, factors: dict[str, tuple[np.ndarray, np.ndarray]], base: Path | None
) -> dict[str, Any]:
    """Return a LoRA config whose PEFT scaling equals llama.cpp's for every module.

    llama.cpp scales by alpha / rank (or by 1 when alpha is 0). With alpha set,
    lora_alpha = alpha and per-module ranks reproduce it; with alpha 0 each
    module's alpha must equal its rank, so alpha_pattern lists the exceptions.
    """
    ranks = {module: int(a.shape[0]) for module, (a, _) in factors.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = {module: r for module, r in ranks.items() if r != rank}
    if adapter.alpha:
        alpha, alpha_pattern = adapter.alpha, {}
    else:
        alpha, alpha_pattern = float(rank), {m: float(r) for m, r in rank_pattern.items()}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "target_modules": sorted({module.rsplit(".", 1)[-1] for module in factors}),
        "base_model_name_or_path": str(base.expanduser().resolve()) if base else None,
    }


# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", type=Path, help="GGUF LoRA adapter file")
    parser.add_argument("-o", "--output", type=Path, required=True, help="PEFT folder to write")
    parser.add_argument(
        "--base",
        type=Path,
        help="base GGUF model: checks the adapter fits, and is required for llama q/k targets",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def command(args: argparse.Namespace) -> int:
    result = import_adapter(args.adapter, args.output, args.base)
    if args.json:
        print(json.dumps({"folder": str(result.folder), "config": result.config}, indent=2))
        return 0
    config = result.config
    print(f"wrote {result.folder} ({len(result.modules)} modules)")
    print(f"target_modules: {', '.join(config['target_modules'])}; r {config['r']}")
    print(f"lora_alpha: {config['lora_alpha']:g}")
    if config["rank_pattern"]:
        print(f"rank_pattern: {len(config['rank_pattern'])} modules with another rank")
    return 0
