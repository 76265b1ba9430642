"""LoRA training on a dequantized base with PEFT, as one readable recipe.

Runs inside the training child process (lora/worker.py), never in the daemon.
The recipe: load the base and tokenizer, tokenize the examples (loss on the
completion only, padding masked), find a learning rate by a short range test
when none is set, then train with AdamW, linear warmup and cosine decay,
gradient accumulation and clipping. An update whose loss or gradient norm is
an outlier against recent steps is skipped instead of applied. The adapter
is saved only when every weight is finite, with its full training config.
"""

from __future__ import annotations

import json
import math
import random
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

from lora import LoraError
from lora.tokenizing import Sequence, load_tokenizer, tokenize

log = structlog.get_logger(__name__)

TRAINING_CONFIG_FILE = "a3x-training.json"
TRAINING_CONFIG_VERSION = 1
ENGINES = ("lean", "peft")
PAD_MULTIPLE = 32  # lean engine: batch widths are rounded up to this many tokens


class TrainingError(LoraError):
    """Training could not produce a usable adapter."""


@dataclass(frozen=True)
class TrainingSpec:
    """Everything a training run needs; saved next to the adapter it produced."""

    base_folder: str  # Hugging Face folder of the dequantized base
    examples: list[dict[str, str]]  # {"prompt", "completion"}
    output: str  # PEFT folder to write
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    batch_size: int = 1
    accumulation: int = 4
    max_sequence: int = 256
    epochs: float = 2.0
    learning_rate: float | None = None  # None: found by the range test
    warmup_fraction: float = 0.1
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    outlier_z: float = 4.0  # skip an update whose loss or grad norm is this far out
    outlier_window: int = 16
    seed: int = 0
    threads: int = 2
    poison: str = ""  # "", "shuffle": shuffle the tokens of each example (a negative control)
    # "lean": quantized frozen GGUF base, chunked loss (lora/lean.py); "peft": float32 PEFT
    engine: str = "lean"
    base_gguf: str = ""  # lean only: the GGUF file of base_folder (empty: the recorded one)
    # "auto" means bf16 for lean on CPUs with native bf16, and float32 for peft. For peft,
    # the precision is the dtype of the frozen base. LoRA factors stay float32.
    precision: str = "auto"
    checkpointing: bool = False  # lean only: recompute activations in backward
    loss_chunk: int = 8192  # lean only: vocabulary rows per chunk of the loss
    module_fraction: float = 1.0  # lean only: share of target layers trained (by impact)
    probe_batches: int = 4  # lean only: batches of the impact probe when module_fraction < 1

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainingSpec:
        data = dict(data)
        data["targets"] = tuple(data.get("targets", cls.targets))
        return cls(**data)

    def check(self) -> None:
        if self.engine not in ENGINES:
            raise TrainingError(
                f"training engine {self.engine!r} is not one of {', '.join(ENGINES)}"
            )
        if self.precision not in ("auto", "bfloat16", "float32"):
            raise TrainingError(
                f"precision {self.precision!r} is not one of auto, bfloat16, float32"
            )
        if not 0 < self.module_fraction <= 1:
            raise TrainingError(
                f"module_fraction {self.module_fraction} must lie in (0, 1]; 1 trains every "
                "target layer"
            )


@dataclass
class TrainingResult:
    output: str
    steps: int
    skipped_updates: int
    learning_rate: float
    learning_rate_source: str  # "configured" or "range test"
    losses: list[float] = field(default_factory=list)  # mean loss per optimizer step
    seconds_per_step: float = 0.0
    peak_rss_bytes: int = 0
    tokens: int = 0
    range_test: list[tuple[float, float]] = field(default_factory=list)  # (lr, loss)
    engine: str = "peft"
    precision: str = "float32"
    tokenizer_peak_rss_bytes: int = 0  # the tokenizing child's peak (lean engine)
    modules_trained: int = 0
    modules_total: int = 0
    module_impact: dict[str, float] = field(default_factory=dict)  # sparse updates' probe


@dataclass
class Batch:
    input_ids: Any
    attention_mask: Any
    labels: Any


