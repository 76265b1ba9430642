"""Validation of GGUF files in Python, before llama.cpp or transformers open them.

llama.cpp aborts the whole process on some malformed files (a failed
GGML_ASSERT), so every model or adapter file is read here first: magic,
version, metadata types, tensor table, and that every tensor's data lies
inside the file.

The scan reads the header directly instead of through `gguf.GGUFReader`.
GGUFReader builds numpy views of every metadata array, which takes about
10 s on Gemma 3's 262,144-token vocabulary; this scan takes 0.25 s.
"""

from __future__ import annotations

import functools
import hashlib
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types: id -> (struct format, byte size) for fixed-size scalars.
SCALAR_TYPES: dict[int, tuple[str, int]] = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
TYPE_STRING, TYPE_ARRAY = 8, 9
MAX_KEY_BYTES = 1 << 16
MAX_DIMS = 8
# Arrays up to this length are read into lists (adapter metadata, rope tables);
# longer ones, such as a vocabulary, are summarized as {"array_of", "length"}.
MAX_LISTED_ARRAY = 4096


class ModelFileError(Exception):
    """A model or adapter file is missing, unreadable or malformed."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: ne[0] first (the contiguous dimension)
    type_id: int
    type_name: str
    offset: int  # absolute byte offset in the file
    n_bytes: int


@dataclass(frozen=True)
class GGUFInfo:
    """Header facts of a GGUF file, read without loading its weights."""

    path: Path
    size_bytes: int
    version: int
    architecture: str
    file_type: str  # "model" or "adapter" (general.type; absent means model)
    name: str
    context_length: int | None
    block_count: int | None
    # Arrays of up to MAX_LISTED_ARRAY items are lists; longer ones are summarized
    # as {"array_of": type, "length": n}.
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...] = field(default=())

    @property
    def tensor_count(self) -> int:
        return len(self.tensors)


class _Cursor:
    """Bounds-checked little-endian reads from a memory-mapped file."""

    def __init__(self, data: mmap.mmap, path: Path):
        self.data, self.path, self.position = data, path, 0

    def need(self, count: int, what: str) -> None:
        if count < 0 or self.position + count > len(self.data):
            raise ModelFileError(
                f"{self.path} is truncated or malformed: {what} at byte {self.position} needs "
                f"{count} bytes but the file has {len(self.data)}; the file is damaged, copy or "
                "assemble it again"
            )

    def scalar(self, fmt: str, size: int, what: str) -> Any:
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.data, self.position)
        self.position += size
        return value

    def string(self, what: str, limit: int | None = None) -> bytes:
        length = self.scalar("<Q", 8, what)
        if limit is not None and length > limit:
            raise ModelFileError(f"{self.path} is malformed: {what} claims {length} bytes")
        self.need(length, what)
        value = self.data[self.position : self.position + length]
        self.position += length
        return value

    def skip(self, count: int, what: str) -> None:
        self.need(count, what)
        self.position += count


def inspect_gguf(path: Path | str) -> GGUFInfo:
    """Read and check a GGUF file's header and tensor table.

    Raises ModelFileError naming the path and the problem when the file is
    missing, not a GGUF file, truncated, or has invalid metadata.
    """
    path = Path(path).expanduser()
    size = _check_readable_file(path)
    with path.open("rb") as handle:
        magic = handle.read(4)
        if magic != GGUF_MAGIC:
            raise ModelFileError(
                f"{path} is not a GGUF file (it starts with {magic!r}, expected b'GGUF'); "
                "give a .gguf file (a model or a LoRA adapter)"
            )
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _scan(_Cursor(data, path), size)


def _scan(cursor: _Cursor, size: int) -> GGUFInfo:
    path = cursor.path
    cursor.skip(4, "magic")
    version = cursor.scalar("<I", 4, "version")
    if version not in SUPPORTED_VERSIONS:
        raise ModelFileError(
            f"{path} is GGUF version {version}; A3X reads versions "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}. Convert the file with a current llama.cpp"
        )
    tensor_count = cursor.scalar("<Q", 8, "tensor count")
    kv_count = cursor.scalar("<Q", 8, "metadata count")
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = _decode(cursor.string("metadata key", MAX_KEY_BYTES), path, "metadata key")
        value_type = cursor.scalar("<I", 4, f"type of '{key}'")
        metadata[key] = _read_value(cursor, value_type, key)

    tensors_raw = []
    for index in range(tensor_count):
        name = _decode(cursor.string(f"tensor {index} name", MAX_KEY_BYTES), path, "tensor name")
        n_dims = cursor.scalar("<I", 4, f"tensor '{name}' dimension count")
        if not 1 <= n_dims <= MAX_DIMS:
            raise ModelFileError(f"{path} is malformed: tensor '{name}' has {n_dims} dimensions")
        shape = tuple(cursor.scalar("<Q", 8, f"tensor '{name}' shape") for _ in range(n_dims))
        type_id = cursor.scalar("<I", 4, f"tensor '{name}' type")
        offset = cursor.scalar("<Q", 8, f"tensor '{name}' offset")
        tensors_raw.append((name, shape, type_id, offset))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelFileError(f"{path} has invalid general.alignment {alignment!r}")
    data_start = -(-cursor.position // alignment) * alignment
    tensors = tuple(_tensor_info(path, size, data_start, *raw) for raw in tensors_raw)
    return _info(path, size, version, metadata, tensors)


def _read_value(cursor: _Cursor, value_type: int, key: str) -> Any:
    if value_type in SCALAR_TYPES:
        fmt, width = SCALAR_TYPES[value_type]
        return cursor.scalar(fmt, width, f"value of '{key}'")
    if value_type == TYPE_STRING:
        return _decode(cursor.string(f"value of '{key}'"), cursor.path, f"value of '{key}'")
    if value_type == TYPE_ARRAY:
        item_type = cursor.scalar("<I", 4, f"item type of '{key}'")
        length = cursor.scalar("<Q", 8, f"length of '{key}'")
        listed = length <= MAX_LISTED_ARRAY
        if item_type in SCALAR_TYPES:
            fmt, width = SCALAR_TYPES[item_type]
            if listed:
                return [cursor.scalar(fmt, width, f"item of '{key}'") for _ in range(length)]
            cursor.skip(length * width, f"items of '{key}'")
        elif item_type == TYPE_STRING:
            items = [cursor.string(f"item of '{key}'") for _ in range(length)]
            if key == "tokenizer.ggml.tokens" and len(set(items)) != len(items):
                # llama.cpp aborts on this (GGML_ASSERT on the token map size).
                raise ModelFileError(
                    f"{cursor.path} is malformed: 'tokenizer.ggml.tokens' lists "
                    f"{len(items) - len(set(items))} duplicate token(s)"
                )
            if listed:
                return [_decode(item, cursor.path, f"item of '{key}'") for item in items]
        else:
            raise ModelFileError(
                f"{cursor.path} is malformed: array '{key}' has item type {item_type}"
            )
        return {"array_of": item_type, "length": length}
    raise ModelFileError(f"{cursor.path} is malformed: key '{key}' has unknown type {value_type}")


def _tensor_info(
    path: Path,
    size: int,
    data_start: int,
    name: str,
    shape: tuple[int, ...],
    type_id: int,
    offset: int,
) -> TensorInfo:
    import gguf  # deferred: only the quantization tables are needed

    try:
        kind = gguf.GGMLQuantizationType(type_id)
        block_size, type_size = gguf.GGML_QUANT_SIZES[kind]
    except (ValueError, KeyError) as error:
        raise ModelFileError(
            f"{path}: tensor '{name}' has tensor type {type_id}, which this gguf package does "
            "not know; upgrade the gguf package or convert the file again"
        ) from error
    elements = 1
    for dim in shape:
        elements *= dim
    if shape[0] % block_size:
        raise ModelFileError(
            f"{path} is malformed: tensor '{name}' has {shape[0]} columns, not a multiple of "
            f"the {kind.name} block size {block_size}"
        )
    n_bytes = elements // block_size * type_size
    start = data_start + offset
    if start + n_bytes > size:
        raise ModelFileError(
            f"{path} is truncated: tensor '{name}' ends at byte {start + n_bytes} but the file "
            f"has {size} bytes; the file is damaged, copy or assemble it again"
        )
    return TensorInfo(name, shape, type_id, kind.name, start, n_bytes)


def _info(
    path: Path, size: int, version: int, metadata: dict[str, Any], tensors: tuple[TensorInfo, ...]
) -> GGUFInfo:
    architecture = metadata.get("general.architecture")
    if not isinstance(architecture, str) or not architecture:
        raise ModelFileError(
            f"{path} has no string 'general.architecture' key; it is not a model or adapter "
            "that llama.cpp can load"
        )
    file_type = metadata.get("general.type", "model")
    return GGUFInfo(
        path=path,
        size_bytes=size,
        version=version,
        architecture=architecture,
        file_type=str(file_type),
        name=str(metadata.get("general.name") or path.stem),
        context_length=_int_or_none(metadata.get(f"{architecture}.context_length")),
        block_count=_int_or_none(metadata.get(f"{architecture}.block_count")),
        metadata=metadata,
        tensors=tensors,
    )


def read_tensor(info: GGUFInfo, tensor: TensorInfo) -> np.ndarray:
    """Read one tensor as float32 in numpy order (the reverse of the GGUF shape).

    Quantized types are dequantized with `gguf.quants.dequantize`.
    """
    import gguf
    import numpy as np

    raw = read_tensor_bytes(info, tensor)
    kind = gguf.GGMLQuantizationType(tensor.type_id)
    shape = tuple(reversed(tensor.shape))
    if kind == gguf.GGMLQuantizationType.F32:
        return raw.view(np.float32).reshape(shape).copy()
    if kind == gguf.GGMLQuantizationType.F16:
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    rows = raw.reshape(-1, raw.size // max(1, int(np.prod(shape[:-1]))))
    return np.asarray(gguf.quants.dequantize(rows, kind), dtype=np.float32).reshape(shape)


def read_tensor_bytes(info: GGUFInfo, tensor: TensorInfo) -> np.ndarray:
    """Read one tensor's stored bytes (a uint8 copy, not a view of the file)."""
    import numpy as np  # deferred: the command line imports this module

    with info.path.open("rb") as handle:
        handle.seek(tensor.offset)
        data = handle.read(tensor.n_bytes)
    if len(data) != tensor.n_bytes:
        raise ModelFileError(
            f"{info.path} is truncated: tensor '{tensor.name}' has {len(data)} of its "
            f"{tensor.n_bytes} bytes; the file is damaged, copy or write it again"
        )
    return np.frombuffer(data, dtype=np.uint8).copy()


