"""Per-layer and per-module scales for a GGUF LoRA adapter, by deriving a new adapter.

llama.cpp applies one scale per adapter (`llama_set_adapters_lora`), so a
scale that differs by layer or module is multiplied into the factors
instead: `derive_adapter` writes a copy of the adapter whose `lora_b` of
each tensor is multiplied by that tensor's factor. A tensor whose factor is
0 is left out, so it costs no memory and no compute.

The layer scales are a JSON object (or the equal dict):

    {"default": 1.0, "layers": {"0-5": 0.5, "12": 0.0}, "modules": {"attn_v": 2.0}}

- `default`: the layer factor of every block that `layers` does not name
  (1.0 when absent).
- `layers`: a factor per block, keyed by a block index (`"12"`) or an
  inclusive range (`"0-5"`). Blocks are numbered from 0, and ranges may not
  overlap.
- `modules`: a factor per module, named as in the GGUF tensor name without
  the block and the `.weight` suffix (`attn_q`, `attn_k`, `attn_v`,
  `attn_output`, `ffn_gate`, `ffn_up`, `ffn_down`). A module not named gets 1.0.

The factor of tensor `blk.N.M.weight` is the layer factor of block N times
the module factor of M; a tensor outside the blocks (`token_embd`,
`output`) takes `default` as its layer factor. Factors may be negative,
which subtracts that part of the update, as a negative adapter scale does.
For example, `{"modules": {"attn_q": 0, "attn_k": 0, "attn_output": 0}}`
keeps only the value projection of a q,k,v,o adapter.

Derived files live in a cache folder under the sha256 of the source file's
content and the scales normalized to one factor per tensor, so a second
request, or another spelling of the same scales, returns the same file. The
source's metadata is copied. When the source has A3X metadata, the derived
file updates `a3x.memory.*`, sets `a3x.lora.scale_folded` and records its
origin in `a3x.derived.source_sha256` and `a3x.derived.factors` (a JSON
object of tensor name to factor); readers of format version 1 ignore those
keys.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lora import LoraError
from lora.gguf_adapter import LORA_A, LORA_B, GGUFAdapter, read_gguf_adapter
from lora.names import block_of
from runtime.gguf_file import sha256_of_file

# Version of the derivation, part of the cache key. A change in how files are
# derived bumps it, so that old cache entries are not reused.
DERIVATION_VERSION = 1
TOP_LEVEL_KEYS = frozenset({"default", "layers", "modules"})
LAYER_KEY = re.compile(r"^(\d+)(?:-(\d+))?$")
TENSOR_NAME = re.compile(r"^(?:blk\.\d+\.)?(.+?)(?:\.weight)?$")


class LayerScalesError(LoraError):
    """Layer scales are malformed or do not match the adapter they are applied to."""


@dataclass(frozen=True)
class LayerScales:
    """Parsed layer scales: a default, factors per block range and per module."""

    default: float = 1.0
    layers: tuple[tuple[int, int, float], ...] = ()  # (first, last, factor), inclusive
    modules: tuple[tuple[str, float], ...] = ()

    @classmethod
    def parse(cls, spec: Mapping[str, Any] | str) -> LayerScales:
        """Parse and check the protocol; raise LayerScalesError naming the bad entry."""
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as error:
                raise LayerScalesError(f"layer scales are not valid JSON: {error}") from error
        if not isinstance(spec, Mapping):
            raise LayerScalesError(
                f"layer scales must be a JSON object, not {type(spec).__name__}; write "
                '{"default": 1.0, "layers": {"0-5": 0.5}, "modules": {"attn_v": 1.0}}'
            )
        unknown = sorted(set(spec) - TOP_LEVEL_KEYS)
        if unknown:
            raise LayerScalesError(
                f"layer scales have unknown key(s) {', '.join(map(repr, unknown))}; "
                "the keys are 'default', 'layers' and 'modules'"
            )
        default = _factor(spec.get("default", 1.0), "'default'")
        layers = _parse_layers(_mapping(spec.get("layers", {}), "layers"))
        modules = tuple(
            sorted(
                (_module_name(name), _factor(value, f"module '{name}'"))
                for name, value in _mapping(spec.get("modules", {}), "modules").items()
            )
        )
        return cls(default, layers, modules)

    def layer_factor(self, block: int | None) -> float:
        if block is not None:
            for first, last, factor in self.layers:
                if first <= block <= last:
                    return factor
        return self.default

    def module_factor(self, module: str) -> float:
        return dict(self.modules).get(module, 1.0)

    @property
    def is_identity(self) -> bool:
        """Tell whether every factor is 1, so that the scales change nothing."""
        factors = [self.default, *(f for _, _, f in self.layers), *(f for _, f in self.modules)]
        return all(factor == 1.0 for factor in factors)

    def to_json(self) -> dict[str, Any]:
        """Return the protocol's JSON object; `parse` of it gives these scales back."""
        spec: dict[str, Any] = {"default": self.default}
        if self.layers:
            spec["layers"] = {
                (str(first) if first == last else f"{first}-{last}"): factor
                for first, last, factor in self.layers
            }
        if self.modules:
            spec["modules"] = dict(self.modules)
        return spec


