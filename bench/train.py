"""`a3x bench train`: plain PEFT fp32, PEFT bf16, bitsandbytes NF4 QLoRA and A3X lean, side
by side in one run.

Every side trains the same LoRA adapter (rank, alpha, no dropout, q/k/v/o projections)
on the same packed token sequences of the almanac corpus's training split. The optimizer
settings are the same too: AdamW at a fixed learning rate, cosine decay after the same
warm-up, clipping, seed and threads. Four sides are configurations of A3X's own training
loop (`lora.trainer`, run by `lora.child.run_training_child`):

- "peft-fp32": a PEFT model on the float32 dequantized base;
- "peft-bf16": the same with the frozen base in bfloat16;
- "lean": the GGUF base kept quantized, the vocabulary-chunked loss and activation
  checkpointing (`lora.lean`);
- "lean-sparse": lean with LoRA on the half of the target layers that a short probe
  finds most affected (sparse updates).

The "nf4-qlora" side is the PEFT QLoRA recipe: the dequantized base re-quantized to NF4
by bitsandbytes with bfloat16 compute, `prepare_model_for_kbit_training` (which turns on
gradient checkpointing), then a PEFT model. It runs in a child process of this module and
calls the same training loop, so its batches, schedule and outlier rule are the others'.
Without bitsandbytes, or when it fails on this CPU, the side is reported as skipped.

For each side the benchmark reports the time per optimizer step (the first step is not
timed), the training process's peak RSS (VmHWM), and the held-out perplexity of its
adapter after the same number of steps. Every adapter is evaluated the same way, as the
retraining gate does it: PEFT on the float32 dequantized base, mean negative
log-likelihood per token of each held-out paragraph (`evaluators.gate.measure_perplexity`).
The held-out paragraphs never enter training (`knowledge.corpus.split_corpus`).

Each training run and the evaluation is a child process, so each peak is the child's own
and the parent stays small. With `--repeats`, the order of the sides alternates between
repeats. `python -m bench.train --child qlora|evaluate REQUEST.json RESULT.json` is the
entry point of this module's child processes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.train_step import (
    BUDGET_FACTOR,
    BenchmarkConfig,
    BenchmarkError,
    PreparedData,
    a3x_spec,
    add_model_arguments,
    machine_summary,
    positive_int,
    run_child,
    seconds_per_timed_step,
)

CORPUS_DOMAIN = "almanac"  # invented facts about an island nation, unseen by any model
REFERENCE = "peft-fp32"  # the side every ratio and perplexity comparison divides by
LEAN = "lean"
QLORA = "nf4-qlora"
# A run that ends at a 1-minute load average above its own threads plus this margin
# shared the CPU with other processes.
LOAD_MARGIN = 1.0
NOISE_Z = 2.0  # standard errors of the paired differences within which two sides match
INSTALL_HINT = "install it with `pip install 'bitsandbytes>=0.45'` or `pip install -e '.[bench]'`"

# Targets for the lean trainer, judged at the end of every report.
TARGET_PEAK_BYTES = 10**9  # 1.0 GB
TARGET_WORKLOAD = (2, 256)  # (batch, sequence) at which the peak target applies
TARGET_SECONDS_RATIO = 0.7  # lean time per step over PEFT fp32's

# 16 timed steps and 1 warm-up step at batch 2 are 34 examples of 256 tokens, about 1.4
# passes over the almanac training split, enough for the held-out perplexity to move.
DEFAULTS = BenchmarkConfig(
    steps=16, batch=2, sequence=256, accumulation=1, learning_rate=3e-4, repeats=1
)


@dataclass(frozen=True)
class Side:
    name: str
    label: str
    engine: str  # TrainingSpec.engine, or "qlora" for the bitsandbytes child
    precision: str  # TrainingSpec.precision
    checkpointing: bool  # activation checkpointing
    module_fraction: float = 1.0  # TrainingSpec.module_fraction: sparse updates below 1


SIDES = (
    Side(REFERENCE, "PEFT fp32", "peft", "float32", False),
    Side("peft-bf16", "PEFT bf16", "peft", "bfloat16", False),
    Side(QLORA, "NF4 QLoRA", "qlora", "bfloat16", True),
    Side(LEAN, "A3X lean", "lean", "auto", True),
    # Sparse updates: the half of the target layers with the largest probed impact.
    Side("lean-sparse", "A3X lean, half the layers", "lean", "auto", True, 0.5),
)
SIDE_NAMES = tuple(side.name for side in SIDES)
WIDTH = max(len(name) for name in SIDE_NAMES)  # of the side column in the report


def side_named(name: str) -> Side:
    return next(side for side in SIDES if side.name == name)


@dataclass
class Run:
    side: str
    repeat: int
    seconds_per_step: float  # mean over the timed optimizer steps
    peak_rss_bytes: int  # VmHWM of the training process
    tokenizer_peak_rss_bytes: int  # the lean trainer's tokenizing child, 0 for the others
    last_loss: float  # mean loss of the last optimizer step
    steps: int  # optimizer steps run, the warm-up step included
    skipped_updates: int  # updates the training loop skipped as outliers
    load_average: float  # the machine's 1-minute load average when the run ended


@dataclass
class HeldOut:
    """Mean negative log-likelihood per token (nats) of each held-out paragraph, and
    each paragraph's token count."""

    nll: list[float]
    tokens: list[int]

    @property
    def perplexity(self) -> float:
        """Token-weighted perplexity over all paragraphs."""
        total = sum(self.tokens)
        return math.exp(sum(n * t for n, t in zip(self.nll, self.tokens, strict=True)) / total)

    @property
    def standard_error(self) -> float:
        """Standard error of the perplexity across paragraphs, by the delta method: the
        standard error of the mean per-paragraph NLL times the perplexity. It is 0 for one
        paragraph."""
        if len(self.nll) < 2:
            return 0.0
        return self.perplexity * statistics.stdev(self.nll) / math.sqrt(len(self.nll))


