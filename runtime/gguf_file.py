"""Validation of GGUF files in Python, before llama.cpp or transformers open them.

llama.cpp aborts the whole process on some malformed files (a failed
GGML_ASSERT), so every model file is read here first: magic, header, metadata
types and that every tensor's data lies inside the file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GGUF_MAGIC = b"GGUF"


class ModelFileError(Exception):
    """A model or adapter file is missing, unreadable or malformed."""


@dataclass(frozen=True)
class GGUFInfo:
    """What A3X needs to know about a GGUF file without loading its weights."""

    path: Path
    size_bytes: int
    architecture: str
    file_type: str  # "model" or "adapter" (general.type; absent means model)
    name: str
    tensor_count: int
    context_length: int | None
    block_count: int | None
    metadata: dict[str, Any]


def field_value(reader: Any, key: str) -> Any:
    """Return a metadata value of a gguf.GGUFReader as a Python value, or None."""
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.contents()


def inspect_gguf(path: Path | str) -> GGUFInfo:
    """Read and check a GGUF file's header and tensor table.

    Raises ModelFileError naming the path and the problem when the file is
    missing, not a GGUF file, or truncated.
    """
    path = Path(path).expanduser()
    size = _check_readable_file(path)
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ModelFileError(
            f"{path} is not a GGUF file (it starts with {magic!r}, expected b'GGUF'); "
            "point the model path at a .gguf file"
        )

    import gguf  # deferred: importing gguf pulls in numpy and yaml

    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as error:  # gguf raises ValueError, IndexError, struct errors...
        raise ModelFileError(
            f"{path} has a malformed or truncated GGUF header ({error}); "
            "the file is damaged, copy or assemble it again"
        ) from error

    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise ModelFileError(
                f"{path} is truncated: tensor '{tensor.name}' ends at byte {end} but the "
                f"file has {size} bytes; the file is damaged, copy or assemble it again"
            )

    architecture = field_value(reader, "general.architecture")
    if not isinstance(architecture, str) or not architecture:
        raise ModelFileError(
            f"{path} has no string 'general.architecture' key; it is not a model or "
            "adapter that llama.cpp can load"
        )
    file_type = field_value(reader, "general.type") or "model"
    metadata = {
        key: field_value(reader, key)
        for key in reader.fields
        if not key.startswith("tokenizer.ggml.") and not key.startswith("GGUF.")
    }
    return GGUFInfo(
        path=path,
        size_bytes=size,
        architecture=architecture,
        file_type=str(file_type),
        name=str(field_value(reader, "general.name") or path.stem),
        tensor_count=len(reader.tensors),
        context_length=_int_or_none(field_value(reader, f"{architecture}.context_length")),
        block_count=_int_or_none(field_value(reader, f"{architecture}.block_count")),
        metadata=metadata,
    )


def check_model_file(path: Path | str) -> GGUFInfo:
    """Inspect a GGUF file and require it to be a model, not an adapter."""
    info = inspect_gguf(path)
    if info.file_type != "model":
        raise ModelFileError(
            f"{info.path} is a GGUF {info.file_type} (general.type={info.file_type!r}), "
            "not a model; set the model path to a base model and load adapters separately"
        )
    if info.tensor_count == 0:
        raise ModelFileError(f"{info.path} holds no tensors; it is not a usable model")
    return info


def sha256_of_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's content, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


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
    return int(value) if isinstance(value, int | float) else None
