"""Frozen base weights kept in their GGUF quantization and dequantized per layer by torch.

A LoRA trainer never updates the base, so its linear weights can stay in the
packed blocks of the GGUF file: a Q4_K matrix takes 4.5 bits per weight
instead of 32. `QuantLinear` dequantizes its weight when it runs and drops
it afterwards, in the forward pass and again in the backward pass, so no
float weight outlives the computation that needs it.

`dequantize` returns the same float32 bits as `gguf.quants.dequantize` of
gguf-py 0.19 for every supported type, because it does the same float32
operations in the same order. The one exception is a signaling NaN in F16
data, which torch turns into a quiet NaN. Supported types: F32, F16, BF16,
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K and Q6_K.

GGUF lists a tensor's dimensions contiguous one first (`ne[0]` is the number
of columns), the reverse of torch. Every shape in this module is in torch
order: `(rows, cols)`, which for a linear weight is `(out_features,
in_features)`. A row is a whole number of blocks, so a slice of rows of the
packed bytes is the packed form of those rows.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lora import LoraError

if TYPE_CHECKING:
    from gguf import ReaderTensor

Q = GGMLQuantizationType

# Dtypes that QuantLinear and QuantEmbedding compute in.
COMPUTE_DTYPES = (torch.float32, torch.bfloat16)


class QuantizedWeightError(LoraError):
    """A quantized weight cannot be built or dequantized as requested."""


class UnsupportedQuantTypeError(QuantizedWeightError):
    """The GGUF quantization type has no torch dequantizer in this module."""


# Dequantization by type

# Shift amounts that unpack 4-bit, 2-bit and 1-bit fields from a byte.
_NIBBLE_SHIFTS = torch.tensor([0, 4], dtype=torch.uint8)
_CRUMB_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)

# The functions below compute in float32 in the order gguf.quants does (each
# product and difference rounded on its own), which makes the bits match. They
# work in place on their own temporaries to allocate the float result only once.


def _unpack(packed: torch.Tensor, shifts: torch.Tensor, mask: int) -> torch.Tensor:
    """Unpack bit fields: `packed` (..., k) becomes a new (..., len(shifts), k) tensor
    whose row i contains the fields that start at bit `shifts[i]`."""
    fields = packed.unsqueeze(-2) >> shifts.reshape(-1, 1)
    fields &= mask
    return fields


def _f16_field(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Read the float16 at byte `start` of every block as a float32 column (n_blocks, 1)."""
    # The clone starts at offset 0, which viewing two bytes as one float16 requires.
    field = blocks[:, start : start + 2].clone(memory_format=torch.contiguous_format)
    return field.view(torch.float16).to(torch.float32)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """Unpack the 32 fifth bits of Q5_0 and Q5_1 blocks, as 0 or 16, (n_blocks, 32).

    Bit j of the little-endian uint32 `qh` belongs to element j. It is read
    byte by byte, because the field is not 4-byte aligned.
    """
    bits = (qh.unsqueeze(-1) >> _BIT_SHIFTS) & 1
    bits <<= 4
    return bits.reshape(qh.shape[0], 32)


def _dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    # d: f16, qs: 16 bytes; element j < 16 is the low nibble of qs[j], j >= 16 the high one.
    n = blocks.shape[0]
    d = _f16_field(blocks, 0)
    q = _unpack(blocks[:, 2:18], _NIBBLE_SHIFTS, 0x0F).reshape(n, 32).view(torch.int8)
    q -= 8
    return q.to(torch.float32).mul_(d)


def _dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    # d: f16, m: f16, qs: 16 bytes of nibbles as in Q4_0.
    n = blocks.shape[0]
    d = _f16_field(blocks, 0)
    m = _f16_field(blocks, 2)
    q = _unpack(blocks[:, 4:20], _NIBBLE_SHIFTS, 0x0F).reshape(n, 32)
    return q.to(torch.float32).mul_(d).add_(m)


def _dequantize_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    # d: f16, qh: 4 bytes of fifth bits, qs: 16 bytes of nibbles as in Q4_0.
    n = blocks.shape[0]
    d = _f16_field(blocks, 0)
    q = _unpack(blocks[:, 6:22], _NIBBLE_SHIFTS, 0x0F).reshape(n, 32)
    q |= _fifth_bits(blocks[:, 2:6])
    q = q.view(torch.int8)
    q -= 16
    return q.to(torch.float32).mul_(d)


