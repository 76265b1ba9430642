"""Merging GGUF LoRA adapters into a GGUF base model, written as a new GGUF model file.

For every base tensor that an adapter modifies, the merged weight is

    W' = W + sum_i scale_i * scaling_i * B_i @ A_i

where `scaling_i` is the adapter's alpha / rank (1 when alpha is 0), the same
update llama.cpp applies at run time. `W` is dequantized, the deltas are added
in float32, and `W'` is requantized to the tensor's original type when the gguf
package can quantize to it. Otherwise (K-quants, IQ types) it is stored as F16.
Every other tensor and every metadata field is copied unchanged, and the
provenance of the merge goes under `a3x.merge.*`.

The output is written to a temporary file in the output folder and renamed
at the end, so a merge that is killed or runs out of disk space never
leaves a partial file under the output name.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import stat
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import structlog

from lora import LoraError
from lora.gguf_adapter import GGUFAdapter, check_fits_base, read_gguf_adapter
from runtime.backend import ActiveAdapter
from runtime.gguf_file import (
    GGUFInfo,
    TensorInfo,
    check_model_file,
    read_tensor,
    sha256_of_file,
)

if TYPE_CHECKING:
    import gguf

log = structlog.get_logger(__name__)

MERGE_FORMAT_VERSION = 1  # version of the a3x.merge.* keys and of the --json result
PROVENANCE_PREFIX = "a3x.merge."
OutType = Literal["auto", "f16", "f32"]
OUTTYPES: tuple[OutType, ...] = ("auto", "f16", "f32")


class MergeError(LoraError):
    """Adapters cannot be merged into a base, or the merged file cannot be written."""


@dataclass(frozen=True)
class MergedTensor:
    """One base tensor that the merge modified, and the type it was written in."""

    name: str
    original_type: str
    written_type: str
    fallback_reason: str | None  # why written_type differs from original_type


@dataclass(frozen=True)
class MergeResult:
    output: Path
    base: Path
    base_sha256: str
    adapters: tuple[ActiveAdapter, ...]
    outtype: OutType
    tensors: tuple[MergedTensor, ...]  # the modified tensors, in file order
    output_bytes: int
    seconds: float

    @property
    def fallbacks(self) -> tuple[MergedTensor, ...]:
        return tuple(tensor for tensor in self.tensors if tensor.fallback_reason)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": MERGE_FORMAT_VERSION,
            "output": str(self.output),
            "base": str(self.base),
            "base_sha256": self.base_sha256,
            "adapters": [{"path": str(a.path), "scale": a.scale} for a in self.adapters],
            "outtype": self.outtype,
            "output_bytes": self.output_bytes,
            "seconds": round(self.seconds, 3),
            "tensors": [
                {
                    "name": t.name,
                    "original_type": t.original_type,
                    "written_type": t.written_type,
                    "fallback_reason": t.fallback_reason,
                }
                for t in self.tensors
            ],
        }


@dataclass(frozen=True)
class _Source:
    """An adapter read from disk, with the scale it is merged at."""

    spec: ActiveAdapter
    adapter: GGUFAdapter

    @property
    def label(self) -> str:
        """Return `file.gguf:scale`, the command-line form, with the scale in full precision."""
        return f"{self.spec.path.name}:{self.spec.scale!r}"


def merge_adapters(
    base_path: Path | str,
    adapters: Sequence[ActiveAdapter],
    output: Path | str,
    outtype: OutType = "auto",
) -> MergeResult:
    """Merge the adapters, each at its scale, into the base and write `output`.

    Raises MergeError or AdapterFormatError naming the adapter and tensor when an
    adapter does not fit the base or the merged weights are not finite, and
    ModelFileError when an input file is missing or malformed.
    """
    started = time.perf_counter()
    if outtype not in OUTTYPES:
        raise MergeError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    if not adapters:
        raise MergeError("no adapters to merge; give at least one ADAPTER.gguf[:SCALE]")

    # Check every input before writing anything.
    base = check_model_file(base_path)
    output = Path(output).expanduser()
    _check_output_path(output, base.path, [adapter.path for adapter in adapters])
    sources = [_read_source(spec, base) for spec in adapters]
    plan = _plan_tensors(base, sources, outtype)
    log.info(
        "lora.merging",
        base=str(base.path),
        adapters=[source.label for source in sources],
        tensors=len(plan),
        output=str(output),
    )

    base_sha256 = sha256_of_file(base.path)
    provenance = _provenance(base, base_sha256, sources, outtype, plan)
    _write_atomically(
        output,
        lambda path: _write_merged(path, base, sources, plan, provenance),
        mode=stat.S_IMODE(base.path.stat().st_mode),
    )

    result = MergeResult(
        output=output,
        base=base.path,
        base_sha256=base_sha256,
        adapters=tuple(source.spec for source in sources),
        outtype=outtype,
        tensors=tuple(plan.values()),
        output_bytes=output.stat().st_size,
        seconds=time.perf_counter() - started,
    )
    log.info(
        "lora.merged",
        output=str(output),
        tensors=len(result.tensors),
        fallbacks=len(result.fallbacks),
        seconds=round(result.seconds, 2),
    )
    return result


def parse_adapter_spec(text: str) -> ActiveAdapter:
    """Parse `ADAPTER.gguf[:SCALE]`. The scale defaults to 1.

    A text that names an existing file is taken whole as the path, so a file
    name that contains a colon still works.
    """
    if Path(text).expanduser().exists() or ":" not in text:
        return ActiveAdapter(Path(text).expanduser(), 1.0)
    path_text, _, scale_text = text.rpartition(":")
    try:
        scale = float(scale_text)
    except ValueError:
        raise MergeError(
            f"{text!r}: the scale {scale_text!r} is not a number; write ADAPTER.gguf:SCALE, "
            "for example adapter.gguf:0.5"
        ) from None
    return ActiveAdapter(Path(path_text).expanduser(), scale)


# Checking the inputs


def _check_output_path(output: Path, base: Path, adapters: Sequence[Path]) -> None:
    if output.is_dir():
        raise MergeError(f"output {output} is a folder; give a file name such as merged.gguf")
    if not output.parent.is_dir():
        raise MergeError(f"the folder of output {output} does not exist; create it first")
    for what, path in [("base model", base), *(("adapter", Path(a)) for a in adapters)]:
        if output.exists() and path.exists() and os.path.samefile(output, path):
            raise MergeError(
                f"output {output} is the {what} {path}; the merge does not overwrite its "
                "inputs, choose another output file"
            )


def _read_source(spec: ActiveAdapter, base: GGUFInfo) -> _Source:
    if not math.isfinite(spec.scale):
        raise MergeError(f"adapter {spec.path} has scale {spec.scale}; give a finite scale")
    adapter = read_gguf_adapter(spec.path)
    check_fits_base(adapter, base)
    return _Source(spec, adapter)


# Choosing the written type of each modified tensor


def _plan_tensors(
    base: GGUFInfo, sources: Sequence[_Source], outtype: OutType
) -> dict[str, MergedTensor]:
    """Return the modified tensors, in base file order, with the type each is written in."""
    targets = {target for source in sources for target in source.adapter.pairs}
    plan = {}
    for tensor in base.tensors:
        if tensor.name in targets:
            written, reason = _written_type(tensor.type_name, outtype)
            plan[tensor.name] = MergedTensor(tensor.name, tensor.type_name, written, reason)
    return plan


def _written_type(original: str, outtype: OutType) -> tuple[str, str | None]:
    """Return the type to store a merged tensor in and, when it differs, the reason."""
    if outtype != "auto":
        forced = outtype.upper()
        return forced, None if forced == original else f"--outtype {outtype} was requested"
    if _gguf_can_quantize(original):
        return original, None
    if original.endswith("_K"):
        reason = f"{original}: the gguf package cannot quantize K-quants"
    else:
        reason = f"{original}: the gguf package cannot quantize this type"
    return "F16", reason


@functools.cache
def _gguf_can_quantize(type_name: str) -> bool:
    import gguf

    kind = gguf.GGMLQuantizationType[type_name]
    block_size, _ = gguf.GGML_QUANT_SIZES[kind]
    try:
        gguf.quants.quantize(np.zeros((1, block_size), dtype=np.float32), kind)
    except NotImplementedError:
        return False
    return True


# Computing merged tensors


def _merged_tensor(base: GGUFInfo, tensor: TensorInfo, sources: Sequence[_Source]) -> np.ndarray:
    """Return W + the scaled deltas of every adapter that modifies `tensor`, in float32."""
    weight = read_tensor(base, tensor)
    if not np.isfinite(weight).all():
        raise MergeError(
            f"base {base.path}: tensor '{tensor.name}' contains NaN or infinite values, so "
            "the merged tensor would too; the base model file is damaged"
        )
    for source in sources:
        pair = source.adapter.pairs.get(tensor.name)
        if pair is None:
            continue
        scale = source.spec.scale * source.adapter.scaling(tensor.name)
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below
            weight += pair.delta(scale)
        if not np.isfinite(weight).all():
            raise MergeError(
                f"adapter {source.spec.path} at scale {source.spec.scale:g} makes tensor "
                f"'{tensor.name}' non-finite (NaN or infinite values); the merge is rejected. "
                "Lower the scale or check how the adapter was trained"
            )
    return weight


def _encode(weight: np.ndarray, merged: MergedTensor) -> np.ndarray:
    """Quantize a merged float32 weight to its written type and check the result stays finite."""
    import gguf

    kind = gguf.GGMLQuantizationType[merged.written_type]
    with np.errstate(over="ignore"):  # an overflow is checked just below
        data = np.ascontiguousarray(gguf.quants.quantize(weight, kind))
    # F16 and the F16 block scales of quantized types overflow above 65504.
    if kind != gguf.GGMLQuantizationType.F32:
        if not np.isfinite(gguf.quants.dequantize(data, kind)).all():
            raise MergeError(
                f"merged tensor '{merged.name}' does not fit in {merged.written_type}: values up "
                f"to {float(np.abs(weight).max()):.3g} overflow it. Write it with --outtype f32"
            )
    return data


# Writing the output file


def _provenance(
    base: GGUFInfo,
    base_sha256: str,
    sources: Sequence[_Source],
    outtype: OutType,
    plan: dict[str, MergedTensor],
) -> list[tuple[str, Any, str]]:
    """Return the `a3x.merge.*` fields as (key, value, GGUF value type name)."""
    fields: list[tuple[str, Any, str]] = [
        ("format_version", MERGE_FORMAT_VERSION, "UINT32"),
        ("base", base.path.name, "STRING"),
        ("base_sha256", base_sha256, "STRING"),
        ("adapters", [source.label for source in sources], "ARRAY"),
        (
            "adapter_sha256",
            [sha256_of_file(source.spec.path) for source in sources],
            "ARRAY",
        ),
        ("outtype", outtype, "STRING"),
    ]
    fallbacks = [merged.name for merged in plan.values() if merged.fallback_reason]
    if fallbacks:  # GGUFWriter cannot write an empty array
        fields.append(("fallback_tensors", fallbacks, "ARRAY"))
    return [(PROVENANCE_PREFIX + key, value, kind) for key, value, kind in fields]


def _write_merged(
    path: Path,
    base: GGUFInfo,
    sources: Sequence[_Source],
    plan: dict[str, MergedTensor],
    provenance: list[tuple[str, Any, str]],
) -> None:
    import gguf

    writer = gguf.GGUFWriter(path, base.architecture)
    alignment = base.metadata.get("general.alignment")
    if isinstance(alignment, int):
        writer.data_alignment = alignment
    _copy_fields(writer, base)
    for key, value, kind in provenance:
        writer.add_key_value(key, value, gguf.GGUFValueType[kind])

    for tensor in base.tensors:
        merged = plan.get(tensor.name)
        written = merged.written_type if merged else tensor.type_name
        _add_tensor_info(writer, tensor, written)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()

    # Tensors are written one at a time, so at most one merged tensor is in memory.
    stored = np.memmap(base.path, dtype=np.uint8, mode="r")
    try:
        for tensor in base.tensors:
            merged = plan.get(tensor.name)
            if merged is None:
                writer.write_tensor_data(stored[tensor.offset : tensor.offset + tensor.n_bytes])
            else:
                writer.write_tensor_data(_encode(_merged_tensor(base, tensor, sources), merged))
    finally:
        del stored
        writer.close()


def _copy_fields(writer: gguf.GGUFWriter, base: GGUFInfo) -> None:
    """Copy every metadata field of the base, except earlier `a3x.merge.*` provenance."""
    import gguf

    # GGUFReader takes about 10 s on Gemma 3's 262,144-token vocabulary, but it
    # returns every field with its exact value type, which the header scan does not.
    reader = gguf.GGUFReader(base.path)
    for field in reader.fields.values():
        # GGUF.* are the reader's virtual fields; GGUFWriter writes the architecture itself.
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        if field.name.startswith(PROVENANCE_PREFIX):
            continue  # replaced by this merge's provenance
        value_type = field.types[0]
        item_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if item_type is not None and len(value) == 0:
            # NOTE: GGUFWriter 0.19 raises on empty arrays, so such a base cannot be copied.
            raise MergeError(
                f"base {base.path}: metadata field '{field.name}' is an empty array, which the "
                "gguf package cannot write; remove the field from the base and merge again"
            )
        writer.add_key_value(field.name, value, value_type, item_type)


def _add_tensor_info(writer: gguf.GGUFWriter, tensor: TensorInfo, type_name: str) -> None:
    import gguf

    kind = gguf.GGMLQuantizationType[type_name]
    block_size, type_size = gguf.GGML_QUANT_SIZES[kind]
    # numpy order with the last dimension in bytes, which GGUFWriter expects for raw data
    numpy_shape = tuple(reversed(tensor.shape))
    byte_shape = (*numpy_shape[:-1], numpy_shape[-1] // block_size * type_size)
    n_bytes = int(np.prod(byte_shape))
    writer.add_tensor_info(tensor.name, byte_shape, np.dtype(np.uint8), n_bytes, raw_dtype=kind)


def _write_atomically(output: Path, write: Callable[[Path], None], mode: int) -> None:
    """Run `write` on a temporary file next to `output`, then rename it to `output`."""
    handle, name = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        with temporary.open("rb") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, output)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise MergeError(
            f"could not write {output}: {error.strerror or error}; check the free space and "
            f"permissions of {output.parent}. No output file was written"
        ) from error
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", type=Path, metavar="BASE.gguf", help="the GGUF base model")
    parser.add_argument(
        "adapters",
        nargs="+",
        metavar="ADAPTER.gguf[:SCALE]",
        help="a GGUF LoRA adapter and its scale (default 1; a negative scale subtracts it)",
    )
    parser.add_argument(
        "-o", "--output", type=Path, required=True, metavar="OUT.gguf", help="the merged model"
    )
    parser.add_argument(
        "--outtype",
        choices=OUTTYPES,
        default="auto",
        help="type of the modified tensors: auto keeps each tensor's type where the gguf "
        "package can quantize to it and stores F16 otherwise; f16 or f32 stores every "
        "modified tensor in that type (default: auto)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def command(args: argparse.Namespace) -> int:
    adapters = [parse_adapter_spec(text) for text in args.adapters]
    result = merge_adapters(args.base, adapters, args.output, args.outtype)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(format_result(result))
    return 0


def format_result(result: MergeResult) -> str:
    """Return a short text report: a summary line and one row per modified tensor."""
    lines = [
        f"Merged {len(result.adapters)} adapter(s) into {result.base.name}: wrote "
        f"{result.output} ({result.output_bytes / 1e6:.1f} MB) in {result.seconds:.1f} s, "
        f"{len(result.tensors)} tensor(s) modified, {len(result.fallbacks)} fallback(s)."
    ]
    width = max(len("tensor"), *(len(tensor.name) for tensor in result.tensors))
    lines.append(f"{'tensor':<{width}}  {'original':<8}  {'written':<8}  fallback reason")
    for tensor in result.tensors:
        lines.append(
            f"{tensor.name:<{width}}  {tensor.original_type:<8}  {tensor.written_type:<8}  "
            f"{tensor.fallback_reason or ''}".rstrip()
        )
    return "\n".join(lines)
