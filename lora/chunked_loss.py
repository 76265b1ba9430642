"""Output projection fused with cross-entropy, without the full logits tensor.

Gemma 3 270M has a vocabulary of 262,144 and a hidden size of 640. For a
batch of 2 x 256 tokens its logits in float32 take 537 MB, and the loss with
its gradient copies about 1.5 GB. `chunked_cross_entropy` takes the final
hidden states and the frozen output weight (the tied embedding) instead of
the logits. It walks the vocabulary in chunks of `chunk_size` rows, so the
largest temporary is a few `n_rows x chunk_size` tensors. This is the idea
behind Cut Cross-Entropy and Liger Kernel's fused linear cross-entropy,
written in plain torch for the CPU.

The gradient with respect to the hidden states is computed during the
forward pass, in the same single walk over the vocabulary, and saved as the
only tensor for backward. For a row with hidden state h, capped logits c,
derivative c' of the soft-cap and target y:

    loss = logsumexp(c) - c[y]
    d loss / d h = sum_j softmax(c)[j] * c'[j] * W[j] - c'[y] * W[y]

The softmax needs the final logsumexp, which is known only after the last
chunk. The walk keeps, per row, a running max m, a running sum
s = sum_j exp(c[j] - m) and an accumulator A = sum_j exp(c[j] - m) c'[j] W[j].
When a chunk raises m, both s and A are multiplied by exp(m_old - m_new),
so every exponent stays <= 0. At the end the first term is A / s, which is
how flash attention accumulates its output. Each chunk therefore costs two
matrix products (one when no gradient is needed) and one read, or
dequantization, of its weight rows.

Why one walk: the alternatives walk the vocabulary twice, once for the
logsumexp and once for the gradient, either both in forward or the second
in backward. They do three matrix products per chunk instead of two and
read every weight chunk twice. Measured as CPU seconds (process time) for
forward and backward, single-threaded, 512 rows, hidden 640, vocabulary
65,536, chunk 8192, fp32 weight, the three designs run in turn and the
fastest of 5 runs kept, on a 2-core AMD EPYC with AVX-512 and avx512_bf16,
torch 2.13 (CPU build), while another benchmark loaded the machine:

    design                             fp32     bf16 compute
    one walk, online gradient (here)   0.92 s   0.26 s
    two walks in forward               1.44 s   0.46 s
    logsumexp, recompute in backward   1.39 s   0.43 s

Chunk size, on the same setup (fastest of 3): 2048 to 8192 rows per chunk
take the same time (fp32 0.88 to 0.90 s, bf16 0.25 to 0.27 s), while 16384
and 32768 are slower (fp32 0.99 s, bf16 0.35 and 0.48 s). The default of
8192 keeps one chunk's logits for 512 rows at 16 MiB in fp32.

Memory at Gemma 3 270M's full size (512 rows, vocabulary 262,144, chunk
8192), forward and backward run once in a fresh process, peak RSS above the
inputs: F.cross_entropy on full fp32 logits 1,546 MiB; this module 53 MiB
in fp32 and 67 MiB with bf16 compute (`peak_extra_bytes`: 42 and 39 MiB, the
rest is BLAS buffers and freed memory that the allocator keeps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

IGNORE_INDEX = -100


class WeightSource(Protocol):
    """An output weight of shape (vocabulary, hidden) that is read in row blocks.

    `lora.quantized.QuantizedWeight` implements it for a GGUF tensor, so the
    full weight is never dequantized at once.
    """

    @property
    def shape(self) -> tuple[int, ...]: ...

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice | None = None) -> Tensor:
        """Return the rows `rows` (all rows when None) as a dense (rows, hidden) tensor."""
        ...


class DenseWeight:
    """A dense (vocabulary, hidden) tensor as a `WeightSource`."""

    def __init__(self, weight: Tensor) -> None:
        self.weight = weight

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice | None = None) -> Tensor:
        block = self.weight if rows is None else self.weight[rows]
        return block.to(dtype)


def chunked_cross_entropy(
    hidden: Tensor,
    weight: Tensor | WeightSource,
    labels: Tensor,
    *,
    chunk_size: int = 8192,
    compute_dtype: torch.dtype | None = None,
    softcap: float | None = None,
    reduction: Literal["mean", "sum"] = "mean",
) -> Tensor:
    """Compute the cross-entropy of `hidden @ weight.T` against `labels`, chunk by chunk.

    Equal to `F.cross_entropy(logits, labels, ignore_index=-100, reduction=reduction)`
    with `logits = hidden @ weight.T`, soft-capped as
    `softcap * tanh(logits / softcap)` when `softcap` is set (Gemma 2 style).

    hidden: (N, H) final normed hidden states, already shifted so that
        `hidden[i]` predicts `labels[i]`. Only `hidden` receives a gradient.
    weight: the frozen (V, H) output weight, as a tensor that does not require
        grad or as a `WeightSource`, which is asked for one chunk of rows at a
        time.
    labels: (N,) int64 token ids in [0, V), or -100 for rows that take no part.
    chunk_size: vocabulary rows per chunk. Peak extra memory grows linearly
        with it (see `peak_extra_bytes`).
    compute_dtype: dtype of the two matrix products per chunk; None means the
        dtype of `hidden`. The logsumexp statistics, the loss and the gradient
        accumulate in float32 (float64 when `compute_dtype` is float64).
    reduction: "mean" over the rows whose label is not -100, or "sum".

    Returns a scalar in the accumulation dtype. When every label is -100 the
    loss is 0 and the gradient is zero (`F.cross_entropy` returns NaN for
    "mean" there).
    """
    source = _as_weight_source(weight)
    _validate(hidden, source, labels, chunk_size, softcap, reduction)
    if compute_dtype is None:
        compute_dtype = hidden.dtype
    if not compute_dtype.is_floating_point:
        raise ValueError(f"compute_dtype must be a floating-point dtype, got {compute_dtype}")

    loss: Tensor = _ChunkedCrossEntropy.apply(
        hidden, labels, source, chunk_size, compute_dtype, softcap, reduction
    )
    return loss


def peak_extra_bytes(
    n_rows: int,
    hidden: int,
    vocab: int,
    chunk_size: int,
    dtype: torch.dtype,
    *,
    softcap: bool = False,
) -> int:
    """Estimate the peak bytes that one `chunked_cross_entropy` call allocates beyond its inputs.

    n_rows is the number of rows (N), hidden the hidden size, vocab the
    vocabulary size and dtype the compute dtype. The count covers forward and
    backward: the gradient saved for backward, which lives until backward runs,
    plus the working tensors of one chunk. It is an upper bound in two ways.
    Every row is counted, though rows labelled -100 are dropped before the
    walk. A weight chunk in the compute dtype is counted, though a dense
    weight that is already in that dtype is sliced without a copy.

    Not counted: scratch memory that a `WeightSource` allocates inside
    `dequantize` beyond the rows it returns, and the BLAS library's own
    buffers. Those are allocated by the first matrix product and kept by the
    process; with torch 2.13 (CPU build) on x86-64 they measured about
    5 MiB in fp32 and 0.6 MiB in bf16.
    """
    compute_bytes = _dtype_bytes(dtype)
    accumulate_bytes = _dtype_bytes(_accumulation_dtype(dtype))
    chunk = min(chunk_size, vocab)

    # Per (row, hidden) element: the saved gradient, the accumulators A and
    # c'[y] W[y], the hidden copy and the output of the second product.
    row_bytes = n_rows * hidden * (3 * accumulate_bytes + 2 * compute_bytes)
    # About a dozen (rows,) vectors (running max, sum, target logit, indexes),
    # plus 64 KiB for masks, index lists and scalars.
    small_bytes = n_rows * 16 * 8 + 64 * 1024
    weight_chunk_bytes = chunk * hidden * compute_bytes
    # Per (row, chunk) element: the logits in the accumulation dtype, the tanh
    # kept for the soft-cap's derivative, and a compute-dtype copy when the
    # dtypes differ (the first product's output, then the softmax cast for the
    # second product).
    logit_copies = 2 if softcap else 1
    cast_bytes = compute_bytes if compute_bytes != accumulate_bytes else 0
    logits_bytes = n_rows * chunk * (logit_copies * accumulate_bytes + cast_bytes)

    return row_bytes + small_bytes + weight_chunk_bytes + logits_bytes


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _accumulation_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(compute_dtype, torch.float32)


def _as_weight_source(weight: Tensor | WeightSource) -> WeightSource:
    if not isinstance(weight, Tensor):
        return weight
    if weight.requires_grad:
        raise ValueError(
            "weight requires grad, but chunked_cross_entropy computes no gradient for the "
            "output weight; pass weight.detach() if it is frozen, or use F.cross_entropy on "
            "full logits to train it"
        )
    return DenseWeight(weight)


def _validate(
    hidden: Tensor,
    source: WeightSource,
    labels: Tensor,
    chunk_size: int,
    softcap: float | None,
    reduction: str,
) -> None:
    if hidden.dim() != 2:
        raise ValueError(
            f"hidden must be (rows, hidden size), got shape {tuple(hidden.shape)}; "
            "flatten batch and sequence with hidden.reshape(-1, hidden.shape[-1])"
        )
    if labels.shape != (hidden.shape[0],):
        raise ValueError(
            f"labels must have shape ({hidden.shape[0]},) to match hidden, "
            f"got {tuple(labels.shape)}"
        )
    if labels.dtype != torch.long:
        raise ValueError(f"labels must be int64 (torch.long), got {labels.dtype}")
    if len(source.shape) != 2 or source.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be (vocabulary, {hidden.shape[1]}) to match hidden, "
            f"got shape {tuple(source.shape)}"
        )
    vocab = source.shape[0]
    out_of_range = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
    if bool(out_of_range.any()):
        bad = int(labels[out_of_range][0])
        raise ValueError(
            f"label {bad} is outside the vocabulary [0, {vocab}); use {IGNORE_INDEX} "
            "for rows that take no part in the loss"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive or None, got {softcap}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


@dataclass
class _Walk:
    """Per-row state of the walk over the vocabulary, for the n kept rows."""

    running_max: Tensor  # (n,) m
    running_sum: Tensor  # (n,) s = sum_j exp(c[j] - m)
    target_logit: Tensor  # (n,) c[y]
    softmax_rows: Tensor | None  # (n, H) A = sum_j exp(c[j] - m) c'[j] W[j]
    target_rows: Tensor | None  # (n, H) c'[y] W[y]


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        labels: Tensor,
        source: WeightSource,
        chunk_size: int,
        compute_dtype: torch.dtype,
        softcap: float | None,
        reduction: str,
    ) -> Tensor:
        accumulate_dtype = _accumulation_dtype(compute_dtype)
        with_grad = bool(ctx.needs_input_grad[0])
        kept = (labels != IGNORE_INDEX).nonzero().squeeze(1)

        losses = hidden.new_zeros((0,), dtype=accumulate_dtype)
        grad_hidden = torch.zeros(
            hidden.shape if with_grad else (0,), dtype=accumulate_dtype, device=hidden.device
        )
        if kept.numel() > 0:
            walk = _walk_vocabulary(
                hidden[kept].to(compute_dtype),
                labels[kept],
                source,
                chunk_size,
                accumulate_dtype,
                softcap,
                with_grad,
            )
            losses = walk.running_max + walk.running_sum.log() - walk.target_logit
            if walk.softmax_rows is not None and walk.target_rows is not None:
                row_grads = walk.softmax_rows.div_(walk.running_sum[:, None])
                grad_hidden.index_copy_(0, kept, row_grads.sub_(walk.target_rows))

        # The mean is over the kept rows; with none kept, loss and gradient stay 0.
        scale = 1.0 / kept.numel() if reduction == "mean" and kept.numel() > 0 else 1.0
        grad_hidden.mul_(scale)
        ctx.save_for_backward(grad_hidden)
        ctx.hidden_dtype = hidden.dtype
        return losses.sum() * scale

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (grad_hidden,) = ctx.saved_tensors
        grad = (grad_hidden * grad_output).to(ctx.hidden_dtype)
        return grad, None, None, None, None, None, None


def _walk_vocabulary(
    hidden: Tensor,
    targets: Tensor,
    source: WeightSource,
    chunk_size: int,
    accumulate_dtype: torch.dtype,
    softcap: float | None,
    with_grad: bool,
) -> _Walk:
    """Walk the vocabulary once for the kept rows and return the final per-row state."""
    rows, hidden_size = hidden.shape
    vocab = source.shape[0]
    like: dict[str, Any] = {"dtype": accumulate_dtype, "device": hidden.device}
    walk = _Walk(
        running_max=torch.full((rows,), -torch.inf, **like),
        running_sum=torch.zeros(rows, **like),
        target_logit=torch.zeros(rows, **like),
        softmax_rows=torch.zeros(rows, hidden_size, **like) if with_grad else None,
        target_rows=torch.zeros(rows, hidden_size, **like) if with_grad else None,
    )
    for start in range(0, vocab, chunk_size):
        end = min(start + chunk_size, vocab)
        # Passed without a local name, so that each chunk is freed before the next is read.
        _add_chunk(
            walk,
            hidden,
            targets,
            _read_chunk(source, start, end, hidden.dtype, hidden_size),
            start,
            accumulate_dtype,
            softcap,
        )
    return walk


def _read_chunk(
    source: WeightSource, start: int, end: int, dtype: torch.dtype, hidden_size: int
) -> Tensor:
    chunk_weight = source.dequantize(dtype=dtype, rows=slice(start, end))
    if tuple(chunk_weight.shape) != (end - start, hidden_size):
        raise ValueError(
            f"weight source returned shape {tuple(chunk_weight.shape)} for rows "
            f"{start}:{end}, expected ({end - start}, {hidden_size}); its dequantize "
            "must return exactly the requested rows"
        )
    return chunk_weight.to(dtype)


def _add_chunk(
    walk: _Walk,
    hidden: Tensor,
    targets: Tensor,
    chunk_weight: Tensor,
    start: int,
    accumulate_dtype: torch.dtype,
    softcap: float | None,
) -> None:
    """Fold the vocabulary rows start.. (chunk_weight) into the walk's state, in place."""
    logits = (hidden @ chunk_weight.T).to(accumulate_dtype)  # (n, chunk)
    tanh = None
    if softcap is not None:
        tanh = logits.div_(softcap).tanh_()
        logits = tanh * softcap

    # Rows whose target lies in this chunk; every row's target lies in exactly one.
    hits = ((targets >= start) & (targets < start + chunk_weight.shape[0])).nonzero().squeeze(1)
    columns = targets[hits] - start
    walk.target_logit[hits] = logits[hits, columns]

    # Online logsumexp: rescale the old sum to the new max before adding this chunk.
    new_max = torch.maximum(walk.running_max, logits.amax(dim=1))
    rescale = (walk.running_max - new_max).exp_()  # exp(-inf) = 0 on the first chunk
    exps = logits.sub_(new_max[:, None]).exp_()  # reuses the logits' memory
    walk.running_sum.mul_(rescale).add_(exps.sum(dim=1))
    walk.running_max = new_max
    if walk.softmax_rows is None or walk.target_rows is None:
        return

    # The gradient's two terms: softmax-weighted rows and the target row,
    # both times the soft-cap's derivative 1 - tanh(z / softcap) ** 2.
    target_weight = chunk_weight[columns].to(accumulate_dtype)
    if tanh is not None:
        derivative = tanh.square_().neg_().add_(1)
        target_weight.mul_(derivative[hits, columns][:, None])
        exps.mul_(derivative)
    walk.target_rows[hits] = target_weight
    walk.softmax_rows.mul_(rescale[:, None])
    walk.softmax_rows.add_(exps.to(hidden.dtype) @ chunk_weight)
