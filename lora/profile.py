"""`a3x lora profile`: memory per layer of a GGUF base model and its LoRA adapters.

Each row is one GGUF block (`blk.N`, the transformers decoder layer N), plus one
row for the tensors outside the blocks (token_embd, output, output_norm).

- Weights and LoRA tensors: bytes as stored in the files, read from the tensor
  tables of their headers without loading any weight.
- Activations: measured in one forward pass of the base through transformers
  (the GGUF dequantized to float32) on random token ids at the given context
  length and batch. Every parameter requires grad during the pass, so autograd
  saves what backward needs. A `saved_tensors_hooks` pair records each saved
  tensor's storage, deduplicated, into the decoder layer that was running.
  Parameters and buffers are left out, and so are tensors that every layer
  receives as input (rotary cos/sin, attention masks), which are counted once.

NOTE: the measured bytes are what full fine-tuning keeps. LoRA training with
adapters on every linear layer should keep about as much, because each adapter
saves its layer's input (plus rank-sized intermediates); with fewer target
modules it keeps less. That is an estimate from what autograd needs, not a
measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from lora import LoraError
from lora.gguf_adapter import GGUFAdapter, check_fits_base, read_gguf_adapter
from lora.names import block_of
from runtime.gguf_file import GGUFInfo, TensorInfo, check_model_file
from runtime.memory import process_memory

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 1
NON_BLOCK = "non-block"  # the row of tensors outside the blocks
PLOT_NAME = "memory-profile.png"
ADAPTER_COLORS = ("tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
MIB = 1 << 20
WARM_UP_TOKENS = 8
ACTIVATIONS_MEASURED = (
    "saved: bytes autograd keeps for backward inside the layer (what training holds per "
    "layer), its input hidden state included",
    "output: bytes of the hidden state the layer returns",
)


class ProfileError(LoraError):
    """The memory profile cannot run on this input; the message names the value and the fix."""


# Records


@dataclass(frozen=True)
class AdapterSummary:
    name: str  # unique within one profile: the file stem, with "#2", "#3" for repeats
    path: Path
    tensor_bytes: int  # all LoRA tensors, as stored
    pairs: int  # modified base tensors
    ranks: tuple[int, ...]  # distinct ranks, ascending


@dataclass(frozen=True)
class LayerMemory:
    """Stored bytes of one row: base weights by GGUF tensor type, LoRA tensors by adapter."""

    name: str  # "blk.N" or NON_BLOCK
    block: int | None
    weight_bytes_by_type: dict[str, int]
    adapter_bytes: dict[str, int]  # adapter name -> bytes of its tensors in this row

    @property
    def weight_bytes(self) -> int:
        return sum(self.weight_bytes_by_type.values())

    @property
    def lora_bytes(self) -> int:
        return sum(self.adapter_bytes.values())


@dataclass(frozen=True)
class ActivationProfile:
    """Bytes measured in one forward pass with autograd recording, by decoder layer."""

    context: int  # tokens per sequence
    batch: int
    dtype: str
    attention: str  # transformers attention implementation, e.g. "sdpa" or "eager"
    parameter_bytes: int  # the dequantized weights transformers holds, tied ones once
    # Storages autograd keeps for backward inside each layer, the layer's input
    # hidden state included, shared inputs excluded.
    saved_bytes: tuple[int, ...]
    output_bytes: tuple[int, ...]  # the hidden state each layer returns
    shared_bytes: int  # inputs every layer receives (rotary cos/sin, masks), counted once
    outside_bytes: int  # saved outside the layers: embedding, final norm, lm_head input
    vocabulary: int
    logits_bytes: int  # batch x context x vocabulary x dtype size
    total_bytes: int  # distinct storages of everything saved, plus the logits
    rss_before: int  # after a warm-up pass without autograd
    rss_after: int  # with the autograd graph and the logits still alive
    seconds: float

    @property
    def rss_growth(self) -> int:
        return self.rss_after - self.rss_before


@dataclass(frozen=True)
class MemoryProfile:
    base: Path
    architecture: str
    base_file_bytes: int
    layers: tuple[LayerMemory, ...]  # blocks in order, then the NON_BLOCK row
    adapters: tuple[AdapterSummary, ...] = ()
    activations: ActivationProfile | None = None
    plot: Path | None = field(default=None, compare=False)

    @property
    def weight_bytes(self) -> int:
        return sum(layer.weight_bytes for layer in self.layers)

    @property
    def lora_bytes(self) -> int:
        return sum(adapter.tensor_bytes for adapter in self.adapters)

    def to_json(self) -> dict[str, Any]:
        return profile_to_json(self)


# Stored bytes, from the file headers


def read_adapters(base: GGUFInfo, paths: Sequence[Path]) -> list[tuple[str, GGUFAdapter]]:
    """Read each adapter's header, check that it fits the base and give it a unique name."""
    adapters: list[tuple[str, GGUFAdapter]] = []
    used_names: set[str] = set()
    for path in paths:
        adapter = read_gguf_adapter(path, load_tensors=False)
        check_fits_base(adapter, base)
        name = Path(path).stem
        repeat = 2
        while name in used_names:
            name = f"{Path(path).stem}#{repeat}"
            repeat += 1
        used_names.add(name)
        adapters.append((name, adapter))
    return adapters