def derive_adapter(
    adapter_path: Path | str,
    layer_scales: LayerScales | Mapping[str, Any] | str,
    cache_dir: Path | str,
    block_count: int | None = None,
) -> Path:
    """Return a GGUF adapter equal to `adapter_path` with `layer_scales` multiplied in.

    `block_count` is the base model's block count; without it, layers are
    checked against the blocks the adapter modifies. The result is cached in
    `cache_dir`: a second call with the same file content and scales returns
    the existing file without writing it again.
    """
    scales = (
        layer_scales if isinstance(layer_scales, LayerScales) else LayerScales.parse(layer_scales)
    )
    adapter = read_gguf_adapter(adapter_path, load_tensors=False)
    blocks = _block_limit(adapter, block_count)
    factors = tensor_factors(adapter, scales, blocks)
    if not any(factors.values()):
        raise LayerScalesError(
            f"the layer scales set every tensor of {adapter.path} to 0, which leaves no "
            "adapter; apply no adapter instead"
        )

    source_sha256 = sha256_of_file(adapter.path)
    key = _cache_key(source_sha256, factors)
    cache = Path(cache_dir).expanduser()
    output = cache / f"{key}.gguf"
    if output.is_file():
        return output

    cache.mkdir(parents=True, exist_ok=True)
    _write_derived(adapter, factors, output, source_sha256)
    return output


def tensor_factors(adapter: GGUFAdapter, scales: LayerScales, block_count: int) -> dict[str, float]:
    """Return the factor of every modified base tensor; raise when a rule names a module
    the adapter does not modify or a block outside `range(block_count)`."""
    return target_factors(list(adapter.pairs), scales, block_count, str(adapter.path))


def target_factors(
    targets: list[str], scales: LayerScales, block_count: int, source: str
) -> dict[str, float]:
    """Return the factor of each modified GGUF tensor name (`blk.3.attn_q.weight`) of
    the adapter `source`, after checking the scales against them as tensor_factors does."""
    modules = {_module_of(target) for target in targets}
    for module, _ in scales.modules:
        if module not in modules:
            raise LayerScalesError(
                f"module '{module}' in the layer scales is not modified by {source}; it "
                f"modifies {', '.join(sorted(modules))}"
            )
    for first, last, _ in scales.layers:
        if last >= block_count:
            named = f"{first}-{last}" if first != last else str(first)
            raise LayerScalesError(
                f"layer '{named}' in the layer scales is out of range: the model has blocks "
                f"0-{block_count - 1}; use block indexes below {block_count}"
            )
    return {
        target: scales.layer_factor(block_of(target)) * scales.module_factor(_module_of(target))
        for target in targets
    }


# Parsing