def _dequantize_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    # d: f16, m: f16, qh: 4 bytes of fifth bits, qs: 16 bytes of nibbles as in Q4_0.
    n = blocks.shape[0]
    d = _f16_field(blocks, 0)
    m = _f16_field(blocks, 2)
    q = _unpack(blocks[:, 8:24], _NIBBLE_SHIFTS, 0x0F).reshape(n, 32)
    q |= _fifth_bits(blocks[:, 4:8])
    return q.to(torch.float32).mul_(d).add_(m)


def _dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    # d: f16, qs: 32 int8.
    d = _f16_field(blocks, 0)
    return blocks[:, 2:34].view(torch.int8).to(torch.float32).mul_(d)


def _dequantize_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    # scales: 16 bytes (scale in the low nibble, min in the high one) of 16 sub-blocks
    # of 16, qs: 64 bytes of 2-bit values, d: f16, dmin: f16.
    n = blocks.shape[0]
    scales = blocks[:, 0:16]
    d = _f16_field(blocks, 80)
    dmin = _f16_field(blocks, 82)
    scale = (d * (scales & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    minimum = (dmin * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    q = _unpack(blocks[:, 16:80].reshape(n, 2, 32), _CRUMB_SHIFTS, 0x03).reshape(n, 16, 16)
    return q.to(torch.float32).mul_(scale).sub_(minimum).reshape(n, 256)


def _dequantize_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    # hmask: 32 bytes of third bits, qs: 64 bytes of 2-bit values, scales: 12 bytes of
    # 16 6-bit scales (low 4 bits in bytes 0-7, high 2 bits in bytes 8-11), d: f16.
    n = blocks.shape[0]
    d = _f16_field(blocks, 108)
    scales = _unpack(blocks[:, 96:104], _NIBBLE_SHIFTS, 0x0F).reshape(n, 16)
    scales_high = _unpack(blocks[:, 104:108], _CRUMB_SHIFTS, 0x03).reshape(n, 16)
    scales |= scales_high << 4
    scales = scales.view(torch.int8)
    scales -= 32
    scale = (d * scales.to(torch.float32)).reshape(n, 16, 1)

    q = _unpack(blocks[:, 32:96].reshape(n, 2, 32), _CRUMB_SHIFTS, 0x03).reshape(n, 16, 16)
    high = _unpack(blocks[:, 0:32], _BIT_SHIFTS, 0x01).reshape(n, 16, 16)
    # A set mask bit means no offset; a clear one subtracts 4.
    high ^= 1
    high <<= 2
    q = q.view(torch.int8)
    q -= high.view(torch.int8)
    return q.to(torch.float32).mul_(scale).reshape(n, 256)


def _k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the eight 6-bit scales and eight 6-bit mins of a Q4_K or Q5_K block.

    Bytes 0-3 contain scales 0-3 in their low 6 bits, and bytes 4-7 mins 0-3.
    Bytes 8-11 contain the low 4 bits of scales 4-7 (low nibble) and of mins
    4-7 (high nibble). The top 2 bits of those come from the top bits of bytes
    0-3 (scales) and 4-7 (mins).
    """
    first, second, third = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([first & 0x3F, (third & 0x0F) | ((first >> 2) & 0x30)], dim=1)
    mins = torch.cat([second & 0x3F, (third >> 4) | ((second >> 2) & 0x30)], dim=1)
    return scales, mins


def _k_scale_and_min(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the per-sub-block scale and min of Q4_K or Q5_K blocks, (n_blocks, 8, 1) each."""
    n = blocks.shape[0]
    d = _f16_field(blocks, 0)
    dmin = _f16_field(blocks, 2)
    scales, mins = _k_scales(blocks[:, 4:16])
    scale = (d * scales.to(torch.float32)).reshape(n, 8, 1)
    minimum = (dmin * mins.to(torch.float32)).reshape(n, 8, 1)
    return scale, minimum


def _dequantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # d: f16, dmin: f16, scales: 12 bytes, qs: 128 bytes; sub-blocks 2i and 2i+1 are
    # the low and high nibbles of qs[32i : 32i+32].
    n = blocks.shape[0]
    scale, minimum = _k_scale_and_min(blocks)
    q = _unpack(blocks[:, 16:144].reshape(n, 4, 32), _NIBBLE_SHIFTS, 0x0F).reshape(n, 8, 32)
    return q.to(torch.float32).mul_(scale).sub_(minimum).reshape(n, 256)


def _dequantize_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    # As Q4_K with qh: 32 bytes after the scales, bit i of qh[j] the fifth bit of
    # element j of sub-block i.
    n = blocks.shape[0]
    scale, minimum = _k_scale_and_min(blocks)
    q = _unpack(blocks[:, 48:176].reshape(n, 4, 32), _NIBBLE_SHIFTS, 0x0F).reshape(n, 8, 32)
    high = _unpack(blocks[:, 16:48], _BIT_SHIFTS, 0x01)
    high <<= 4
    q |= high
    return q.to(torch.float32).mul_(scale).sub_(minimum).reshape(n, 256)


def _dequantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # ql: 128 bytes of low nibbles, qh: 64 bytes of high 2-bit pairs, scales: 16 int8,
    # d: f16. Each half of the block (128 values) uses 64 bytes of ql and 32 of qh.
    n = blocks.shape[0]
    d = _f16_field(blocks, 208)
    scales = blocks[:, 192:208].view(torch.int8).to(torch.float32)
    scale = (d * scales).reshape(n, 16, 1)
    q = _unpack(blocks[:, 0:128].reshape(n, 2, 64), _NIBBLE_SHIFTS, 0x0F).reshape(n, 8, 32)
    high = _unpack(blocks[:, 128:192].reshape(n, 2, 32), _CRUMB_SHIFTS, 0x03).reshape(n, 8, 32)
    high <<= 4
    q |= high
    q = q.view(torch.int8)
    q -= 32
    return q.reshape(n, 16, 16).to(torch.float32).mul_(scale).reshape(n, 256)


# Each function maps packed blocks (n_blocks, type_size) to float32 (n_blocks, block_size).
_BLOCK_DEQUANTIZERS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.Q4_0: _dequantize_q4_0,
    Q.Q4_1: _dequantize_q4_1,
    Q.Q5_0: _dequantize_q5_0,
    Q.Q5_1: _dequantize_q5_1,
    Q.Q8_0: _dequantize_q8_0,
    Q.Q2_K: _dequantize_q2_k,
    Q.Q3_K: _dequantize_q3_k,
    Q.Q4_K: _dequantize_q4_k,
    Q.Q5_K: _dequantize_q5_k,
    Q.Q6_K: _dequantize_q6_k,
}
_FLOAT_TYPES: dict[GGMLQuantizationType, torch.dtype] = {
    Q.F32: torch.float32,
    Q.F16: torch.float16,
    Q.BF16: torch.bfloat16,
}
SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = (*_FLOAT_TYPES, *_BLOCK_DEQUANTIZERS)


def check_supported(qtype: GGMLQuantizationType) -> None:
    """Raise UnsupportedQuantTypeError unless `dequantize` handles `qtype`."""
    if qtype not in SUPPORTED_TYPES:
        supported = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise UnsupportedQuantTypeError(
            f"GGUF type {qtype.name} has no torch dequantizer; supported types are {supported}. "
            "Quantize the base to one of them, for example with llama-quantize to Q4_K_M"
        )


def packed_row_bytes(qtype: GGMLQuantizationType, cols: int) -> int:
    """Return the byte count of one packed row of `cols` values of type `qtype`."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if cols % block_size:
        raise QuantizedWeightError(
            f"a row of {cols} values cannot be stored as {qtype.name}, whose blocks contain "
            f"{block_size} values; the tensor's last GGUF dimension must be a multiple of it"
        )
    return cols // block_size * type_size


def dequantize(
    blocks: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, ...]
) -> torch.Tensor:
    """Dequantize the packed GGUF bytes of a tensor to float32 of the given shape.

    `blocks` is a uint8 tensor of any shape that contains exactly the tensor's
    bytes in file order, such as (rows, row_bytes). `shape` is the torch shape,
    the reverse of the GGUF dimensions: (out_features, in_features) for a
    linear weight. The result is a new tensor with the same bits as
    `gguf.quants.dequantize` returns, and `blocks` is never written.
    """
    check_supported(qtype)
    if blocks.dtype != torch.uint8:
        raise QuantizedWeightError(f"packed GGUF data must be uint8, got {blocks.dtype}")
    cols = shape[-1] if shape else 1
    expected = math.prod(shape[:-1]) * packed_row_bytes(qtype, cols)
    if blocks.numel() != expected:
        raise QuantizedWeightError(
            f"{qtype.name} data of shape {tuple(shape)} takes {expected} bytes, but the "
            f"packed tensor has {blocks.numel()}; pass the shape in torch order (rows, cols), "
            "the reverse of the GGUF dimensions"
        )

    if qtype in _FLOAT_TYPES:
        return _dequantize_float(blocks, _FLOAT_TYPES[qtype]).reshape(shape)
    _, type_size = GGML_QUANT_SIZES[qtype]
    values = _BLOCK_DEQUANTIZERS[qtype](blocks.reshape(-1, type_size))
    return values.reshape(shape)


def _dequantize_float(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    flat = blocks.reshape(-1)
    if flat.storage_offset() % dtype.itemsize:
        flat = flat.clone()  # viewing bytes as a wider type needs an aligned start
    # The copy keeps the result writable even when `blocks` maps a read-only file.
    return flat.view(dtype).to(torch.float32, copy=True)


# The packed weight


class QuantizedWeight:
    """A 2-D GGUF weight kept packed: `data` is uint8 (rows, row_bytes) in file order.

    `shape` is the torch shape (rows, cols), so (out_features, in_features) for
    a linear weight and (vocabulary, hidden) for an embedding. `data` may be a
    read-only view of a memory-mapped file; nothing here writes to it.
    """

    def __init__(self, data: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, int]):
        check_supported(qtype)
        if len(shape) != 2:
            raise QuantizedWeightError(
                f"a quantized weight is 2-D (rows, cols), got shape {tuple(shape)}"
            )
        rows, cols = (int(size) for size in shape)
        row_bytes = packed_row_bytes(qtype, cols)
        if data.dtype != torch.uint8 or tuple(data.shape) != (rows, row_bytes):
            raise QuantizedWeightError(
                f"packed {qtype.name} weight of shape ({rows}, {cols}) must be uint8 of shape "
                f"({rows}, {row_bytes}), got {data.dtype} of shape {tuple(data.shape)}"
            )
        self.data = data
        self.qtype = qtype
        self.shape = (rows, cols)

    @classmethod
    def from_reader_tensor(cls, tensor: ReaderTensor) -> QuantizedWeight:
        """Wrap a 2-D `gguf.ReaderTensor` without copying: `data` views the reader's
        memory map, which stays open as long as this weight."""
        dims = [int(size) for size in tensor.shape]
        if len(dims) != 2:
            raise QuantizedWeightError(
                f"GGUF tensor '{tensor.name}' has dimensions {dims}; only 2-D tensors can be "
                "a quantized weight"
            )
        qtype = GGMLQuantizationType(tensor.tensor_type)
        check_supported(qtype)
        array = tensor.data
        if not array.dtype.isnative:
            raise QuantizedWeightError(
                f"GGUF tensor '{tensor.name}' is stored in {array.dtype.byteorder} byte order; "
                "convert the file to this machine's byte order first"
            )
        rows, cols = dims[1], dims[0]
        packed = array.view(np.uint8).reshape(rows, -1)
        with warnings.catch_warnings():
            # The reader maps the file read-only; torch warns because it cannot mark the
            # tensor read-only, and this class never writes to it.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            data = torch.from_numpy(packed)
        return cls(data, qtype, (rows, cols))

    @property
    def nbytes(self) -> int:
        """Bytes of the packed data."""
        return self.data.numel()

    @property
    def row_bytes(self) -> int:
        return self.data.shape[1]

    def dequantize(
        self, dtype: torch.dtype = torch.float32, rows: slice | None = None
    ) -> torch.Tensor:
        """Dequantize the weight, or the rows `rows` selects, to a new tensor of `dtype`.

        Other dtypes are rounded from the float32 result, so they equal
        `dequantize().to(dtype)` on the same rows.
        """
        data = self.data if rows is None else self.data[rows]
        values = dequantize(data, self.qtype, (data.shape[0], self.shape[1]))
        return values.to(dtype)

    def gather(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize only the rows `ids` names: an embedding lookup, shape (*ids.shape, cols)."""
        flat = ids.reshape(-1).to(torch.long)
        values = dequantize(
            self.data.index_select(0, flat), self.qtype, (flat.numel(), self.shape[1])
        )
        return values.to(dtype).reshape(*ids.shape, self.shape[1])

    def permute_rows(self, order: torch.Tensor | Sequence[int] | np.ndarray) -> QuantizedWeight:
        """Return a copy whose row i is row `order[i]` of this weight.

        llama.cpp's converter interleaves the rotary halves of the query and
        key rows of llama models; `lora.names.unpermute_rows(np.arange(rows),
        heads)` is the order that restores the transformers layout.
        """
        index = torch.as_tensor(np.asarray(order), dtype=torch.long).reshape(-1)
        rows = self.shape[0]
        if not torch.equal(index.sort().values, torch.arange(rows)):
            raise QuantizedWeightError(
                f"row order of length {index.numel()} is not a permutation of the {rows} rows "
                "of this weight"
            )
        return QuantizedWeight(self.data.index_select(0, index), self.qtype, self.shape)

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.qtype.name}, shape={self.shape}, nbytes={self.nbytes})"