def summarize_adapter(name: str, adapter: GGUFAdapter) -> AdapterSummary:
    return AdapterSummary(
        name=name,
        path=adapter.path.absolute(),
        tensor_bytes=adapter.resident_bytes,
        pairs=len(adapter.pairs),
        ranks=tuple(sorted({pair.rank for pair in adapter.pairs.values()})),
    )


def layer_rows(base: GGUFInfo, adapters: Sequence[tuple[str, GGUFAdapter]]) -> list[LayerMemory]:
    """Group the stored bytes of the base and of each adapter by GGUF block."""
    blocks = sorted({b for t in base.tensors if (b := block_of(t.name)) is not None})
    block_count = max(base.block_count or 0, blocks[-1] + 1 if blocks else 0)
    weights: dict[int | None, dict[str, int]] = {b: {} for b in range(block_count)}
    weights[None] = {}
    for tensor in base.tensors:
        by_type = weights[block_of(tensor.name)]
        by_type[tensor.type_name] = by_type.get(tensor.type_name, 0) + tensor.n_bytes
    rows = []
    for block, by_type in weights.items():
        adapter_bytes = {name: _bytes_in(adapter.info.tensors, block) for name, adapter in adapters}
        label = NON_BLOCK if block is None else f"blk.{block}"
        rows.append(LayerMemory(label, block, dict(sorted(by_type.items())), adapter_bytes))
    return rows


def _bytes_in(tensors: Sequence[TensorInfo], block: int | None) -> int:
    return sum(tensor.n_bytes for tensor in tensors if block_of(tensor.name) == block)


# Activation bytes, from a forward pass


class SavedTensorCounter:
    """Storages that autograd saves for backward, recorded per decoder layer.

    Forward pre/post hooks on each layer set the layer that is running, and the
    pack hook of `torch.autograd.graph.saved_tensors_hooks` files each saved
    tensor's storage under that layer. Storages are keyed by data pointer, which stays
    unique while the autograd graph keeps every saved tensor alive.
    """

    def __init__(self, model: Any, layers: Sequence[Any]):
        self.layers = layers
        self.current: int | None = None
        self.saved: list[dict[int, int]] = [{} for _ in layers]  # data pointer -> bytes
        self.outside: dict[int, int] = {}
        self.shared: set[int] = set()
        self.output_bytes = [0] * len(layers)
        self.excluded = {_storage_key(t)[0] for t in (*model.parameters(), *model.buffers())}

    @contextmanager
    def attached(self) -> Iterator[SavedTensorCounter]:
        import torch

        handles = []
        for index, layer in enumerate(self.layers):
            handles.append(
                layer.register_forward_pre_hook(self._enter_hook(index), with_kwargs=True)
            )
            handles.append(layer.register_forward_hook(self._leave_hook(index)))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, _unpack):
                yield self
        finally:
            for handle in handles:
                handle.remove()

    def pack(self, tensor: Any) -> Any:
        key, n_bytes = _storage_key(tensor)
        if n_bytes and key not in self.excluded:
            target = self.outside if self.current is None else self.saved[self.current]
            target[key] = n_bytes
        return tensor

    def _enter_hook(self, index: int) -> Any:
        def enter(module: Any, args: tuple, kwargs: dict) -> None:
            self.current = index
            hidden = args[0] if args else kwargs.get("hidden_states")
            for tensor in _tensors_in((args[1:], kwargs)):
                if tensor is not hidden:
                    self.shared.add(_storage_key(tensor)[0])

        return enter

    def _leave_hook(self, index: int) -> Any:
        def leave(module: Any, args: tuple, output: Any) -> None:
            self.current = None
            hidden = next(_tensors_in(output), None)
            if hidden is not None:
                self.output_bytes[index] = hidden.numel() * hidden.element_size()

        return leave

    def totals(self, logits: Any) -> tuple[list[int], int, int, int]:
        """Return (saved bytes per layer, shared bytes, outside bytes, total distinct bytes)."""
        every: dict[int, int] = dict(self.outside)
        for saved in self.saved:
            every.update(saved)
        in_layers = {key for saved in self.saved for key in saved}
        per_layer = [
            sum(n for key, n in saved.items() if key not in self.shared) for saved in self.saved
        ]
        shared = sum(n for key, n in every.items() if key in self.shared)
        counted = self.shared | in_layers
        outside = sum(n for key, n in self.outside.items() if key not in counted)
        logits_key, logits_bytes = _storage_key(logits)
        every[logits_key] = logits_bytes
        return per_layer, shared, outside, sum(every.values())