@dataclass
class Comparison:
    """A side's held-out perplexity against PEFT fp32's, paired by paragraph."""

    change: float  # relative perplexity change, side over PEFT fp32 minus 1
    noise: float  # relative change that NOISE_Z standard errors of the paired NLL differences make
    within_noise: bool


@dataclass
class SideSummary:
    side: str
    label: str
    seconds_per_step: float  # median over the repeats
    peak_rss_bytes: int  # maximum over the repeats
    tokenizer_peak_rss_bytes: int  # maximum over the repeats
    seconds_ratio: float  # to PEFT fp32
    rss_ratio: float  # to PEFT fp32
    perplexity: float
    perplexity_standard_error: float
    comparison: Comparison


@dataclass
class Verdict:
    target: str
    measured: str
    met: bool | None  # None: not judged (a side did not run, or another workload)


@dataclass
class TrainBenchmark:
    model: str
    machine: str
    config: BenchmarkConfig
    sides: tuple[str, ...]  # the sides requested, in the order of the first repeat
    runs: list[Run] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # side -> reason
    # "base" and every measured side; a side's NLL is the mean over its repeats.
    held_out: dict[str, HeldOut] = field(default_factory=dict)

    @property
    def measured_sides(self) -> list[str]:
        return [side for side in self.sides if side not in self.skipped]

    def summary(self, side: str) -> SideSummary:
        runs = [run for run in self.runs if run.side == side]
        if not runs:
            raise BenchmarkError(
                f"no run of the side {side!r}. Measured sides: {', '.join(self.measured_sides)}"
            )
        reference = [run for run in self.runs if run.side == REFERENCE]
        seconds = statistics.median(run.seconds_per_step for run in runs)
        peak = max(run.peak_rss_bytes for run in runs)
        scores = self.held_out[side]
        return SideSummary(
            side=side,
            label=side_named(side).label,
            seconds_per_step=seconds,
            peak_rss_bytes=peak,
            tokenizer_peak_rss_bytes=max(run.tokenizer_peak_rss_bytes for run in runs),
            seconds_ratio=seconds / statistics.median(run.seconds_per_step for run in reference),
            rss_ratio=peak / max(run.peak_rss_bytes for run in reference),
            perplexity=scores.perplexity,
            perplexity_standard_error=scores.standard_error,
            comparison=compare(self.held_out[REFERENCE], scores),
        )

    def verdicts(self) -> list[Verdict]:
        if LEAN not in self.measured_sides:
            return [Verdict("A3X lean targets", "the lean side did not run", None)]
        lean = self.summary(LEAN)
        return [peak_verdict(lean, self.config), speed_verdict(lean), perplexity_verdict(lean)]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["held_out"] = {
            name: {**asdict(scores), "perplexity": scores.perplexity, "se": scores.standard_error}
            for name, scores in self.held_out.items()
        }
        data["summary"] = {side: asdict(self.summary(side)) for side in self.measured_sides}
        data["verdicts"] = [asdict(verdict) for verdict in self.verdicts()]
        return data


