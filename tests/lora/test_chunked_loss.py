"""Tests of chunked_cross_entropy and peak_extra_bytes.

Loss and gradient are compared with F.cross_entropy on full logits, with ignored
rows, soft-capping and both reductions. A weight source must be read one chunk at
a time, no tensor may be as large as the full logits, and the memory
estimate must match the heap measured through glibc.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode

from lora.chunked_loss import IGNORE_INDEX, chunked_cross_entropy, peak_extra_bytes

SEED = 0
# fp32 compute reorders the sums of the reference (online logsumexp, chunked
# gradient), which moves the result by a few float32 ulps.
FP32_TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
# bf16 rounds each logit and weight to an 8-bit significand (relative error up to
# 2**-9). On the bf16 cases below, the loss moved by at most 1.1e-4 relative because
# the rounding errors average out over the vocabulary. A gradient entry moved by at
# most 1.1% of the largest entry because the softmax term and the target row nearly
# cancel. The bounds are about 10x and 3x those errors.
BF16_LOSS_RTOL = 1e-3
BF16_GRAD_FRACTION = 3e-2


def make_case(
    rows: int, hidden: int, vocab: int, *, ignore_every: int | None = None, seed: int = SEED
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return hidden states, weight and labels whose logits have a standard deviation near 4."""
    generator = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(rows, hidden, generator=generator)
    weight = torch.randn(vocab, hidden, generator=generator) * (4 / math.sqrt(hidden))
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    if ignore_every is not None:
        labels[::ignore_every] = IGNORE_INDEX
    return hidden_states, weight, labels


def reference_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    softcap: float | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    logits = hidden @ weight.T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction=reduction)


def loss_and_grad(
    loss_fn: Any, hidden: torch.Tensor, grad_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return loss_fn(h) and the gradient of grad_scale * loss_fn(h) for a leaf h = hidden."""
    leaf = hidden.detach().clone().requires_grad_()
    loss = loss_fn(leaf)
    (loss * grad_scale).backward()
    assert leaf.grad is not None
    return loss.detach(), leaf.grad


class FakeQuantizedWeight:
    """An int8 weight with one scale per row, like GGUF Q8_0, that counts its reads."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.scales = weight.abs().amax(dim=1, keepdim=True) / 127
        self.codes = torch.round(weight / self.scales).to(torch.int8)
        self.shape = tuple(weight.shape)
        self.reads: list[tuple[slice | None, torch.dtype]] = []

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice | None = None):
        self.reads.append((rows, dtype))
        selected = slice(None) if rows is None else rows
        return (self.codes[selected].to(torch.float32) * self.scales[selected]).to(dtype)

    def full(self) -> torch.Tensor:
        return self.codes.to(torch.float32) * self.scales