def _storage_key(tensor: Any) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def _unpack(tensor: Any) -> Any:
    return tensor


def _tensors_in(value: Any) -> Iterator[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item)


def decoder_layers(model: Any) -> Sequence[Any]:
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ProfileError(
            f"{type(model).__name__} has no decoder layer list at get_decoder().layers, which "
            "the activation measurement needs; profile it with --no-activations"
        )
    return list(layers)


@contextmanager
def _parameters_require_grad(model: Any) -> Iterator[None]:
    """Make every parameter require grad, so autograd saves what backward needs, then restore."""
    before = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        for parameter, _ in before:
            parameter.requires_grad_(True)
        yield
    finally:
        for parameter, requires_grad in before:
            parameter.requires_grad_(requires_grad)


def measure_activations(model: Any, context: int, batch: int, seed: int = 0) -> ActivationProfile:
    """Run one forward pass on random token ids and measure the activation bytes per layer.

    The model keeps its current mode. In eval mode, as the backends load it,
    dropout keeps no masks.
    """
    import torch

    layers = decoder_layers(model)
    generator = torch.Generator().manual_seed(seed)
    token_ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=generator)
    counter = SavedTensorCounter(model, layers)

    # The first pass pages in the memory-mapped weights of the dequantized cache
    # and starts thread pools. A short pass before the measured one keeps both
    # out of the RSS growth.
    with torch.no_grad():
        model(input_ids=token_ids[:, :WARM_UP_TOKENS], use_cache=False)
    gc.collect()
    rss_before = process_memory()[0]
    started = time.perf_counter()
    with _parameters_require_grad(model), counter.attached(), torch.enable_grad():
        output = model(input_ids=token_ids, use_cache=False)
    seconds = time.perf_counter() - started
    rss_after = process_memory()[0]

    logits = output.logits
    per_layer, shared, outside, total = counter.totals(logits)
    profile = ActivationProfile(
        context=context,
        batch=batch,
        dtype=str(logits.dtype).removeprefix("torch."),
        attention=str(getattr(model.config, "_attn_implementation", None) or "unknown"),
        parameter_bytes=sum(dict(map(_storage_key, model.parameters())).values()),
        saved_bytes=tuple(per_layer),
        output_bytes=tuple(counter.output_bytes),
        shared_bytes=shared,
        outside_bytes=outside,
        vocabulary=int(logits.shape[-1]),
        logits_bytes=logits.numel() * logits.element_size(),
        total_bytes=total,
        rss_before=rss_before,
        rss_after=rss_after,
        seconds=seconds,
    )
    del output, logits
    gc.collect()
    return profile


def load_base_model(base: Path, cache_dir: Path, threads: int) -> Any:
    """Load the base through transformers, dequantized once into `cache_dir` for later loads."""
    from runtime.transformers_backend import TransformersBackend

    return TransformersBackend(base, cache_dir=cache_dir, threads=threads).base_model


# The profile