def compare(reference: HeldOut, candidate: HeldOut) -> Comparison:
    """Compare two sides' perplexities as the retraining gate compares an adapter with
    its incumbent: the noise band is NOISE_Z standard errors of the per-paragraph NLL
    differences, turned into a relative perplexity change."""
    from evaluators.gate import PerplexityPair, compare_perplexity

    pair = PerplexityPair(tuple(reference.nll), tuple(candidate.nll), tuple(reference.tokens))
    _, _, change, error = compare_perplexity(pair)
    noise = 1 - math.exp(-NOISE_Z * error)
    return Comparison(change=change, noise=noise, within_noise=abs(change) <= noise)


def peak_verdict(lean: SideSummary, config: BenchmarkConfig) -> Verdict:
    # The tokenizing child runs before the training process loads the model, so the
    # higher of the two peaks is the lean run's peak.
    peak = max(lean.peak_rss_bytes, lean.tokenizer_peak_rss_bytes)
    target = (
        f"A3X lean peak RSS at or under {TARGET_PEAK_BYTES / 1e9:.1f} GB "
        f"({TARGET_PEAK_BYTES / 2**20:.0f} MiB) at batch {TARGET_WORKLOAD[0]}, sequence "
        f"{TARGET_WORKLOAD[1]}"
    )
    measured = (
        f"{peak / 2**20:.0f} MiB (training process {lean.peak_rss_bytes / 2**20:.0f} MiB, "
        f"tokenizing child {lean.tokenizer_peak_rss_bytes / 2**20:.0f} MiB)"
    )
    if (config.batch, config.sequence) != TARGET_WORKLOAD:
        measured += f"; not judged, this run used batch {config.batch}, sequence {config.sequence}"
        return Verdict(target, measured, None)
    return Verdict(target, measured, peak <= TARGET_PEAK_BYTES)


def speed_verdict(lean: SideSummary) -> Verdict:
    return Verdict(
        f"A3X lean time per step at most {TARGET_SECONDS_RATIO} x PEFT fp32's",
        f"{lean.seconds_ratio:.3f} x ({lean.seconds_per_step:.3f} s/step)",
        lean.seconds_ratio <= TARGET_SECONDS_RATIO,
    )


def perplexity_verdict(lean: SideSummary) -> Verdict:
    comparison = lean.comparison
    return Verdict(
        "A3X lean held-out perplexity within noise of PEFT fp32's",
        f"{comparison.change:+.2%} against a noise band of +/-{comparison.noise:.2%} "
        f"({NOISE_Z:g} standard errors of the paired paragraph differences)",
        comparison.within_noise,
    )


# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=DEFAULTS.steps,
        help="timed optimizer steps per run, after one untimed warm-up step (default: %(default)s)",
    )
    parser.add_argument(
        "--batch",
        type=positive_int,
        default=DEFAULTS.batch,
        help="examples per optimizer step (default: %(default)s)",
    )
    parser.add_argument(
        "--sequence",
        type=positive_int,
        default=DEFAULTS.sequence,
        help="tokens per example; the corpus is packed to exactly this length "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--rank", type=positive_int, default=DEFAULTS.rank, help="LoRA rank (default: %(default)s)"
    )
    parser.add_argument(
        "--learning-rate",
        type=positive_float,
        default=DEFAULTS.learning_rate,
        help="peak learning rate of every side (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=DEFAULTS.threads,
        help="torch threads of every training run (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        "--repeat",
        type=positive_int,
        default=DEFAULTS.repeats,
        help="runs per side; the order of the sides reverses on every other repeat "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--sides",
        type=side_list,
        default=SIDE_NAMES,
        help=f"comma-separated sides to run, {REFERENCE} included (default: "
        f"{','.join(SIDE_NAMES)})",
    )
    add_model_arguments(parser)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{value} is not a positive finite number")
    return value


def side_list(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in SIDE_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown side {', '.join(unknown)}. Choose from {', '.join(SIDE_NAMES)}"
        )
    if REFERENCE not in names:
        raise argparse.ArgumentTypeError(
            f"{REFERENCE} is missing from {text!r}; every ratio is taken against it, so add it"
        )
    return names


def command(args: argparse.Namespace) -> int:
    from runtime.default_model import default_model_path

    config = replace(
        DEFAULTS,
        steps=args.steps,
        batch=args.batch,
        sequence=args.sequence,
        rank=args.rank,
        learning_rate=args.learning_rate,
        threads=args.threads,
        repeats=args.repeats,
    )
    model = args.model or default_model_path()
    result = run_benchmark(model, args.cache_dir, config, args.sides)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print_report(result)
    return 0


def print_report(result: TrainBenchmark) -> None:
    config = result.config
    base = result.held_out["base"]
    print(f"model:    {result.model}")
    print(f"machine:  {result.machine}")
    print(
        f"workload: {config.steps} timed optimizer steps after 1 warm-up step, batch "
        f"{config.batch} x accumulation {config.accumulation}, sequence {config.sequence}, "
        f"LoRA r={config.rank} alpha={config.alpha:g} on {','.join(config.targets)}, "
        f"lr {config.learning_rate:g}, {config.threads} threads, seed {config.seed}"
    )
    print(
        f"held-out: {len(base.nll)} {CORPUS_DOMAIN} paragraphs, {sum(base.tokens)} tokens, "
        "never trained on"
    )
    print_runs(result)
    for index, run in enumerate(result.runs, start=1):
        if run.load_average > config.threads + LOAD_MARGIN:
            print(
                f"warning: run {index} ({run.side}) ended at a load average of "
                f"{run.load_average:.1f} with {config.threads} training threads, so other "
                "processes competed for the CPU and its time per step is not reliable"
            )
    print()
    print_summary(result, base)
    print()
    for verdict in result.verdicts():
        outcome = {True: "met", False: "MISSED", None: "not judged"}[verdict.met]
        print(f"target {outcome}: {verdict.target}: {verdict.measured}")


def print_runs(result: TrainBenchmark) -> None:
    print(
        f"{'run':>3}  {'side':<{WIDTH}}  {'s/step':>7}  {'peak RSS MiB':>12}  "
        f"{'last-step loss':>14}  {'load avg':>8}"
    )
    for index, run in enumerate(result.runs, start=1):
        print(
            f"{index:>3}  {run.side:<{WIDTH}}  {run.seconds_per_step:>7.3f}  "
            f"{run.peak_rss_bytes / 2**20:>12.0f}  {run.last_loss:>14.4f}  "
            f"{run.load_average:>8.1f}"
        )