class LargestTensorMode(TorchDispatchMode):
    """A dispatch mode that records the largest numel of any tensor an operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in _tensors_in(output):
            self.largest_numel = max(self.largest_numel, tensor.numel())
        return output


def _tensors_in(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, tuple | list):
        return [item for item in output if isinstance(item, torch.Tensor)]
    return []


def record_largest_tensor(loss_fn: Any, hidden: torch.Tensor) -> tuple[int, int]:
    """Run forward and backward of loss_fn(hidden).

    Returns the numel of the largest tensor any operator produced and the total
    numel that autograd saved for backward.
    """
    saved_numels: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved_numels.append(tensor.numel())
        return tensor

    leaf = hidden.detach().clone().requires_grad_()
    with LargestTensorMode() as mode, saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn(leaf).backward()
    return mode.largest_numel, sum(saved_numels)


CASES = [
    # (id, vocab, chunk_size, ignore_every, softcap, reduction, grad_scale)
    ("single chunk", 300, 8192, None, None, "mean", 1.0),
    ("vocab not a multiple of chunk", 1000, 128, None, None, "mean", 1.0),
    ("chunk of 7 rows", 50, 7, None, None, "mean", 1.0),
    ("ignored rows", 1000, 128, 3, None, "mean", 1.0),
    ("ignored rows, sum", 1000, 128, 3, None, "sum", 1.0),
    ("softcap", 1000, 128, None, 5.0, "mean", 1.0),
    ("softcap, ignored rows, sum", 1000, 128, 4, 5.0, "sum", 1.0),
    ("loss times 3", 1000, 128, 3, None, "mean", 3.0),
    ("softcap, loss times 3", 1000, 128, 3, 5.0, "sum", 3.0),
]


@pytest.mark.parametrize(
    "vocab, chunk_size, ignore_every, softcap, reduction, grad_scale",
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_fp32_matches_full_logits(vocab, chunk_size, ignore_every, softcap, reduction, grad_scale):
    hidden, weight, labels = make_case(37, 24, vocab, ignore_every=ignore_every)

    loss, grad = loss_and_grad(
        lambda h: chunked_cross_entropy(
            h, weight, labels, chunk_size=chunk_size, softcap=softcap, reduction=reduction
        ),
        hidden,
        grad_scale,
    )
    expected_loss, expected_grad = loss_and_grad(
        lambda h: reference_loss(h, weight, labels, softcap, reduction), hidden, grad_scale
    )

    torch.testing.assert_close(loss, expected_loss, **FP32_TOLERANCE)
    torch.testing.assert_close(grad, expected_grad, **FP32_TOLERANCE)
    assert torch.all(grad[labels == IGNORE_INDEX] == 0)


@pytest.mark.parametrize("softcap", [None, 5.0], ids=["no softcap", "softcap"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bf16_compute_close_to_fp32(softcap, reduction):
    hidden, weight, labels = make_case(64, 48, 3000, ignore_every=5)

    loss, grad = loss_and_grad(
        lambda h: chunked_cross_entropy(
            h,
            weight,
            labels,
            chunk_size=512,
            compute_dtype=torch.bfloat16,
            softcap=softcap,
            reduction=reduction,
        ),
        hidden,
    )
    expected_loss, expected_grad = loss_and_grad(
        lambda h: reference_loss(h, weight, labels, softcap, reduction), hidden
    )

    assert loss.dtype == torch.float32
    assert grad.dtype == torch.float32
    torch.testing.assert_close(loss, expected_loss, rtol=BF16_LOSS_RTOL, atol=0)
    grad_bound = BF16_GRAD_FRACTION * expected_grad.abs().max().item()
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=grad_bound)


def test_bf16_hidden_gets_bf16_gradient():
    hidden, weight, labels = make_case(16, 32, 500)

    _, grad = loss_and_grad(
        lambda h: chunked_cross_entropy(h, weight.to(torch.bfloat16), labels, chunk_size=128),
        hidden.to(torch.bfloat16),
    )

    assert grad.dtype == torch.bfloat16


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_ignored_returns_zero(reduction):
    hidden, weight, _ = make_case(10, 16, 200)
    labels = torch.full((10,), IGNORE_INDEX)

    loss, grad = loss_and_grad(
        lambda h: chunked_cross_entropy(h, weight, labels, chunk_size=64, reduction=reduction),
        hidden,
    )

    assert loss.item() == 0.0
    assert torch.all(grad == 0)


def test_no_grad_forward_matches_reference():
    hidden, weight, labels = make_case(20, 16, 700, ignore_every=4)

    with torch.no_grad():
        loss = chunked_cross_entropy(hidden.requires_grad_(), weight, labels, chunk_size=100)

    torch.testing.assert_close(loss, reference_loss(hidden, weight, labels), **FP32_TOLERANCE)


def test_softcap_gradient_passes_gradcheck():
    hidden, weight, labels = make_case(6, 5, 23, ignore_every=4)
    hidden = hidden.double().requires_grad_()

    assert torch.autograd.gradcheck(
        lambda h: chunked_cross_entropy(h, weight.double(), labels, chunk_size=4, softcap=2.0),
        (hidden,),
    )


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_weight_source_matches_dense(compute_dtype):
    hidden, weight, labels = make_case(40, 32, 1000, ignore_every=6)
    source = FakeQuantizedWeight(weight)

    def loss_with(weight: Any) -> Any:
        return lambda h: chunked_cross_entropy(
            h, weight, labels, chunk_size=256, compute_dtype=compute_dtype, softcap=5.0
        )

    loss, grad = loss_and_grad(loss_with(source), hidden)
    dense_loss, dense_grad = loss_and_grad(loss_with(source.full()), hidden)

    torch.testing.assert_close(loss, dense_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, dense_grad, rtol=0, atol=0)


def test_weight_source_read_once_per_chunk():
    hidden, weight, labels = make_case(40, 32, 1000)
    source = FakeQuantizedWeight(weight)

    loss_and_grad(
        lambda h: chunked_cross_entropy(
            h, source, labels, chunk_size=256, compute_dtype=torch.bfloat16
        ),
        hidden,
    )

    expected = [slice(start, min(start + 256, 1000)) for start in range(0, 1000, 256)]
    assert [rows for rows, _ in source.reads] == expected
    assert {dtype for _, dtype in source.reads} == {torch.bfloat16}


def test_weight_source_wrong_rows_rejected():
    hidden, weight, labels = make_case(8, 16, 100)

    class ShortRows(FakeQuantizedWeight):
        def dequantize(self, dtype=torch.float32, rows=None):
            return super().dequantize(dtype, rows)[:-1]

    with pytest.raises(ValueError, match="must return exactly the requested rows"):
        chunked_cross_entropy(hidden.requires_grad_(), ShortRows(weight), labels, chunk_size=32)


def test_no_vocabulary_sized_tensor():
    rows, vocab, chunk_size = 512, 65536, 4096
    hidden, weight, labels = make_case(rows, 64, vocab, ignore_every=7)

    largest, saved = record_largest_tensor(
        lambda h: chunked_cross_entropy(h, weight, labels, chunk_size=chunk_size), hidden
    )

    assert largest <= rows * chunk_size  # the naive loss reaches rows * vocab = 16x this
    assert saved == rows * 64  # only grad_hidden is kept for backward


def test_largest_tensor_probe_catches_full_logits():
    rows, vocab = 512, 65536
    hidden, weight, labels = make_case(rows, 64, vocab)

    largest, saved = record_largest_tensor(lambda h: reference_loss(h, weight, labels), hidden)

    assert largest >= rows * vocab
    assert saved >= rows * vocab


def _glibc_heap_in_use() -> Any:
    """Return a function that reads the bytes allocated by glibc's malloc, or None off glibc."""

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = MallInfo2

    def in_use() -> int:
        info = libc.mallinfo2()
        return int(info.uordblks + info.hblkhd)  # small blocks + mmap'ed blocks

    return in_use