def profile_memory(
    base: Path,
    adapter_paths: Sequence[Path] = (),
    context: int = 256,
    batch: int = 1,
    cache_dir: Path | None = None,
    threads: int = 2,
    activations: bool = True,
) -> MemoryProfile:
    """Build the memory profile of a GGUF base and its GGUF LoRA adapters.

    With `activations=False` only the file headers are read. Otherwise the
    base is loaded through transformers (dequantized into `cache_dir`) for one
    forward pass. An adapter that does not fit the base raises AdapterFormatError first.
    """
    info = check_model_file(base)
    adapters = read_adapters(info, adapter_paths)
    rows = layer_rows(info, adapters)
    measured = None
    if activations:
        _check_pass_size(info, context, batch)
        if cache_dir is None:
            raise ProfileError(
                "measuring activations needs cache_dir, a folder for the dequantized base; "
                "pass one, or activations=False"
            )
        model = load_base_model(info.path, cache_dir, threads)
        block_total = sum(1 for row in rows if row.block is not None)
        if len(decoder_layers(model)) != block_total:
            raise ProfileError(
                f"transformers built {len(decoder_layers(model))} decoder layers from {base} "
                f"but its GGUF header has {block_total} blocks; profile it with --no-activations"
            )
        _check_logits_fit(model, context, batch)
        log.info("profile.measuring", base=str(base), context=context, batch=batch)
        measured = measure_activations(model, context, batch)
        log.info("profile.measured", seconds=round(measured.seconds, 2))
    return MemoryProfile(
        base=info.path.absolute(),
        architecture=info.architecture,
        base_file_bytes=info.size_bytes,
        layers=tuple(rows),
        adapters=tuple(summarize_adapter(name, adapter) for name, adapter in adapters),
        activations=measured,
    )


def _check_pass_size(info: GGUFInfo, context: int, batch: int) -> None:
    if context < 1 or batch < 1:
        raise ProfileError(f"context {context} and batch {batch} must both be 1 or more")
    if info.context_length is not None and context > info.context_length:
        raise ProfileError(
            f"context {context} exceeds the {info.context_length} tokens that {info.path.name} "
            f"supports; pass --context {info.context_length} or less"
        )


def _check_logits_fit(model: Any, context: int, batch: int) -> None:
    """Raise ProfileError when the logits alone would not fit in the available memory."""
    import psutil

    logits_bytes = batch * context * model.config.vocab_size * model.dtype.itemsize
    available = psutil.virtual_memory().available
    if logits_bytes > available:
        raise ProfileError(
            f"the logits of batch {batch} x context {context} x vocabulary "
            f"{model.config.vocab_size} take {format_bytes(logits_bytes)}, more than the "
            f"{format_bytes(available)} of memory available; lower --context or --batch"
        )


def profile_to_json(profile: MemoryProfile) -> dict[str, Any]:
    measured = profile.activations
    rows = []
    for row in profile.layers:
        entry: dict[str, Any] = {
            "layer": row.name,
            "weight_bytes": row.weight_bytes,
            "weight_bytes_by_type": row.weight_bytes_by_type,
            "lora_bytes": row.lora_bytes,
            "lora_bytes_by_adapter": row.adapter_bytes,
        }
        if measured is not None:
            if row.block is None:
                entry.update(saved_bytes=measured.outside_bytes, output_bytes=None)
            else:
                entry.update(
                    saved_bytes=measured.saved_bytes[row.block],
                    output_bytes=measured.output_bytes[row.block],
                )
        rows.append(entry)
    activations = None
    if measured is not None:
        activations = {
            "measured": "; ".join(ACTIVATIONS_MEASURED),
            "context": measured.context,
            "batch": measured.batch,
            "dtype": measured.dtype,
            "attention": measured.attention,
            "parameter_bytes": measured.parameter_bytes,
            "saved_bytes": sum(measured.saved_bytes),
            "shared_bytes": measured.shared_bytes,
            "outside_bytes": measured.outside_bytes,
            "vocabulary": measured.vocabulary,
            "logits_bytes": measured.logits_bytes,
            "total_bytes": measured.total_bytes,
            "rss_before": measured.rss_before,
            "rss_after": measured.rss_after,
            "rss_growth": measured.rss_growth,
            "seconds": round(measured.seconds, 3),
        }
    return {
        "schema_version": SCHEMA_VERSION,
        "base": str(profile.base),
        "architecture": profile.architecture,
        "base_file_bytes": profile.base_file_bytes,
        "weight_bytes": profile.weight_bytes,
        "lora_bytes": profile.lora_bytes,
        "adapters": [
            {
                "name": adapter.name,
                "path": str(adapter.path),
                "tensor_bytes": adapter.tensor_bytes,
                "pairs": adapter.pairs,
                "ranks": list(adapter.ranks),
            }
            for adapter in profile.adapters
        ],
        "layers": rows,
        "activations": activations,
        "plot": str(profile.plot) if profile.plot else None,
    }