def print_summary(result: TrainBenchmark, base: HeldOut) -> None:
    print(
        f"{'side':<{WIDTH}}  {'s/step':>7}  {'x fp32':>6}  {'peak RSS MiB':>12}  {'x fp32':>6}  "
        f"{'held-out ppl +/- SE':>19}  {'vs fp32 (noise band)':>21}"
    )
    print(
        f"{'base':<{WIDTH}}  {'-':>7}  {'-':>6}  {'-':>12}  {'-':>6}  "
        f"{base.perplexity:>10.3f} +/- {base.standard_error:<5.3f}"
    )
    for side in result.sides:
        if side in result.skipped:
            print(f"{side:<{WIDTH}}  skipped: {result.skipped[side]}")
            continue
        row = result.summary(side)
        versus = f"{row.comparison.change:+.2%} (+/-{row.comparison.noise:.2%})"
        print(
            f"{side:<{WIDTH}}  {row.seconds_per_step:>7.3f}  {row.seconds_ratio:>6.3f}  "
            f"{row.peak_rss_bytes / 2**20:>12.0f}  {row.rss_ratio:>6.3f}  "
            f"{row.perplexity:>10.3f} +/- {row.perplexity_standard_error:<5.3f}  {versus:>21}"
        )


# The benchmark, in the parent process


def run_benchmark(
    model: Path, cache_dir: Path, config: BenchmarkConfig, sides: tuple[str, ...] = SIDE_NAMES
) -> TrainBenchmark:
    """Prepare the data once, train every side `config.repeats` times in alternating
    order, then evaluate every adapter on the held-out paragraphs. Each training run and
    the evaluation is a child process of its own."""
    from knowledge.corpus import split_corpus
    from lora.memory_plan import plan_memory, read_model_shape

    result = TrainBenchmark(str(model), machine_summary(), config, tuple(sides))
    reason = qlora_unavailable()
    if QLORA in sides and reason:
        result.skipped[QLORA] = reason

    with tempfile.TemporaryDirectory(prefix="a3x-bench-train-") as folder:
        scratch = Path(folder)
        split = split_corpus(corpus_folder())
        prepared = prepare(model, cache_dir, config, list(split.train), scratch)
        shape = read_model_shape(prepared.base_folder)
        plan = plan_memory(shape, config.rank, config.targets, config.batch, config.sequence)
        budget = BUDGET_FACTOR * plan.peak_bytes  # protects a shared machine, judges nothing

        # Training
        adapters: dict[str, Path] = {}
        for repeat in range(config.repeats):
            order = result.sides if repeat % 2 == 0 else result.sides[::-1]
            for name in order:
                if name in result.skipped:
                    continue
                output = scratch / f"adapter-{name}-{repeat}"
                run = run_side(side_named(name), model, prepared, config, output, repeat, budget)
                if isinstance(run, str):
                    result.skipped[name] = run
                    continue
                result.runs.append(run)
                adapters[f"{name}/{repeat}"] = output

        # Held-out evaluation
        scores = evaluate(prepared.base_folder, adapters, list(split.held_out), config, scratch)
    result.held_out["base"] = scores["base"]
    for name in result.measured_sides:
        repeats = [value for key, value in scores.items() if key.split("/")[0] == name]
        result.held_out[name] = mean_held_out(repeats)
    return result


def corpus_folder() -> Path:
    from daemon.taskbook import default_book_path

    return default_book_path().parent / "corpus" / CORPUS_DOMAIN


