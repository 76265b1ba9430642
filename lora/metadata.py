"""The A3X adapter metadata format (version 1), stored inside the adapter files.

In a GGUF adapter the fields are typed key-value pairs under `a3x.`; in a
PEFT `adapter_model.safetensors` they are entries of the safetensors header's
`__metadata__` map, which holds strings only, so numbers are written in
decimal, booleans as `true`/`false` and arrays as JSON lists. The layout and
every field are specified in docs/lora-metadata.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lora import LoraError

FORMAT_VERSION = 1
PREFIX = "a3x."
# Context lengths at which the peak memory of an adapter is estimated.
PEAK_CONTEXT_LENGTHS = (512, 2048, 8192)


class MetadataError(LoraError):
    """Adapter metadata is missing, malformed, or of a format this A3X does not read."""


@dataclass(frozen=True)
class BaseModelRef:
    name: str
    architecture: str
    sha256: str  # of the base GGUF file


@dataclass(frozen=True)
class AdapterMetadata:
    """What an A3X adapter file records about itself."""

    base: BaseModelRef
    rank: int  # the largest rank over all targets
    alpha: float  # lora_alpha of the PEFT config
    targets: tuple[str, ...]  # module names, e.g. ("q_proj", "v_proj")
    resident_bytes: int  # bytes of the LoRA tensors as stored
    peak_bytes: dict[int, int]  # context length -> estimated peak bytes while applied
    scale_folded: bool = False  # per-module scale corrections multiplied into lora_b
    domain: str = ""
    training_data_sha256: str = ""
    validation: dict[str, float] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    a3x_version: str = field(default_factory=lambda: _a3x_version())
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["peak_bytes"] = {str(k): v for k, v in self.peak_bytes.items()}
        data["targets"] = list(self.targets)
        return data


def estimate_peak_bytes(
    resident_bytes: int, targets: list[tuple[int, int]], context_lengths: tuple[int, ...]
) -> dict[int, int]:
    """Estimate the memory an adapter adds while llama.cpp applies it, per context length.

    `targets` lists (rank, out_features) per modified tensor. llama.cpp computes
    `B @ (A @ x)`, scales it and adds it to the base output; its graph allocator
    reuses buffers across tensors, so the estimate is the resident tensors plus
    the float32 intermediates of the largest target for one batch of `n` tokens:
    n * (rank + 2 * out) * 4 bytes. It is an estimate, not a measurement.
    """
    widest = max((rank + 2 * out for rank, out in targets), default=0)
    return {n: resident_bytes + n * widest * 4 for n in context_lengths}


# Writing


def gguf_fields(meta: AdapterMetadata) -> list[tuple[str, Any, str]]:
    """Return (key, value, GGUF value type) triples; arrays are typed `ARRAY:<item type>`."""
    contexts = sorted(meta.peak_bytes)
    names = sorted(meta.validation)
    return [
        ("a3x.format_version", meta.format_version, "UINT32"),
        ("a3x.version", meta.a3x_version, "STRING"),
        ("a3x.created", meta.created, "STRING"),
        ("a3x.domain", meta.domain, "STRING"),
        ("a3x.base.name", meta.base.name, "STRING"),
        ("a3x.base.architecture", meta.base.architecture, "STRING"),
        ("a3x.base.sha256", meta.base.sha256, "STRING"),
        ("a3x.lora.rank", meta.rank, "UINT32"),
        ("a3x.lora.alpha", meta.alpha, "FLOAT32"),
        ("a3x.lora.targets", list(meta.targets), "ARRAY:STRING"),
        ("a3x.lora.scale_folded", meta.scale_folded, "BOOL"),
        ("a3x.memory.resident_bytes", meta.resident_bytes, "UINT64"),
        ("a3x.memory.context_lengths", contexts, "ARRAY:UINT64"),
        ("a3x.memory.peak_bytes", [meta.peak_bytes[n] for n in contexts], "ARRAY:UINT64"),
        ("a3x.training.data_sha256", meta.training_data_sha256, "STRING"),
        ("a3x.validation.names", names, "ARRAY:STRING"),
        ("a3x.validation.values", [float(meta.validation[n]) for n in names], "ARRAY:FLOAT32"),
    ]


def add_to_gguf_writer(writer: Any, meta: AdapterMetadata) -> None:
    """Add the metadata to a `gguf.GGUFWriter` before its header is written."""
    from gguf import GGUFValueType

    # add_key_value, not add_string/add_array: those skip empty strings, and
    # readers require every string field. The gguf package cannot write an empty
    # array, so the optional validation arrays are left out when there are no metrics.
    for key, value, kind in gguf_fields(meta):
        if kind.startswith("ARRAY:") and not value:
            continue
        if kind.startswith("ARRAY:"):
            item = GGUFValueType[kind.removeprefix("ARRAY:")]
            writer.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=item)
        else:
            writer.add_key_value(key, value, GGUFValueType[kind])


def safetensors_metadata(meta: AdapterMetadata) -> dict[str, str]:
    """Return the header entries for a PEFT safetensors file (strings only)."""
    return {
        key: _to_text(value)
        for key, value, kind in gguf_fields(meta)
        if value or not kind.startswith("ARRAY:")
    }


def _to_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)


# Reading


def from_gguf_metadata(values: dict[str, Any], source: Path | str) -> AdapterMetadata | None:
    """Parse the a3x.* keys of a GGUF file; None when the file has none."""
    if not any(key.startswith(PREFIX) for key in values):
        return None
    return _parse(values, source)


def from_safetensors_metadata(header: dict[str, str], source: Path | str) -> AdapterMetadata | None:
    """Parse the a3x.* entries of a safetensors header; None when it has none."""
    if not any(key.startswith(PREFIX) for key in header):
        return None
    values: dict[str, Any] = {}
    for key, text in header.items():
        if key.startswith(PREFIX):
            values[key] = _from_text(key, text, source)
    return _parse(values, source)


def _from_text(key: str, text: str, source: Path | str) -> Any:
    kind = _FIELD_KINDS.get(key)
    try:
        if kind in ("UINT32", "UINT64"):
            return int(text)
        if kind == "FLOAT32":
            return float(text)
        if kind == "BOOL":
            if text not in ("true", "false"):
                raise ValueError(f"expected true or false, got {text!r}")
            return text == "true"
        if kind is not None and kind.startswith("ARRAY:"):
            return json.loads(text)
    except ValueError as error:
        raise MetadataError(f"{source}: metadata '{key}' has an invalid value {text!r}") from error
    return text


def _parse(values: dict[str, Any], source: Path | str) -> AdapterMetadata:
    version = values.get("a3x.format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise MetadataError(
            f"{source} has a3x.* metadata but no integer a3x.format_version ({version!r}); "
            "the file is damaged or was not written by A3X"
        )
    if version > FORMAT_VERSION or version < 1:
        raise MetadataError(
            f"{source} uses A3X adapter metadata format {version}, and this A3X reads formats "
            f"1 to {FORMAT_VERSION}; upgrade A3X to read it"
        )
    get = _Getter(values, source)
    contexts = get.int_list("a3x.memory.context_lengths")
    peaks = get.int_list("a3x.memory.peak_bytes")
    names = get.str_list("a3x.validation.names", optional=True)
    scores = get.float_list("a3x.validation.values", optional=True)
    if len(contexts) != len(peaks) or len(names) != len(scores):
        raise MetadataError(
            f"{source}: a3x.memory.* or a3x.validation.* arrays have different lengths"
        )
    sha = get.text("a3x.base.sha256")
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise MetadataError(f"{source}: a3x.base.sha256 {sha!r} is not a hex sha256")
    return AdapterMetadata(
        base=BaseModelRef(get.text("a3x.base.name"), get.text("a3x.base.architecture"), sha),
        rank=get.integer("a3x.lora.rank"),
        alpha=get.real("a3x.lora.alpha"),
        targets=tuple(get.str_list("a3x.lora.targets")),
        resident_bytes=get.integer("a3x.memory.resident_bytes"),
        peak_bytes=dict(zip(contexts, peaks, strict=True)),
        scale_folded=get.flag("a3x.lora.scale_folded"),
        domain=get.text("a3x.domain"),
        training_data_sha256=get.text("a3x.training.data_sha256"),
        validation=dict(zip(names, scores, strict=True)),
        created=get.text("a3x.created"),
        a3x_version=get.text("a3x.version"),
        format_version=version,
    )


class _Getter:
    """Typed access to required metadata keys, with errors that name the key."""

    def __init__(self, values: dict[str, Any], source: Path | str):
        self.values, self.source = values, source

    def _get(self, key: str, check: Any, what: str) -> Any:
        if key not in self.values:
            raise MetadataError(
                f"{self.source}: A3X metadata lacks '{key}'; the file is damaged or was "
                "written by an incomplete tool"
            )
        value = self.values[key]
        if not check(value):
            raise MetadataError(f"{self.source}: metadata '{key}' should be {what}, not {value!r}")
        return value

    def text(self, key: str) -> str:
        return str(self._get(key, lambda v: isinstance(v, str), "a string"))

    def integer(self, key: str) -> int:
        return int(self._get(key, _is_count, "a whole number >= 0"))

    def real(self, key: str) -> float:
        return float(self._get(key, _is_real, "a finite number"))

    def flag(self, key: str) -> bool:
        return bool(self._get(key, lambda v: isinstance(v, bool) or v in (0, 1), "a boolean"))

    def int_list(self, key: str) -> list[int]:
        ok = lambda v: isinstance(v, list) and all(_is_count(x) for x in v)  # noqa: E731
        return [int(x) for x in self._get(key, ok, "a list of whole numbers")]

    def float_list(self, key: str, optional: bool = False) -> list[float]:
        if optional and key not in self.values:
            return []
        ok = lambda v: isinstance(v, list) and all(_is_real(x) for x in v)  # noqa: E731
        return [float(x) for x in self._get(key, ok, "a list of numbers")]

    def str_list(self, key: str, optional: bool = False) -> list[str]:
        if optional and key not in self.values:
            return []
        ok = lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)  # noqa: E731
        return [str(x) for x in self._get(key, ok, "a list of strings")]


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _a3x_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("a3x")
    except PackageNotFoundError:
        return "unknown"


_FIELD_KINDS = {
    key: kind
    for key, _, kind in gguf_fields(
        AdapterMetadata(BaseModelRef("", "", "0" * 64), 0, 0.0, (), 0, {}, a3x_version="")
    )
}