# Modules


def _checked_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in COMPUTE_DTYPES:
        raise QuantizedWeightError(
            f"compute dtype {dtype} is not supported; use torch.float32 or torch.bfloat16"
        )
    return dtype


class _QuantLinearFunction(torch.autograd.Function):
    """x @ W.T where W is dequantized in forward and again in backward, never saved."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: QuantizedWeight, dtype: torch.dtype
    ) -> torch.Tensor:
        ctx.weight = weight
        ctx.dtype = dtype
        return torch.nn.functional.linear(x, weight.dequantize(dtype))

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        weight = ctx.weight.dequantize(ctx.dtype)
        return grad_output.matmul(weight), None, None


class QuantLinear(torch.nn.Module):
    """A frozen linear layer whose weight stays packed and is dequantized on each use.

    The module has no parameters. The input is cast to `compute_dtype`, and
    the output is in `compute_dtype`. The backward pass computes the gradient
    of the input only, dequantizing the weight again instead of keeping it
    from the forward pass.

    NOTE: `Module.to()` moves and casts the bias but not the packed weight, which
    stays where it was loaded (the CPU for a GGUF file). Set `compute_dtype` to
    change the dtype.
    """

    bias: torch.Tensor | None

    def __init__(
        self,
        weight: QuantizedWeight,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise QuantizedWeightError(
                f"bias of shape {tuple(bias.shape)} does not match {self.out_features} "
                "output features"
            )
        # Not persistent: like the weight, the bias belongs to the base and is not saved.
        self.register_buffer(
            "bias", None if bias is None else bias.detach().to(torch.float32), persistent=False
        )
        self.compute_dtype = compute_dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._compute_dtype

    @compute_dtype.setter
    def compute_dtype(self, dtype: torch.dtype) -> None:
        self._compute_dtype = _checked_compute_dtype(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        out = _QuantLinearFunction.apply(x.to(dtype), self.weight, dtype)
        if self.bias is not None:
            out = out + self.bias.to(dtype)
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"qtype={self.weight.qtype.name}, bias={self.bias is not None}, "
            f"compute_dtype={self.compute_dtype}"
        )


class QuantEmbedding(torch.nn.Module):
    """A frozen embedding whose table stays packed; a lookup dequantizes only its rows.

    With `scale`, the rows are multiplied by it the way transformers'
    Gemma3TextScaledWordEmbedding (transformers 5.25) does: a float32 scalar
    cast to the compute dtype, then one multiplication in that dtype.
    """

    scale: torch.Tensor | None

    def __init__(
        self,
        weight: QuantizedWeight,
        scale: float | None = None,
        compute_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.weight = weight
        self.num_embeddings, self.embedding_dim = weight.shape
        self.register_buffer(
            "scale",
            None if scale is None else torch.tensor(scale, dtype=torch.float32),
            persistent=False,
        )
        self.compute_dtype = compute_dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._compute_dtype

    @compute_dtype.setter
    def compute_dtype(self, dtype: torch.dtype) -> None:
        self._compute_dtype = _checked_compute_dtype(dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight.gather(ids, self.compute_dtype)
        if self.scale is None:
            return rows
        return rows * self.scale.to(self.compute_dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.weight.qtype.name}, "
            f"scale={None if self.scale is None else float(self.scale)}, "
            f"compute_dtype={self.compute_dtype}"
        )