def train(
    spec: TrainingSpec, progress: Callable[[dict[str, Any]], None] | None = None
) -> TrainingResult:
    import torch

    emit = progress or (lambda event: None)
    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    torch.set_num_threads(spec.threads)

    spec.check()
    # Model and data
    if spec.engine == "lean":
        from lora.tokenizing import tokenize_in_child

        sequences, pad_id, tokenizer_peak = tokenize_in_child(spec)
        model = _load_lean(spec)
    else:
        model, tokenizer = _load(spec)
        sequences, pad_id, tokenizer_peak = tokenize(spec, tokenizer), tokenizer.pad_token_id, 0
    if not sequences:
        raise TrainingError("the training set is empty after tokenization; nothing to train on")
    steps = max(1, math.ceil(len(sequences) * spec.epochs / (spec.batch_size * spec.accumulation)))
    impact, total = _choose_modules(model, sequences, spec, pad_id, emit)

    # Learning rate
    if spec.learning_rate is None:
        learning_rate, sweep = _range_test(model, sequences, spec, pad_id)
        source = "range test"
    else:
        learning_rate, sweep, source = spec.learning_rate, [], "configured"
    emit({"event": "train.learning_rate", "learning_rate": learning_rate, "source": source})

    # Training
    result = TrainingResult(spec.output, steps, 0, learning_rate, source, range_test=sweep)
    result.engine, result.tokenizer_peak_rss_bytes = spec.engine, tokenizer_peak
    result.precision = str(getattr(model, "dtype", torch.float32)).removeprefix("torch.")
    result.module_impact, result.modules_total = impact, total
    result.modules_trained = total if not impact else len(model.lora_modules())
    _train_loop(model, sequences, spec, pad_id, learning_rate, steps, result, emit)

    # Save
    _check_finite(model)
    Path(spec.output).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(spec.output)
    result.peak_rss_bytes = peak_rss_bytes()
    config = {
        "version": TRAINING_CONFIG_VERSION,
        "spec": _spec_for_record(spec),
        "result": asdict(result),
    }
    (Path(spec.output) / TRAINING_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return result


def _pad_multiple(spec: TrainingSpec) -> int:
    """Pad each lean batch to a multiple of PAD_MULTIPLE tokens.

    oneDNN and the attention kernels keep per-shape state. With every batch a
    new length, the lean child's peak grew by about 15 MiB a step on Gemma 3
    270M (915 to 1,491 MiB over 40 steps of 16 to 128 tokens). Padded to
    multiples of 32, it stayed at 790 MiB. Padding is masked out of attention
    and loss, so the result does not change."""
    return PAD_MULTIPLE if spec.engine == "lean" else 1


def _load_lean(spec: TrainingSpec) -> Any:
    from lora.lean import LeanSettings, build_lean_model

    settings = LeanSettings(
        rank=spec.rank,
        alpha=spec.alpha,
        dropout=spec.dropout,
        targets=spec.targets,
        dtype=spec.precision,
        checkpointing=spec.checkpointing,
        loss_chunk=spec.loss_chunk,
    )
    gguf = Path(spec.base_gguf) if spec.base_gguf else None
    return build_lean_model(Path(spec.base_folder), settings, gguf)


def _choose_modules(
    model: Any, sequences: list[Sequence], spec: TrainingSpec, pad_id: int, emit: Callable
) -> tuple[dict[str, float], int]:
    """Sparse updates: probe every target layer's impact and keep the top fraction.
    Returns the probe's figures (empty when every layer trains) and the layer count."""
    if spec.engine != "lean":
        return {}, sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A"))
    total = len(model.lora_modules())
    if spec.module_fraction >= 1:
        return {}, total
    batches = _batches(
        sequences, spec.batch_size, pad_id, random.Random(spec.seed + 3), _pad_multiple(spec)
    )
    impact = model.probe_impact(batches, spec.probe_batches)
    keep_count = max(1, math.ceil(total * spec.module_fraction))
    keep = sorted(impact, key=impact.__getitem__, reverse=True)[:keep_count]
    model.drop_lora(set(keep))
    emit({"event": "train.modules_chosen", "kept": keep_count, "of": total})
    return impact, total


def _load(spec: TrainingSpec) -> tuple[Any, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(spec.base_folder)
    dtype = torch.bfloat16 if spec.precision == "bfloat16" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(spec.base_folder, dtype=dtype)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,  # type: ignore[arg-type]  # PEFT accepts a float
        lora_dropout=spec.dropout,
        target_modules=list(spec.targets),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    model.train()
    return model, tokenizer


def _batches(
    sequences: list[Sequence], size: int, pad_id: int, rng: random.Random, multiple: int = 1
) -> Any:
    import torch

    order = list(range(len(sequences)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - size + 1 if len(order) >= size else 1, size):
            chosen = [sequences[i] for i in order[start : start + size]]
            width = max(len(ids) for ids, _ in chosen)
            width = -(-width // multiple) * multiple  # padded positions carry no loss
            ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
            labels = torch.full((len(chosen), width), -100, dtype=torch.long)  # padding: no loss
            mask = torch.zeros((len(chosen), width), dtype=torch.long)
            for row, (tokens, targets) in enumerate(chosen):
                ids[row, : len(tokens)] = torch.tensor(tokens)
                labels[row, : len(targets)] = torch.tensor(targets)
                mask[row, : len(tokens)] = 1
            yield Batch(ids, mask, labels)


def _loss(model: Any, batch: Batch) -> Any:
    output = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
    )
    return output.loss


def _train_loop(
    model: Any,
    sequences: list[Sequence],
    spec: TrainingSpec,
    pad_id: int,
    learning_rate: float,
    steps: int,
    result: TrainingResult,
    emit: Callable[[dict[str, Any]], None],
) -> None:
    import torch
    from transformers import get_cosine_schedule_with_warmup

    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=spec.weight_decay)
    schedule = get_cosine_schedule_with_warmup(
        optimizer, max(1, int(steps * spec.warmup_fraction)), steps
    )
    batches = _batches(
        sequences, spec.batch_size, pad_id, random.Random(spec.seed + 1), _pad_multiple(spec)
    )
    recent_losses: list[float] = []
    recent_norms: list[float] = []
    bar = _progress_bar(steps)
    started = time.perf_counter()
    for step in range(steps):
        loss_sum = 0.0
        for _ in range(spec.accumulation):
            batch = next(batches)
            result.tokens += int((batch.labels != -100).sum())
            loss = _loss(model, batch)
            (loss / spec.accumulation).backward()
            loss_sum += float(loss.detach())
        loss_value = loss_sum / spec.accumulation
        norm = float(torch.nn.utils.clip_grad_norm_(parameters, spec.clip_norm))

        outlier = _is_outlier(loss_value, recent_losses, spec) or _is_outlier(
            norm, recent_norms, spec
        )
        if outlier or not math.isfinite(loss_value) or not math.isfinite(norm):
            result.skipped_updates += 1
            emit(
                {
                    "event": "train.update_skipped",
                    "step": step,
                    "loss": loss_value,
                    "grad_norm": norm,
                }
            )
        else:
            optimizer.step()
            recent_losses = (recent_losses + [loss_value])[-spec.outlier_window :]
            recent_norms = (recent_norms + [norm])[-spec.outlier_window :]
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        result.losses.append(loss_value)
        _report(bar, emit, step, steps, loss_value, norm, schedule.get_last_lr()[0])
    result.seconds_per_step = (time.perf_counter() - started) / steps
    if bar is not None:
        bar.close()


def _is_outlier(value: float, recent: list[float], spec: TrainingSpec) -> bool:
    """Tell whether `value` lies more than outlier_z standard deviations above the
    recent values (at least 8 of them); falling losses are never outliers."""
    if len(recent) < 8:
        return False
    mean = sum(recent) / len(recent)
    spread = math.sqrt(sum((v - mean) ** 2 for v in recent) / (len(recent) - 1))
    return spread > 0 and (value - mean) / spread > spec.outlier_z


def _range_test(
    model: Any, sequences: list[Sequence], spec: TrainingSpec, pad_id: int
) -> tuple[float, list[tuple[float, float]]]:
    """Raise the learning rate exponentially over a few steps from the initial adapter,
    then pick one tenth of the rate with the lowest smoothed loss (the usual LR finder
    rule); the adapter's weights are restored afterwards."""
    import torch

    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    parameters = [p for p in model.parameters() if p.requires_grad]
    low, high, count = 1e-5, 1e-2, 12
    optimizer = torch.optim.AdamW(parameters, lr=low)
    batches = _batches(
        sequences, spec.batch_size, pad_id, random.Random(spec.seed + 2), _pad_multiple(spec)
    )
    sweep: list[tuple[float, float]] = []
    smoothed = None
    for index in range(count):
        rate = low * (high / low) ** (index / (count - 1))
        for group in optimizer.param_groups:
            group["lr"] = rate
        loss = _loss(model, next(batches))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, spec.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        smoothed = value if smoothed is None else 0.7 * smoothed + 0.3 * value
        sweep.append((rate, smoothed))
        if not math.isfinite(value) or value > 4 * sweep[0][1]:
            break
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in trainable:
                parameter.copy_(trainable[name])
    best = min(sweep, key=lambda point: point[1])[0]
    return min(max(best / 10, 1e-5), 5e-3), sweep


def _check_finite(model: Any) -> None:
    import torch

    for name, parameter in model.named_parameters():
        if parameter.requires_grad and not torch.isfinite(parameter).all():
            raise TrainingError(
                f"adapter weight '{name}' contains NaN or infinite values after training; "
                "the adapter is not saved. Lower retrain.learning_rate or set it explicitly"
            )


def _progress_bar(steps: int) -> Any:
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=steps, desc="training", unit="step")


def _report(
    bar: Any, emit: Callable, step: int, steps: int, loss: float, norm: float, lr: float
) -> None:
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
    if bar is None and (step % 5 == 0 or step == steps - 1):
        # The parent shows these as a progress bar on a terminal (lora/child.py).
        emit(
            {
                "event": "train.progress",
                "step": step + 1,
                "steps": steps,
                "loss": round(loss, 4),
                "grad_norm": round(norm, 4),
                "learning_rate": lr,
            }
        )


def peak_rss_bytes() -> int:
    """Return this process's peak resident set size.

    VmHWM from /proc is this process's own peak. `ru_maxrss` (KiB on Linux) is
    the fallback, but it starts from the parent's peak in a forked child, so a
    training child of a large daemon would report the daemon's figure.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _spec_for_record(spec: TrainingSpec) -> dict[str, Any]:
    data = asdict(spec)
    data["examples"] = len(spec.examples)
    return data