# Text and plot


def format_bytes(n_bytes: int) -> str:
    if n_bytes >= MIB:
        return f"{n_bytes / MIB:.2f} MiB"
    if n_bytes >= 1024:
        return f"{n_bytes / 1024:.1f} KiB"
    return f"{n_bytes} B"


def format_table(profile: MemoryProfile) -> str:
    """Render the profile as a text table with a header and totals."""
    lines = [f"base: {profile.base} ({profile.architecture})"]
    for adapter in profile.adapters:
        ranks = ",".join(map(str, adapter.ranks))
        lines.append(
            f"adapter {adapter.name}: {adapter.path}, {adapter.pairs} tensor pairs, rank {ranks}"
        )
    measured = profile.activations
    if measured is not None:
        lines.append(
            f"activations: one forward pass, context {measured.context}, batch "
            f"{measured.batch}, {measured.dtype}, {measured.attention} attention"
        )
        lines.extend(f"  {line}" for line in ACTIVATIONS_MEASURED)
    lines.append("")
    lines.extend(_table_rows(profile))
    lines.append("")
    lines.extend(_total_lines(profile))
    return "\n".join(lines)


def _table_rows(profile: MemoryProfile) -> list[str]:
    measured = profile.activations
    header = ["layer", "weights", "types"] + [f"LoRA {a.name}" for a in profile.adapters]
    if measured is not None:
        header += ["saved", "output"]
    table = [header]
    for row in profile.layers:
        cells = [row.name, format_bytes(row.weight_bytes), ",".join(row.weight_bytes_by_type)]
        cells += [format_bytes(row.adapter_bytes[a.name]) for a in profile.adapters]
        if measured is not None and row.block is not None:
            cells += [
                format_bytes(measured.saved_bytes[row.block]),
                format_bytes(measured.output_bytes[row.block]),
            ]
        elif measured is not None:
            cells += [format_bytes(measured.outside_bytes), "-"]
        table.append(cells)
    widths = [max(len(cells[i]) for cells in table) for i in range(len(header))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
        for cells in table
    ]


def _total_lines(profile: MemoryProfile) -> list[str]:
    lines = [
        f"weights (as stored):  {format_bytes(profile.weight_bytes)} "
        f"(file {format_bytes(profile.base_file_bytes)})",
        f"LoRA tensors:         {format_bytes(profile.lora_bytes)}",
    ]
    measured = profile.activations
    if measured is None:
        return lines
    lines += [
        f"weights for the pass: {format_bytes(measured.parameter_bytes)} ({measured.dtype}, "
        "dequantized by transformers)",
        f"saved in layers:      {format_bytes(sum(measured.saved_bytes))}",
        f"shared layer inputs:  {format_bytes(measured.shared_bytes)} (rotary cos/sin, masks)",
        f"saved outside layers: {format_bytes(measured.outside_bytes)} "
        "(embedding, final norm, lm_head input)",
        f"logits:               {format_bytes(measured.logits_bytes)} ({measured.batch} x "
        f"{measured.context} tokens x {measured.vocabulary} vocabulary, {measured.dtype})",
        f"activations in total: {format_bytes(measured.total_bytes)} "
        "(distinct storages: everything saved, plus the logits)",
        f"process RSS growth:   {_signed_bytes(measured.rss_growth)} during the pass, "
        f"{_rss_ratio(measured)} of the activation total",
        "  (RSS also holds temporaries the allocator kept, and misses freed memory it reused)",
    ]
    return lines


def _signed_bytes(n_bytes: int) -> str:
    return format_bytes(n_bytes) if n_bytes >= 0 else f"-{format_bytes(-n_bytes)}"


def _rss_ratio(measured: ActivationProfile) -> str:
    if not measured.total_bytes:
        return "n/a"
    return f"{measured.rss_growth / measured.total_bytes:.0%}"


