"""`a3x lora export`: a PEFT LoRA folder to a GGUF LoRA adapter that llama.cpp loads.

Each PEFT module path is mapped to the base's GGUF tensor name with the gguf
package's name map, checked against the base's tensor shapes, and written as
a `lora_a`/`lora_b` pair. llama.cpp scales every pair by one global
`alpha / rank`. Where PEFT's scaling of a module differs (rsLoRA, or a module
in `alpha_pattern`), the ratio is multiplied into that module's `lora_b`, and
the metadata records `a3x.lora.scale_folded = true`.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lora import LoraError
from lora.metadata import (
    PEAK_CONTEXT_LENGTHS,
    AdapterMetadata,
    BaseModelRef,
    add_to_gguf_writer,
    estimate_peak_bytes,
    from_safetensors_metadata,
)
from lora.names import gguf_name_of_module, heads_of, permute_rows, rows_permuted
from lora.peft_adapter import PeftAdapter, read_peft_adapter
from runtime.gguf_file import GGUFInfo, check_model_file, sha256_of_file

OUTPUT_TYPES = ("f32", "f16")
# Folding is skipped when PEFT's and llama.cpp's scalings agree to this
# relative difference, so float noise in alpha never rewrites lora_b.
FOLD_TOLERANCE = 1e-6


class ExportError(LoraError):
    """A PEFT adapter cannot be exported to GGUF for this base."""


@dataclass(frozen=True)
class ExportedTarget:
    module: str  # transformers module path
    tensor: str  # GGUF base tensor name
    rank: int
    peft_scaling: float
    fold_factor: float  # multiplied into lora_b; 1.0 when nothing was folded


@dataclass(frozen=True)
class ExportResult:
    output: Path
    base: Path
    metadata: AdapterMetadata
    targets: tuple[ExportedTarget, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "base": str(self.base),
            "metadata": self.metadata.to_json(),
            "targets": [vars(target) for target in self.targets],
        }


def export_adapter(
    peft_folder: Path | str,
    output: Path | str,
    base: Path | str | None = None,
    outtype: str = "f32",
    metadata_overrides: dict[str, Any] | None = None,
) -> ExportResult:
    """Export a PEFT folder to a GGUF adapter for `base` (or the base its config names).

    `metadata_overrides` sets fields of the A3X metadata (domain,
    training_data_sha256, validation); fields already stored in the PEFT
    file's header are kept otherwise.
    """
    if outtype not in OUTPUT_TYPES:
        raise ExportError(f"output type {outtype!r} is not one of {', '.join(OUTPUT_TYPES)}")
    adapter = read_peft_adapter(peft_folder)
    base_path = resolve_base(adapter, Path(base) if base else None)
    base_info = check_model_file(base_path)
    output = Path(output).expanduser()
    _check_output(output, base_path)

    targets = [_map_target(adapter, module, base_info) for module in adapter.factors]
    metadata = _metadata(adapter, base_info, base_path, targets, outtype, metadata_overrides)
    _write(output, adapter, base_info, targets, metadata, outtype)
    return ExportResult(output, base_path, metadata, tuple(targets))


def resolve_base(adapter: PeftAdapter, explicit: Path | None) -> Path:
    """Return the GGUF base: the explicit path, else the config's base when it is a GGUF
    file on this machine, or an A3X dequantized-model folder whose source GGUF exists."""
    if explicit is not None:
        return explicit.expanduser()
    named = adapter.config.get("base_model_name_or_path")
    if not named:
        raise ExportError(
            f"{adapter.folder}/adapter_config.json names no base model; pass the base GGUF "
            "file with --base"
        )
    candidate = Path(str(named)).expanduser()
    if candidate.is_file() and candidate.suffix == ".gguf":
        return candidate
    marker = candidate / "a3x-cache.json"
    if marker.is_file():
        source = Path(json.loads(marker.read_text()).get("source", ""))
        if source.is_file():
            return source
    raise ExportError(
        f"the adapter's base '{named}' is not a GGUF file on this machine (a Hugging Face id, "
        "or a folder from another machine); pass the base GGUF file with --base"
    )


def _check_output(output: Path, base: Path) -> None:
    if output.exists() and output.is_dir():
        raise ExportError(f"output {output} is a folder; give a file name ending in .gguf")
    if output.exists() and output.resolve() == base.resolve():
        raise ExportError(f"output {output} is the base model itself; choose another file name")
    if not output.parent.exists():
        raise ExportError(f"the folder of output {output} does not exist; create it first")


def _map_target(adapter: PeftAdapter, module: str, base: GGUFInfo) -> ExportedTarget:
    block_count = base.block_count or 0
    tensor = gguf_name_of_module(module, base.architecture, block_count)
    shapes = {t.name: t.shape for t in base.tensors}
    if tensor is None or tensor not in shapes:
        raise ExportError(
            f"adapter {adapter.folder} targets '{module}', but base '{base.name}' "
            f"({base.architecture}, {block_count} blocks) has no such layer"
            + (f" (no tensor '{tensor}')" if tensor else "")
            + "; was it trained on another base?"
        )
    a, b = adapter.factors[module]
    columns, rows = shapes[tensor][0], shapes[tensor][1]
    if a.shape[1] != columns or b.shape[0] != rows:
        raise ExportError(
            f"adapter {adapter.folder}: '{module}' maps {a.shape[1]} -> {b.shape[0]} features "
            f"but base tensor '{tensor}' maps {columns} -> {rows}; was it trained on another base?"
        )
    rank = adapter.rank(module)
    peft_scaling = adapter.scaling(module)
    llama_scaling = adapter.lora_alpha / rank
    if llama_scaling == 0:
        raise ExportError(f"adapter {adapter.folder} has lora_alpha 0, so it changes nothing")
    factor = peft_scaling / llama_scaling
    if abs(factor - 1.0) <= FOLD_TOLERANCE:
        factor = 1.0
    return ExportedTarget(module, tensor, rank, peft_scaling, factor)


def _metadata(
    adapter: PeftAdapter,
    base: GGUFInfo,
    base_path: Path,
    targets: list[ExportedTarget],
    outtype: str,
    overrides: dict[str, Any] | None,
) -> AdapterMetadata:
    item_bytes = 4 if outtype == "f32" else 2
    resident = 0
    shapes = []
    for target in targets:
        a, b = adapter.factors[target.module]
        resident += (a.size + b.size) * item_bytes
        shapes.append((target.rank, int(b.shape[0])))
    stored = from_safetensors_metadata(adapter.header, adapter.folder)
    fields: dict[str, Any] = {}
    if stored is not None:
        fields.update(
            domain=stored.domain,
            training_data_sha256=stored.training_data_sha256,
            validation=stored.validation,
        )
    fields.update(overrides or {})
    return AdapterMetadata(
        base=BaseModelRef(base.name, base.architecture, sha256_of_file(base_path)),
        rank=max(target.rank for target in targets),
        alpha=adapter.lora_alpha,
        targets=tuple(adapter.target_names),
        resident_bytes=resident,
        peak_bytes=estimate_peak_bytes(resident, shapes, PEAK_CONTEXT_LENGTHS),
        scale_folded=any(target.fold_factor != 1.0 for target in targets),
        **fields,
    )


def _write(
    output: Path,
    adapter: PeftAdapter,
    base: GGUFInfo,
    targets: list[ExportedTarget],
    metadata: AdapterMetadata,
    outtype: str,
) -> None:
    import gguf

    dtype = np.float32 if outtype == "f32" else np.float16
    staging = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(staging), base.architecture)
    try:
        writer.add_string("general.type", "adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", adapter.lora_alpha)
        writer.add_string("general.name", output.stem)
        add_to_gguf_writer(writer, metadata)
        for target in sorted(targets, key=lambda t: t.tensor):
            a, b = adapter.factors[target.module]
            b = b * np.float32(target.fold_factor) if target.fold_factor != 1.0 else b
            if rows_permuted(base.architecture, target.tensor):
                b = permute_rows(b, heads_of(target.tensor, base.metadata, base.architecture))
            writer.add_tensor(f"{target.tensor}.lora_a", np.ascontiguousarray(a, dtype=dtype))
            writer.add_tensor(f"{target.tensor}.lora_b", np.ascontiguousarray(b, dtype=dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staging, output)
    except OSError as error:
        staging.unlink(missing_ok=True)
        raise ExportError(
            f"could not write {output}: {error}; free disk space or fix the path"
        ) from error
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("peft_folder", type=Path, help="PEFT adapter folder (adapter_config.json)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="GGUF adapter to write")
    parser.add_argument(
        "--base",
        type=Path,
        help="base GGUF model (default: the adapter config's base, if it is a GGUF file here)",
    )
    parser.add_argument(
        "--outtype", choices=OUTPUT_TYPES, default="f32", help="tensor type (default: f32)"
    )
    parser.add_argument("--domain", help="domain to record in the A3X metadata")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def command(args: argparse.Namespace) -> int:
    overrides = {"domain": args.domain} if args.domain else None
    result = export_adapter(args.peft_folder, args.output, args.base, args.outtype, overrides)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    meta = result.metadata
    print(f"wrote {result.output} ({meta.resident_bytes:,} bytes of LoRA tensors)")
    print(f"base: {result.base} ({meta.base.architecture}, sha256 {meta.base.sha256[:12]})")
    print(f"targets: {', '.join(meta.targets)}; {len(result.targets)} tensors; rank {meta.rank}")
    print(f"alpha: {meta.alpha:g}")
    folded = [t for t in result.targets if t.fold_factor != 1.0]
    if folded:
        print(f"scales folded into lora_b for {len(folded)} tensors, for example:")
        for target in folded[:5]:
            print(f"  {target.tensor}: x{target.fold_factor:.6g}")
    return 0