def _mapping(value: Any, name: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise LayerScalesError(
            f"'{name}' in the layer scales must be an object of factors, not {value!r}"
        )
    return value


def _factor(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise LayerScalesError(f"the factor of {where} is {value!r}; give a finite number")
    return float(value) + 0.0  # turns -0.0 into 0.0, so that both hash alike


def _parse_layers(layers: Mapping[Any, Any]) -> tuple[tuple[int, int, float], ...]:
    ranges = []
    for key, value in layers.items():
        text = str(key).strip()
        if text.startswith("-"):
            raise LayerScalesError(
                f"layer '{text}' in the layer scales is negative; blocks are numbered from 0"
            )
        match = LAYER_KEY.match(text)
        if match is None:
            raise LayerScalesError(
                f"layer '{text}' in the layer scales is invalid; write a block index such as "
                "'12' or an inclusive range such as '0-5'"
            )
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise LayerScalesError(
                f"layer range '{text}' ends before it starts; write it as '{last}-{first}'"
            )
        ranges.append((first, last, _factor(value, f"layer '{text}'")))
    ranges.sort()
    for (first, last, _), (next_first, next_last, _) in zip(ranges, ranges[1:], strict=False):
        if next_first <= last:
            raise LayerScalesError(
                f"layers {first}-{last} and {next_first}-{next_last} in the layer scales "
                "overlap; give each block one factor"
            )
    return tuple(ranges)


def _module_name(name: Any) -> str:
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9_]+", name):
        raise LayerScalesError(
            f"module {name!r} in the layer scales is not a GGUF module name such as 'attn_v'"
        )
    return name


def _module_of(target: str) -> str:
    match = TENSOR_NAME.match(target)
    return match.group(1) if match else target


def _block_limit(adapter: GGUFAdapter, block_count: int | None) -> int:
    if block_count is not None:
        return block_count
    blocks = [block for block in map(block_of, adapter.pairs) if block is not None]
    return max(blocks, default=-1) + 1


def _cache_key(source_sha256: str, factors: dict[str, float]) -> str:
    text = json.dumps(
        {"version": DERIVATION_VERSION, "source": source_sha256, "factors": factors},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()


# Writing


def _write_derived(
    adapter: GGUFAdapter,
    factors: dict[str, float],
    output: Path,
    source_sha256: str,
) -> None:
    """Write the derived adapter to a temporary file in the cache, then rename it."""
    import gguf

    # GGUFReader memory-maps the source, so tensors are read without a copy of the file.
    reader = gguf.GGUFReader(str(adapter.path))
    kept = [t for t in reader.tensors if factors[_target_of(t.name)] != 0.0]
    handle, staging_name = tempfile.mkstemp(dir=output.parent, prefix=".", suffix=".tmp")
    os.close(handle)
    staging = Path(staging_name)
    try:
        writer = gguf.GGUFWriter(str(staging), adapter.architecture)
        _copy_metadata(reader, writer, adapter, kept, factors, source_sha256)
        for tensor in kept:
            name, data, raw_type = _scaled_tensor(adapter, tensor, factors)
            writer.add_tensor(name, data, raw_dtype=raw_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with staging.open("rb") as stream:
            os.fsync(stream.fileno())
        os.replace(staging, output)
    except OSError as error:
        staging.unlink(missing_ok=True)
        raise LayerScalesError(
            f"could not write the derived adapter {output}: {error}; free disk space or "
            "choose another cache folder"
        ) from error
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def _target_of(tensor_name: str) -> str:
    return tensor_name.removesuffix(LORA_A).removesuffix(LORA_B)


def _scaled_tensor(
    adapter: GGUFAdapter, tensor: Any, factors: dict[str, float]
) -> tuple[str, np.ndarray, Any]:
    """Return (name, data, raw type) of one tensor, with `lora_b` multiplied by its factor.

    F32 and F16 factors keep their type; a quantized `lora_b` that must be
    scaled is dequantized and written as F32.
    """
    import gguf

    from runtime.gguf_file import read_tensor

    kind = gguf.GGMLQuantizationType(int(tensor.tensor_type))
    factor = factors[_target_of(tensor.name)]
    plain = kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    if not tensor.name.endswith(LORA_B) or factor == 1.0:
        return tensor.name, np.asarray(tensor.data), None if plain else kind
    if plain:
        scaled = tensor.data.astype(np.float32) * np.float32(factor)
        return tensor.name, scaled.astype(tensor.data.dtype), None
    by_name = {info.name: info for info in adapter.info.tensors}
    values = read_tensor(adapter.info, by_name[tensor.name]) * np.float32(factor)
    return tensor.name, values.astype(np.float32), None


def _copy_metadata(
    reader: Any,
    writer: Any,
    adapter: GGUFAdapter,
    kept: list[Any],
    factors: dict[str, float],
    source_sha256: str,
) -> None:
    from gguf import GGUFValueType

    updates = _a3x_updates(reader, adapter, kept, factors, source_sha256)
    for name, field in reader.fields.items():
        # GGUF.* are the header counts; the writer sets the architecture and
        # its own alignment itself.
        if name.startswith("GGUF.") or name in ("general.architecture", "general.alignment"):
            continue
        kind = GGUFValueType(field.types[0])
        if name in updates:
            continue
        if kind == GGUFValueType.ARRAY:
            item = GGUFValueType(field.types[1])
            if item == GGUFValueType.ARRAY:
                raise LayerScalesError(
                    f"{adapter.path}: metadata '{name}' is an array of arrays, which the "
                    "derived adapter cannot copy"
                )
            writer.add_key_value(name, field.contents(), kind, sub_type=item)
        else:
            writer.add_key_value(name, field.contents(), kind)
    for name, (value, kind, item) in updates.items():
        if kind == GGUFValueType.ARRAY:
            writer.add_key_value(name, value, kind, sub_type=item)
        else:
            writer.add_key_value(name, value, kind)


def _a3x_updates(
    reader: Any,
    adapter: GGUFAdapter,
    kept: list[Any],
    factors: dict[str, float],
    source_sha256: str,
) -> dict[str, tuple[Any, Any, Any]]:
    """Return the A3X metadata fields that differ in the derived file; none without A3X
    metadata, because an a3x.* key alone would make readers expect the full format."""
    from gguf import GGUFValueType

    if "a3x.format_version" not in reader.fields:
        return {}
    resident = sum(_stored_bytes(t, factors[_target_of(t.name)]) for t in kept)
    old_resident = int(reader.fields["a3x.memory.resident_bytes"].contents())
    updates: dict[str, tuple[Any, Any, Any]] = {
        "a3x.memory.resident_bytes": (resident, GGUFValueType.UINT64, None),
        "a3x.lora.scale_folded": (True, GGUFValueType.BOOL, None),
        "a3x.derived.source_sha256": (source_sha256, GGUFValueType.STRING, None),
        "a3x.derived.factors": (json.dumps(factors, sort_keys=True), GGUFValueType.STRING, None),
    }
    if "a3x.memory.peak_bytes" in reader.fields:
        # The peak estimate is resident bytes plus intermediates; the intermediates
        # of the widest tensor are kept, so it stays an upper estimate.
        old_peaks = reader.fields["a3x.memory.peak_bytes"].contents()
        peaks = [int(peak) - old_resident + resident for peak in old_peaks]
        updates["a3x.memory.peak_bytes"] = (peaks, GGUFValueType.ARRAY, GGUFValueType.UINT64)
    return updates


def _stored_bytes(tensor: Any, factor: float) -> int:
    """Bytes of a tensor as the derived file stores it."""
    import gguf

    kind = gguf.GGMLQuantizationType(int(tensor.tensor_type))
    plain = kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    if tensor.name.endswith(LORA_B) and factor != 1.0 and not plain:
        return int(tensor.n_elements) * 4  # dequantized to F32 to be scaled
    return int(tensor.n_bytes)
