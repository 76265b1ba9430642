"""`a3x lora info`: read and validate an adapter's A3X metadata and LoRA structure."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora import LoraError
from lora.metadata import AdapterMetadata, from_gguf_metadata, from_safetensors_metadata


@dataclass(frozen=True)
class AdapterSummary:
    path: Path
    format: str  # "gguf" or "peft"
    metadata: AdapterMetadata | None  # None when the file has no A3X metadata
    tensors: int  # LoRA pairs
    ranks: tuple[int, ...]  # distinct ranks
    alpha: float

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "metadata": self.metadata.to_json() if self.metadata else None,
            "lora_pairs": self.tensors,
            "ranks": list(self.ranks),
            "alpha": self.alpha,
        }


def describe_adapter(path: Path | str) -> AdapterSummary:
    """Read a GGUF adapter file, a PEFT folder or its safetensors file and validate both
    the LoRA structure and the A3X metadata (a newer format version is an error)."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent
    if path.is_dir():
        from lora.peft_adapter import read_peft_adapter

        peft = read_peft_adapter(path)
        ranks = tuple(sorted({peft.rank(module) for module in peft.factors}))
        metadata = from_safetensors_metadata(peft.header, path)
        return AdapterSummary(path, "peft", metadata, len(peft.factors), ranks, peft.lora_alpha)
    if not path.exists():
        raise LoraError(f"adapter {path} does not exist; give a .gguf file or a PEFT folder")
    from lora.gguf_adapter import read_gguf_adapter

    adapter = read_gguf_adapter(path, load_tensors=False)
    ranks = tuple(sorted({pair.rank for pair in adapter.pairs.values()}))
    metadata = from_gguf_metadata(adapter.info.metadata, path)
    return AdapterSummary(path, "gguf", metadata, len(adapter.pairs), ranks, adapter.alpha)


def format_summary(summary: AdapterSummary) -> str:
    lines = [
        f"{summary.path} ({summary.format})",
        f"  LoRA pairs: {summary.tensors}; ranks {', '.join(map(str, summary.ranks))}; "
        f"alpha {summary.alpha:g}",
    ]
    meta = summary.metadata
    if meta is None:
        lines.append("  no A3X metadata: the adapter was not written by A3X")
        return "\n".join(lines)
    lines += [
        f"  A3X metadata format {meta.format_version}, written by A3X {meta.a3x_version} "
        f"at {meta.created}",
        f"  base: {meta.base.name} ({meta.base.architecture}), sha256 {meta.base.sha256}",
        f"  domain: {meta.domain or '(none)'}",
        f"  targets: {', '.join(meta.targets)}; rank {meta.rank}; alpha {meta.alpha:g}"
        + ("; scales folded into lora_b" if meta.scale_folded else ""),
        f"  resident: {meta.resident_bytes:,} bytes; estimated peak: "
        + ", ".join(f"{n} tokens {b:,}" for n, b in sorted(meta.peak_bytes.items())),
        f"  training data sha256: {meta.training_data_sha256 or '(not recorded)'}",
    ]
    if meta.validation:
        shown = ", ".join(f"{name} {value:.4g}" for name, value in sorted(meta.validation.items()))
        lines.append(f"  validation: {shown}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", type=Path, help="GGUF adapter file or PEFT adapter folder")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def command(args: argparse.Namespace) -> int:
    summary = describe_adapter(args.adapter)
    print(json.dumps(summary.to_json(), indent=2) if args.json else format_summary(summary))
    return 0