def write_plot(profile: MemoryProfile, path: Path) -> Path:
    """Draw stacked bars per layer (weights, LoRA per adapter, activations saved) to a PNG."""
    from matplotlib.figure import Figure  # deferred: about a second to import

    blocks = [row for row in profile.layers if row.block is not None]
    other = [row for row in profile.layers if row.block is None]
    figure = Figure(figsize=(11, 4.8), layout="constrained")
    block_axes, other_axes = figure.subplots(1, 2, width_ratios=[max(4, len(blocks) // 3), 1])
    _stack_bars(block_axes, profile, blocks, with_logits=False)
    _stack_bars(other_axes, profile, other, with_logits=True)
    block_axes.set_ylabel("MiB")
    block_axes.set_xlabel("GGUF block")
    handles: dict[str, Any] = {}
    for axes in (block_axes, other_axes):
        for handle, label in zip(*axes.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    figure.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=len(handles))
    title = f"{profile.base.name}: memory per layer"
    if profile.activations is not None:
        measured = profile.activations
        title += f" (activations: context {measured.context}, batch {measured.batch})"
    figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def _stack_bars(
    axes: Any, profile: MemoryProfile, rows: list[LayerMemory], with_logits: bool
) -> None:
    labels = [row.name.removeprefix("blk.") for row in rows]
    positions = list(range(len(rows)))
    bottom = [0.0] * len(rows)

    def stack(values: list[float], label: str, color: str) -> None:
        axes.bar(positions, values, bottom=bottom, label=label, color=color)
        for index, value in enumerate(values):
            bottom[index] += value

    stack([row.weight_bytes / MIB for row in rows], "weights (as stored)", "tab:blue")
    for index, adapter in enumerate(profile.adapters):
        color = ADAPTER_COLORS[index % len(ADAPTER_COLORS)]
        stack(
            [row.adapter_bytes[adapter.name] / MIB for row in rows], f"LoRA {adapter.name}", color
        )
    measured = profile.activations
    if measured is not None:
        saved = [
            (measured.outside_bytes if row.block is None else measured.saved_bytes[row.block])
            for row in rows
        ]
        stack([value / MIB for value in saved], "activations saved", "tab:orange")
        if with_logits:
            axes.bar([len(rows)], [measured.logits_bytes / MIB], color="tab:red", label="logits")
            labels.append("logits")
            positions.append(len(rows))
    axes.set_xticks(positions, labels)


# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", type=Path, metavar="BASE.gguf", help="GGUF base model")
    parser.add_argument(
        "adapters", type=Path, nargs="*", metavar="ADAPTER.gguf", help="GGUF LoRA adapters"
    )
    parser.add_argument(
        "--context", type=_positive_int, default=256, help="tokens per sequence (default: 256)"
    )
    parser.add_argument(
        "--batch", type=_positive_int, default=1, help="sequences per pass (default: 1)"
    )
    parser.add_argument(
        "--out", type=Path, help=f"folder for {PLOT_NAME} (default: the current folder)"
    )
    parser.add_argument(
        "--no-activations",
        action="store_true",
        help="read the file headers only; skip the forward pass",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="folder of the dequantized-model cache (default: the cache of the A3X home)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (default: one per available core)"
    )
    parser.add_argument("--json", action="store_true", help="print the profile as one JSON object")


def command(args: argparse.Namespace) -> int:
    from daemon.config import ModelConfig, thread_count

    activations = not args.no_activations
    cache_dir = args.cache_dir
    if activations and cache_dir is None:
        cache_dir = _home_cache(args)
    profile = profile_memory(
        args.base,
        args.adapters,
        context=args.context,
        batch=args.batch,
        cache_dir=cache_dir,
        threads=thread_count(ModelConfig(threads=args.threads)),
        activations=activations,
    )
    plot = write_plot(profile, _plot_path(args.out))
    profile = dataclasses.replace(profile, plot=plot)
    if args.json:
        print(json.dumps(profile.to_json(), indent=2))
    else:
        print(format_table(profile))
        print(f"plot: {plot}")
    return 0


def _home_cache(args: argparse.Namespace) -> Path:
    from daemon.config import load_config
    from daemon.home import Home

    config = load_config(getattr(args, "config", None), home=getattr(args, "home", None))
    return Home(config.home).cache_path


def _plot_path(out: Path | None) -> Path:
    folder = (out or Path.cwd()).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ProfileError(f"--out {folder} is a file; give a folder for {PLOT_NAME}")
    return folder.absolute() / PLOT_NAME


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1; give 1 or more")
    return value