def qlora_unavailable() -> str:
    """Return why the NF4 side cannot run here, or "" when bitsandbytes is installed."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return f"bitsandbytes is not installed; {INSTALL_HINT}"
    return ""


def prepare(
    model: Path, cache_dir: Path, config: BenchmarkConfig, paragraphs: list[str], scratch: Path
) -> PreparedData:
    request = {
        "model": str(model),
        "cache_dir": str(cache_dir),
        "count": config.examples,
        "sequence": config.sequence,
        "paragraphs": paragraphs,
    }
    data = run_child("prepare", request, scratch, budget_bytes=None)
    sequences = [(list(ids), list(labels)) for ids, labels in data["sequences"]]
    return PreparedData(Path(data["base_folder"]), data["texts"], sequences)


def run_side(
    side: Side,
    model: Path,
    prepared: PreparedData,
    config: BenchmarkConfig,
    output: Path,
    repeat: int,
    budget: int,
) -> Run | str:
    """Train one side once. Return its run, or for the NF4 side why it was skipped."""
    spec = replace(
        a3x_spec(prepared, config, output),
        engine="peft" if side.engine == "qlora" else side.engine,
        precision=side.precision,
        checkpointing=side.checkpointing,
        base_gguf=str(model) if side.engine == "lean" else "",
        module_fraction=side.module_fraction,
    )
    if side.engine != "qlora":
        return run_trainer(side, spec, repeat, budget)
    try:
        return run_qlora(spec, config, repeat, output.parent, budget)
    except BenchmarkError as error:
        return f"{error}; check the bitsandbytes install ({INSTALL_HINT})"


def run_trainer(side: Side, spec: Any, repeat: int, budget: int) -> Run:
    from lora.child import run_training_child

    step_ends: dict[int, float] = {}

    def on_event(event: dict[str, Any]) -> None:
        # Only train.progress events carry "steps". The trainer sends one after steps
        # 1, 6, 11, ... and after the last one.
        if "steps" in event:
            step_ends[int(event["step"])] = time.perf_counter()

    result = run_training_child(spec, budget, on_event=on_event)
    return Run(
        side=side.name,
        repeat=repeat,
        seconds_per_step=seconds_per_timed_step(step_ends),
        peak_rss_bytes=result.peak_rss_bytes,
        tokenizer_peak_rss_bytes=result.tokenizer_peak_rss_bytes,
        last_loss=result.losses[-1],
        steps=result.steps,
        skipped_updates=result.skipped_updates,
        load_average=os.getloadavg()[0],
    )


def run_qlora(spec: Any, config: BenchmarkConfig, repeat: int, scratch: Path, budget: int) -> Run:
    request = {"spec": asdict(spec), "steps": config.total_steps}
    data = run_child("qlora", request, scratch, budget, module="bench.train")
    return Run(
        side=QLORA,
        repeat=repeat,
        seconds_per_step=seconds_per_timed_step(
            {int(step): end for step, end in data["step_ends"].items()}
        ),
        peak_rss_bytes=int(data["peak_rss_bytes"]),
        tokenizer_peak_rss_bytes=0,
        last_loss=float(data["losses"][-1]),
        steps=len(data["losses"]),
        skipped_updates=int(data["skipped_updates"]),
        load_average=os.getloadavg()[0],
    )


def evaluate(
    base_folder: Path,
    adapters: dict[str, Path],
    texts: list[str],
    config: BenchmarkConfig,
    scratch: Path,
) -> dict[str, HeldOut]:
    """Return the held-out NLL of the base (key "base") and of every adapter (its key)."""
    request = {
        "base_folder": str(base_folder),
        "adapters": {key: str(path) for key, path in adapters.items()},
        "texts": texts,
        "threads": config.threads,
    }
    data = run_child("evaluate", request, scratch, budget_bytes=None, module="bench.train")
    return {key: HeldOut(list(held["nll"]), list(held["tokens"])) for key, held in data.items()}


def mean_held_out(repeats: list[HeldOut]) -> HeldOut:
    """Average the per-paragraph NLL over a side's repeats (the paragraphs are the same)."""
    nll = [statistics.fmean(values) for values in zip(*(run.nll for run in repeats), strict=True)]
    return HeldOut(nll, repeats[0].tokens)


# Child process: NF4 QLoRA training