class PeakHeapMode(TorchDispatchMode):
    """A dispatch mode that records the peak heap in use after any operator.

    The peak is relative to the heap when the first operator starts.
    """

    def __init__(self, in_use: Any) -> None:
        super().__init__()
        self.in_use = in_use
        self.start: int | None = None
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.start is None:
            self.start = self.in_use()
        output = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.in_use() - self.start)
        return output


@pytest.mark.parametrize(
    "weight_dtype, compute_dtype, softcap",
    [
        pytest.param(torch.float32, torch.bfloat16, None, id="bf16 compute"),
        pytest.param(torch.float32, torch.bfloat16, 30.0, id="bf16 compute, softcap"),
        pytest.param(torch.bfloat16, torch.float32, None, id="fp32 compute"),
    ],
)
def test_peak_extra_bytes_matches_heap(weight_dtype, compute_dtype, softcap):
    in_use = _glibc_heap_in_use()
    if in_use is None:
        pytest.skip("needs glibc's mallinfo2 to read the heap")
    rows, hidden_size, vocab, chunk_size = 256, 128, 16384, 4096
    hidden, weight, labels = make_case(rows, hidden_size, vocab)
    # The weight is stored in the other dtype, so that each chunk is copied as with
    # a quantized source.
    weight = weight.to(weight_dtype)

    def run(mode: PeakHeapMode | None = None) -> None:
        leaf = hidden.detach().clone().requires_grad_()
        with mode or contextlib.nullcontext():
            loss = chunked_cross_entropy(
                leaf,
                weight,
                labels,
                chunk_size=chunk_size,
                compute_dtype=compute_dtype,
                softcap=softcap,
            )
            loss.backward()

    run()  # the first matrix products allocate the BLAS library's buffers, which it keeps
    mode = PeakHeapMode(in_use)
    run(mode)

    estimate = peak_extra_bytes(
        rows, hidden_size, vocab, chunk_size, compute_dtype, softcap=softcap is not None
    )
    assert mode.peak <= estimate
    assert mode.peak >= 0.9 * estimate


@pytest.mark.parametrize(
    "change, message",
    [
        ({"labels": torch.tensor([0, 5000, 1, 2])}, "label 5000 is outside the vocabulary"),
        ({"labels": torch.tensor([0, -1, 1, 2])}, "label -1 is outside the vocabulary"),
        ({"labels": torch.tensor([0, 1, 2])}, "labels must have shape"),
        ({"labels": torch.tensor([0, 1, 2, 3], dtype=torch.int32)}, "labels must be int64"),
        ({"hidden": torch.zeros(4, 9)}, "weight must be \\(vocabulary, 9\\)"),
        ({"hidden": torch.zeros(1, 4, 16)}, "hidden must be \\(rows, hidden size\\)"),
        ({"weight": torch.zeros(100, 16, requires_grad=True)}, "weight requires grad"),
        ({"chunk_size": 0}, "chunk_size must be at least 1"),
        ({"softcap": 0.0}, "softcap must be positive"),
        ({"reduction": "none"}, "reduction must be 'mean' or 'sum'"),
        ({"compute_dtype": torch.int32}, "compute_dtype must be a floating-point dtype"),
    ],
)
def test_invalid_arguments_rejected(change, message):
    arguments: dict[str, Any] = {
        "hidden": torch.zeros(4, 16),
        "weight": torch.zeros(100, 16),
        "labels": torch.tensor([0, 1, 2, IGNORE_INDEX]),
    }
    arguments.update(change)
    hidden = arguments.pop("hidden")
    weight = arguments.pop("weight")
    labels = arguments.pop("labels")

    with pytest.raises(ValueError, match=message):
        chunked_cross_entropy(hidden, weight, labels, **arguments)
