"""Reading GGUF LoRA adapters and checking their structure against a base model.

Layout (what llama.cpp's `llama_adapter_lora_init` expects): the metadata has
`general.type = "adapter"`, `adapter.type = "lora"` and a float
`adapter.lora.alpha`; for every modified base tensor `W` there are two tensors
`W.lora_a` and `W.lora_b`. In numpy order `lora_a` is (rank, in) and `lora_b`
is (out, rank), so the update is `scale * lora_b @ lora_a` with
`scale = alpha / rank` (llama.cpp applies the adapter's own scale on top).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora import LoraError
from runtime.gguf_file import GGUFInfo, ModelFileError, TensorInfo, inspect_gguf, read_tensor

LORA_A, LORA_B = ".lora_a", ".lora_b"


class AdapterFormatError(ModelFileError, LoraError):
    """A file is not a well-formed GGUF LoRA adapter, or does not fit its base."""


@dataclass(frozen=True)
class LoraPair:
    """The two factors of one modified base tensor, in numpy order."""

    target: str  # GGUF base tensor name, e.g. blk.3.attn_q.weight
    a: np.ndarray  # (rank, in)
    b: np.ndarray  # (out, rank)

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self, scale: float) -> np.ndarray:
        """Return `scale * B @ A`, the (out, in) update of the base weight."""
        return (self.b.astype(np.float64) @ self.a.astype(np.float64) * scale).astype(np.float32)


@dataclass(frozen=True)
class GGUFAdapter:
    info: GGUFInfo
    alpha: float  # 0 means llama.cpp uses the adapter scale alone, without alpha / rank
    pairs: dict[str, LoraPair]  # by target name

    @property
    def path(self) -> Path:
        return self.info.path

    @property
    def architecture(self) -> str:
        return self.info.architecture

    def scaling(self, target: str) -> float:
        """Return the factor llama.cpp multiplies `B @ A` by at adapter scale 1."""
        pair = self.pairs[target]
        return self.alpha / pair.rank if self.alpha else 1.0

    @property
    def resident_bytes(self) -> int:
        return sum(tensor.n_bytes for tensor in self.info.tensors)


def read_gguf_adapter(path: Path | str, load_tensors: bool = True) -> GGUFAdapter:
    """Read and validate a GGUF LoRA adapter; raise AdapterFormatError naming the problem.

    With `load_tensors=False` the factors are empty placeholders (shapes are
    still checked), which is enough for a structure check.
    """
    info = inspect_gguf(path)
    metadata = info.metadata
    if info.file_type != "adapter" or metadata.get("adapter.type") != "lora":
        raise AdapterFormatError(
            f"{info.path} is not a GGUF LoRA adapter (general.type={info.file_type!r}, "
            f"adapter.type={metadata.get('adapter.type')!r}); export a PEFT adapter with "
            "`a3x lora export`"
        )
    alpha = metadata.get("adapter.lora.alpha", 0.0)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not np.isfinite(alpha):
        raise AdapterFormatError(f"{info.path} has an invalid adapter.lora.alpha {alpha!r}")
    tensors = {tensor.name: tensor for tensor in info.tensors}
    pairs = {}
    for name, tensor in tensors.items():
        if name.endswith(LORA_A):
            target = name.removesuffix(LORA_A)
            b_tensor = tensors.get(target + LORA_B)
            if b_tensor is None:
                raise AdapterFormatError(f"{info.path}: '{name}' has no matching '{target}.lora_b'")
            pairs[target] = _pair(info, target, tensor, b_tensor, load_tensors)
        elif name.endswith(LORA_B):
            if name.removesuffix(LORA_B) + LORA_A not in tensors:
                raise AdapterFormatError(f"{info.path}: '{name}' has no matching lora_a tensor")
        else:
            raise AdapterFormatError(
                f"{info.path}: tensor '{name}' is neither a lora_a nor a lora_b factor; "
                "A3X adapters hold LoRA factors only"
            )
    if not pairs:
        raise AdapterFormatError(f"{info.path} contains no LoRA tensors")
    return GGUFAdapter(info=info, alpha=float(alpha), pairs=pairs)


def _pair(
    info: GGUFInfo, target: str, a_info: TensorInfo, b_info: TensorInfo, load: bool
) -> LoraPair:
    # GGUF shapes are reversed: lora_a is [in, rank], lora_b is [rank, out].
    if len(a_info.shape) != 2 or len(b_info.shape) != 2 or a_info.shape[1] != b_info.shape[0]:
        raise AdapterFormatError(
            f"{info.path}: '{target}' has lora_a of GGUF shape {list(a_info.shape)} and lora_b "
            f"of {list(b_info.shape)}; lora_a must be [in, rank] and lora_b [rank, out]"
        )
    if load:
        a, b = read_tensor(info, a_info), read_tensor(info, b_info)
        for factor, values in (("lora_a", a), ("lora_b", b)):
            if not np.isfinite(values).all():
                raise AdapterFormatError(
                    f"{info.path}: {target}.{factor} contains NaN or infinite values; "
                    "the adapter was trained or saved badly, do not use it"
                )
    else:
        a = np.empty((a_info.shape[1], a_info.shape[0]), dtype=np.float32)
        b = np.empty((b_info.shape[1], b_info.shape[0]), dtype=np.float32)
    return LoraPair(target, a, b)


def structure_problems(adapter: GGUFAdapter, base: GGUFInfo) -> list[str]:
    """List every way the adapter does not fit the base: architecture, names, shapes.

    An empty list means llama.cpp can apply the adapter to this base.
    """
    problems = []
    if adapter.architecture != base.architecture:
        problems.append(
            f"the adapter is for architecture '{adapter.architecture}' but the base "
            f"'{base.name}' is '{base.architecture}'"
        )
    base_tensors = {tensor.name: tensor for tensor in base.tensors}
    for target, pair in sorted(adapter.pairs.items()):
        tensor = base_tensors.get(target)
        if tensor is None:
            problems.append(
                f"the adapter modifies '{target}', which base '{base.name}' does not have"
            )
            continue
        if len(tensor.shape) != 2:
            problems.append(f"'{target}' in the base is not a matrix (GGUF shape {tensor.shape})")
            continue
        columns, rows = tensor.shape  # GGUF order: ne0 = in, ne1 = out
        if pair.a.shape[1] != columns or pair.b.shape[0] != rows:
            problems.append(
                f"'{target}': the adapter maps {pair.a.shape[1]} -> {pair.b.shape[0]} but the "
                f"base weight maps {columns} -> {rows}"
            )
    return problems


def check_fits_base(adapter: GGUFAdapter, base: GGUFInfo) -> None:
    """Raise AdapterFormatError listing the problems when the adapter does not fit the base."""
    problems = structure_problems(adapter, base)
    if problems:
        shown = "; ".join(problems[:5])
        if len(problems) > 5:
            shown += f"; and {len(problems) - 5} more"
        raise AdapterFormatError(
            f"adapter {adapter.path} does not fit base {base.path}: {shown}. "
            "Was it trained on another base?"
        )