def train_qlora(request: dict[str, Any]) -> dict[str, Any]:
    """Train the NF4 QLoRA side with A3X's training loop and return the clock time at
    each progress event, the losses and the peak RSS."""
    import random

    import torch

    from lora.tokenizing import load_tokenizer, tokenize
    from lora.trainer import (
        TrainingResult,
        TrainingSpec,
        _check_finite,
        _train_loop,
        peak_rss_bytes,
    )

    spec = TrainingSpec.from_json(request["spec"])
    steps = int(request["steps"])
    # The trainer's order: seeds, tokenizer, model, then the token ids.
    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    torch.set_num_threads(spec.threads)
    tokenizer = load_tokenizer(spec.base_folder)
    model = qlora_model(spec)
    sequences = tokenize(spec, tokenizer)

    # NOTE: `_train_loop` is private to lora.trainer. The side calls it so that its batch
    # order, schedule, clipping and outlier rule are exactly those of the other sides.
    step_ends: dict[int, float] = {}

    def on_event(event: dict[str, Any]) -> None:
        if event.get("event") == "train.progress":
            step_ends[int(event["step"])] = time.perf_counter()

    assert spec.learning_rate is not None  # the benchmark always sets it
    result = TrainingResult(spec.output, steps, 0, spec.learning_rate, "configured")
    pad_id = tokenizer.pad_token_id
    _train_loop(model, sequences, spec, pad_id, spec.learning_rate, steps, result, on_event)
    _check_finite(model)
    model.save_pretrained(spec.output)
    return {
        "step_ends": step_ends,
        "losses": result.losses,
        "skipped_updates": result.skipped_updates,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def qlora_model(spec: Any) -> Any:
    """Load the dequantized base re-quantized to NF4 and wrap it for LoRA training, as
    PEFT's QLoRA guide does."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    # The folder's config.json still names the GGUF file's quantization. Without that
    # entry, the bitsandbytes config is the only quantization_config.
    model_config = AutoConfig.from_pretrained(spec.base_folder)
    if hasattr(model_config, "quantization_config"):
        delattr(model_config, "quantization_config")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    base = AutoModelForCausalLM.from_pretrained(
        spec.base_folder,
        config=model_config,
        quantization_config=quantization,
        dtype=torch.bfloat16,
        device_map="cpu",
    )
    # Casts the weights bitsandbytes left unquantized (embedding, norms) to float32 and
    # turns on gradient checkpointing.
    base = prepare_model_for_kbit_training(base)
    lora = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.targets),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    model.train()
    return model


# Child process: held-out evaluation


def evaluate_adapters(request: dict[str, Any]) -> dict[str, Any]:
    """Measure the held-out NLL of the float32 base alone and with each adapter."""
    from evaluators.gate import measure_perplexity
    from runtime.backend import ActiveAdapter
    from runtime.transformers_backend import TransformersBackend

    folder = Path(request["base_folder"])
    backend = TransformersBackend(folder, folder, threads=int(request["threads"]))
    texts = request["texts"]
    nll, tokens = measure_perplexity(backend.log_likelihood, texts)
    found = {"base": {"nll": nll, "tokens": tokens}}
    for key, path in request["adapters"].items():
        name = key.replace("/", "_").replace("-", "_")
        backend.set_adapters([ActiveAdapter(Path(path), 1.0, name=name)])
        nll, tokens = measure_perplexity(backend.log_likelihood, texts)
        found[key] = {"nll": nll, "tokens": tokens}
    return found


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.train",
        description="child process of `a3x bench train`, not meant to be run by hand",
    )
    parser.add_argument("--child", choices=("qlora", "evaluate"), required=True)
    parser.add_argument("request", type=Path, help="JSON request written by the benchmark")
    parser.add_argument("result", type=Path, help="JSON file to write the result to")
    args = parser.parse_args(argv)
    # bitsandbytes 0.50 tries to fetch a CPU kernel from the Hugging Face Hub when it
    # loads. The benchmark stays off the network, and training does not use that kernel
    # (it serves bitsandbytes' packed CPU inference format).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    request = json.loads(args.request.read_text())
    handler = train_qlora if args.child == "qlora" else evaluate_adapters
    args.result.write_text(json.dumps(handler(request)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