def check_model_file(path: Path | str) -> GGUFInfo:
    """Inspect a GGUF file and require it to be a model, not an adapter."""
    info = inspect_gguf(path)
    if info.file_type != "model":
        raise ModelFileError(
            f"{info.path} is a GGUF {info.file_type} (general.type={info.file_type!r}), "
            "not a model; set the model path to a base model and load adapters separately"
        )
    if info.tensor_count == 0:
        raise ModelFileError(f"{info.path} contains no tensors, so it is not a usable model")
    return info


def sha256_of_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Return the hex sha256 of a file's content, read in 1 MiB chunks.

    Results are remembered per path, size and modification time, because a
    start describes the model twice (the agent, then the backend loader).
    """
    stat = path.stat()
    return _sha256_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns, chunk_bytes)


@functools.lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime_ns: int, chunk_bytes: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _decode(raw: bytes, path: Path, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ModelFileError(f"{path} is malformed: {what} is not UTF-8 ({error})") from error


def _check_readable_file(path: Path) -> int:
    if not path.exists():
        raise ModelFileError(
            f"model file {path} does not exist; check model.path in the config "
            "or the A3X_MODEL__PATH environment variable"
        )
    if not path.is_file():
        raise ModelFileError(f"model path {path} is not a file; point it at a .gguf file")
    if not os.access(path, os.R_OK):
        raise ModelFileError(f"model file {path} is not readable by this user; fix its permissions")
    size = path.stat().st_size
    if size < 24:  # magic, version, tensor count and metadata count
        raise ModelFileError(
            f"{path} has {size} bytes, too short for a GGUF header; the file is damaged or empty"
        )
    return size


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
