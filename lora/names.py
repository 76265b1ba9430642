"""Module and tensor names across the two formats an adapter lives in.

PEFT names a LoRA target by its transformers module path
(`model.layers.3.self_attn.q_proj`); llama.cpp names it by the GGUF tensor it
modifies (`blk.3.attn_q.weight`). The `gguf` package's TensorNameMap holds
the mapping that llama.cpp's converter uses, so both directions go through it.
"""

from __future__ import annotations

import functools
import re

import numpy as np

from lora import LoraError

# Transformers module paths that A3X writes when importing an adapter. Llama,
# Gemma, Qwen and Mistral causal LMs in transformers all use this prefix.
HF_BLOCK_PREFIX = "model.layers."

# llama.cpp's converter reorders the rows of the query and key projections of
# these architectures (from the Hugging Face rotary layout to the GGUF one), and
# transformers undoes it when it loads such a GGUF file. A LoRA B matrix on
# those projections must be reordered the same way.
PERMUTED_ARCHITECTURES = frozenset({"llama"})


class NameMapError(LoraError):
    """A module or tensor name has no counterpart in the other format."""


@functools.lru_cache(maxsize=8)
def tensor_name_map(architecture: str, block_count: int) -> object:
    import gguf

    by_name = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
    if architecture not in by_name:
        raise NameMapError(
            f"architecture '{architecture}' is not known to the installed gguf package "
            f"{_gguf_version()}; upgrade the gguf package"
        )
    return gguf.get_tensor_name_map(by_name[architecture], block_count)


def gguf_name_of_module(module: str, architecture: str, block_count: int) -> str | None:
    """Return the GGUF weight name (`blk.3.attn_q.weight`) of a transformers module path,
    or None when the architecture has no such tensor."""
    name_map = tensor_name_map(architecture, block_count)
    found = name_map.get_name(module)  # type: ignore[attr-defined]
    return f"{found}.weight" if found else None


def module_of_gguf_name(tensor: str, architecture: str, block_count: int) -> str:
    """Return the transformers module path of a GGUF weight name.

    Several model families map to the same GGUF name; the `model.layers.N.*`
    spelling is chosen because the transformers classes for GGUF architectures use it.
    """
    stem = tensor.removesuffix(".weight")
    name_map = tensor_name_map(architecture, block_count)
    candidates = [
        key
        for key, (_, gguf_name) in name_map.mapping.items()  # type: ignore[attr-defined]
        if gguf_name == stem and key != stem
    ]
    preferred = [c for c in candidates if c.startswith(HF_BLOCK_PREFIX) and "no_perm" not in c]
    if not preferred:
        raise NameMapError(
            f"GGUF tensor '{tensor}' of architecture '{architecture}' has no transformers "
            f"module under '{HF_BLOCK_PREFIX}'; this adapter cannot be imported to PEFT"
        )
    return preferred[0]


def block_of(tensor: str) -> int | None:
    """Return the block index of a GGUF tensor name (`blk.3.attn_q.weight` -> 3)."""
    match = re.match(r"blk\.(\d+)\.", tensor)
    return int(match.group(1)) if match else None


def rows_permuted(architecture: str, tensor: str) -> bool:
    """Tell whether llama.cpp's converter reorders this tensor's rows."""
    return architecture in PERMUTED_ARCHITECTURES and tensor.endswith(
        (".attn_q.weight", ".attn_k.weight")
    )


def permute_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """Reorder output rows from the Hugging Face rotary layout to the GGUF one.

    Within each head, HF keeps the two rotary halves as two runs of rows; GGUF
    interleaves them pairwise. `heads` is the head count of that projection
    (the key-value head count for the key projection).
    """
    out = rows.shape[0]
    return (
        rows.reshape(heads, 2, out // heads // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def unpermute_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo `permute_rows`."""
    out = rows.shape[0]
    return (
        rows.reshape(heads, out // heads // 2, 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def heads_of(tensor: str, metadata: dict, architecture: str) -> int:
    """Return the head count that `permute_rows` needs for a query or key tensor."""
    heads = metadata.get(f"{architecture}.attention.head_count")
    if tensor.endswith(".attn_k.weight"):
        heads = metadata.get(f"{architecture}.attention.head_count_kv", heads)
    if not isinstance(heads, int) or heads <= 0:
        raise NameMapError(
            f"the base model has no valid {architecture}.attention.head_count ({heads!r}), "
            f"which is needed to reorder the rows of '{tensor}'"
        )
    return heads


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")
