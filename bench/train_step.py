"""`a3x bench train-step`: A3X's LoRA trainer against a plain transformers Trainer + PEFT.

Both variants train the same LoRA adapter (same base, target modules, rank,
alpha, no dropout) on the same packed token sequences. They share the
optimizer settings too: AdamW at a fixed learning rate, cosine decay after
the same warm-up, gradient accumulation and clipping, float32 on the CPU.
Only the training loop differs: A3X's (`lora.trainer`, run by
`lora.child.run_training_child`) against `transformers.Trainer`. The result
is the ratio A3X / baseline of the time per optimizer step and of the peak
RSS, next to the memory planner's prediction.

Every training run is a child process of its own, so its peak RSS
(ru_maxrss) is its alone, and its first optimizer step (allocator and
autograd warm-up) is not timed. The runs alternate, A3X first, so that
machine noise hits both variants alike. The parent stays small on purpose:
on Linux, the ru_maxrss of a process started by `subprocess` includes its
parent's peak RSS at the time of the start. Dequantizing the base and
tokenizing the corpus therefore run in a child process too.

`python -m bench.train_step --child prepare|baseline REQUEST.json RESULT.json`
is the entry point of those child processes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.generate import machine_description
from lora import LoraError

VARIANTS = ("a3x", "baseline")
# A run above this multiple of the planner's prediction is killed. The limit protects
# a shared machine and does not judge the planner.
BUDGET_FACTOR = 4
# Window lengths tried on each side of the expected one when a decoded window
# re-encodes to a different number of tokens.
FIT_TRIES = 8


class BenchmarkError(LoraError):
    """The training benchmark could not prepare its data or run one of its variants."""


@dataclass(frozen=True)
class BenchmarkConfig:
    steps: int = 8  # timed optimizer steps, after one warm-up step
    batch: int = 1
    sequence: int = 256  # tokens per example
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    accumulation: int = 4
    learning_rate: float = 2e-4
    warmup_fraction: float = 0.1
    clip_norm: float = 1.0
    threads: int = 2
    repeats: int = 2
    seed: int = 0

    @property
    def total_steps(self) -> int:
        return self.steps + 1

    @property
    def examples(self) -> int:
        """Examples for exactly one pass of `total_steps` optimizer steps."""
        return self.total_steps * self.batch * self.accumulation

    @property
    def warmup_steps(self) -> int:
        # The A3X trainer's rule, so that both learning-rate schedules are the same.
        return max(1, int(self.total_steps * self.warmup_fraction))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BenchmarkConfig:
        return cls(**{**data, "targets": tuple(data["targets"])})


@dataclass
class Measurement:
    variant: str  # "a3x" or "baseline"
    repeat: int
    seconds_per_step: float  # mean over the timed optimizer steps
    peak_rss_bytes: int  # ru_maxrss of the child process
    last_loss: float  # mean loss over the micro-batches of the last optimizer step
    steps: int  # optimizer steps run, the warm-up step included
    skipped_updates: int = 0  # updates the A3X trainer skipped as outliers
    load_average: float = 0.0  # the machine's 1-minute load average when the run ended


@dataclass
class VariantSummary:
    seconds_per_step: float  # median over the repeats
    peak_rss_bytes: int  # maximum over the repeats
    last_loss: float  # median over the repeats


@dataclass
class TrainStepBenchmark:
    model: str
    machine: str
    config: BenchmarkConfig
    plan: dict[str, int]  # lora.memory_plan.MemoryPlan.to_json() for this configuration
    parent_peak_rss_bytes: int  # a child's ru_maxrss below this is the parent's, not its own
    measurements: list[Measurement] = field(default_factory=list)

    def summary(self, variant: str) -> VariantSummary:
        runs = [m for m in self.measurements if m.variant == variant]
        if not runs:
            raise BenchmarkError(
                f"no measurement of the variant {variant!r}. Expected one of {', '.join(VARIANTS)}"
            )
        return VariantSummary(
            seconds_per_step=statistics.median(m.seconds_per_step for m in runs),
            peak_rss_bytes=max(m.peak_rss_bytes for m in runs),
            last_loss=statistics.median(m.last_loss for m in runs),
        )

    @property
    def seconds_ratio(self) -> float:
        return self.summary("a3x").seconds_per_step / self.summary("baseline").seconds_per_step

    @property
    def rss_ratio(self) -> float:
        return self.summary("a3x").peak_rss_bytes / self.summary("baseline").peak_rss_bytes

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["summary"] = {variant: asdict(self.summary(variant)) for variant in VARIANTS}
        data["ratios"] = {"seconds_per_step": self.seconds_ratio, "peak_rss": self.rss_ratio}
        return data


@dataclass(frozen=True)
class PreparedData:
    base_folder: Path  # Hugging Face folder of the dequantized base
    texts: list[str]  # the A3X trainer's completions, each with an empty prompt
    sequences: list[tuple[list[int], list[int]]]  # (input ids, labels) the A3X trainer builds


# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = BenchmarkConfig()
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=defaults.steps,
        help="timed optimizer steps per run, after one untimed warm-up step",
    )
    parser.add_argument(
        "--batch", type=positive_int, default=defaults.batch, help="examples per micro-batch"
    )
    parser.add_argument(
        "--sequence",
        type=positive_int,
        default=defaults.sequence,
        help="tokens per example (the corpus is packed to exactly this length)",
    )
    parser.add_argument("--rank", type=positive_int, default=defaults.rank, help="LoRA rank")
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=defaults.repeats,
        help="runs per variant, alternating A3X and baseline",
    )
    add_model_arguments(parser)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options that training benchmarks share: the model, its cache, JSON output."""
    parser.add_argument("--model", type=Path, help="GGUF file (default: the bundled Gemma 3 270M)")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=default_cache_dir(),
        help="folder for the dequantized base, reused by later runs (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1; give a count of 1 or more")
    return value


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "a3x" / "bench-cache"


def command(args: argparse.Namespace) -> int:
    from runtime.default_model import default_model_path

    config = BenchmarkConfig(
        steps=args.steps,
        batch=args.batch,
        sequence=args.sequence,
        rank=args.rank,
        repeats=args.repeats,
    )
    model = args.model or default_model_path()
    result = run_benchmark(model, args.cache_dir, config)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print_report(result)
    return 0


def print_report(result: TrainStepBenchmark) -> None:
    config, mib = result.config, 2**20
    print(f"model:    {result.model}")
    print(f"machine:  {result.machine}")
    print(
        f"workload: {config.steps} timed optimizer steps after 1 warm-up step, batch "
        f"{config.batch} x accumulation {config.accumulation}, sequence {config.sequence}, "
        f"LoRA r={config.rank} alpha={config.alpha:g} on {','.join(config.targets)}, "
        f"lr {config.learning_rate:g}, float32, {config.threads} threads"
    )

    print(
        f"{'run':>3}  {'variant':<8}  {'s/step':>7}  {'peak RSS MiB':>12}  {'last-step loss':>14}"
        f"  {'load avg':>8}"
    )
    for index, run in enumerate(result.measurements, start=1):
        print(
            f"{index:>3}  {run.variant:<8}  {run.seconds_per_step:>7.3f}  "
            f"{run.peak_rss_bytes / mib:>12.0f}  {run.last_loss:>14.4f}  {run.load_average:>8.1f}"
        )

    a3x, baseline = result.summary("a3x"), result.summary("baseline")
    for name, summary in (("A3X trainer", a3x), ("transformers Trainer", baseline)):
        print(
            f"{name + ':':<22}median {summary.seconds_per_step:.3f} s/step, max peak RSS "
            f"{summary.peak_rss_bytes / mib:.0f} MiB, last-step loss {summary.last_loss:.4f}"
        )
    print(
        f"ratio A3X/baseline: time per step {result.seconds_ratio:.3f}, "
        f"peak RSS {result.rss_ratio:.3f}"
    )

    predicted = result.plan["peak_bytes"]
    print(
        f"planner's predicted peak: {predicted / mib:.0f} MiB; measured/predicted: A3X "
        f"{a3x.peak_rss_bytes / predicted:.2f}, baseline {baseline.peak_rss_bytes / predicted:.2f}"
    )
    floor = result.parent_peak_rss_bytes
    if min(a3x.peak_rss_bytes, baseline.peak_rss_bytes) <= floor:
        print(
            f"warning: a measured peak is at or below this process's own peak of "
            f"{floor / mib:.0f} MiB, which a child's ru_maxrss includes, so it may not be "
            "the child's own"
        )


# The benchmark, in the parent process


def run_benchmark(model: Path, cache_dir: Path, config: BenchmarkConfig) -> TrainStepBenchmark:
    """Prepare the data once, then run the A3X trainer and the baseline alternately
    `config.repeats` times each, every run in a child process of its own."""
    from lora.memory_plan import plan_memory, read_model_shape

    with tempfile.TemporaryDirectory(prefix="a3x-bench-train-step-") as folder:
        scratch = Path(folder)
        prepared = prepare(model, cache_dir, config, scratch)
        shape = read_model_shape(prepared.base_folder)
        plan = plan_memory(shape, config.rank, config.targets, config.batch, config.sequence)
        budget = BUDGET_FACTOR * plan.peak_bytes
        result = TrainStepBenchmark(
            model=str(model),
            machine=machine_summary(),
            config=config,
            plan=plan.to_json(),
            parent_peak_rss_bytes=0,
        )
        for repeat in range(config.repeats):
            result.measurements.append(run_a3x(prepared, config, scratch, repeat, budget))
            result.measurements.append(run_baseline(prepared, config, scratch, repeat, budget))
    result.parent_peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def machine_summary() -> str:
    import psutil

    memory = psutil.virtual_memory().total / 2**30
    return f"{machine_description()}, {os.cpu_count()} cores, {memory:.1f} GiB"


def prepare(model: Path, cache_dir: Path, config: BenchmarkConfig, scratch: Path) -> PreparedData:
    request = {
        "model": str(model),
        "cache_dir": str(cache_dir),
        "count": config.examples,
        "sequence": config.sequence,
    }
    data = run_child("prepare", request, scratch, budget_bytes=None)
    sequences = [(list(ids), list(labels)) for ids, labels in data["sequences"]]
    return PreparedData(Path(data["base_folder"]), data["texts"], sequences)


def run_a3x(
    prepared: PreparedData, config: BenchmarkConfig, scratch: Path, repeat: int, budget: int
) -> Measurement:
    from lora.child import run_training_child

    spec = a3x_spec(prepared, config, scratch / f"a3x-adapter-{repeat}")
    step_ends: dict[int, float] = {}

    def on_event(event: dict[str, Any]) -> None:
        # Only train.progress events carry "steps". The A3X trainer sends one after steps
        # 1, 6, 11, ... and after the last one. The clock is read when an event arrives, so
        # the pipe's delay is in both end times and cancels out.
        if "steps" in event:
            step_ends[int(event["step"])] = time.perf_counter()

    result = run_training_child(spec, budget, on_event=on_event)
    return Measurement(
        variant="a3x",
        repeat=repeat,
        seconds_per_step=seconds_per_timed_step(step_ends),
        peak_rss_bytes=result.peak_rss_bytes,
        last_loss=result.losses[-1],
        steps=result.steps,
        skipped_updates=result.skipped_updates,
        load_average=os.getloadavg()[0],
    )


def a3x_spec(prepared: PreparedData, config: BenchmarkConfig, output: Path) -> Any:
    from lora.trainer import TrainingSpec

    return TrainingSpec(
        base_folder=str(prepared.base_folder),
        examples=[{"prompt": "", "completion": text} for text in prepared.texts],
        output=str(output),
        rank=config.rank,
        alpha=config.alpha,
        dropout=0.0,
        targets=config.targets,
        batch_size=config.batch,
        accumulation=config.accumulation,
        max_sequence=config.sequence,
        epochs=1.0,  # the texts are exactly total_steps optimizer steps' worth
        learning_rate=config.learning_rate,
        warmup_fraction=config.warmup_fraction,
        clip_norm=config.clip_norm,
        seed=config.seed,
        threads=config.threads,
        engine="peft",  # the same float32 PEFT model as the Trainer side
    )


def run_baseline(
    prepared: PreparedData, config: BenchmarkConfig, scratch: Path, repeat: int, budget: int
) -> Measurement:
    request = {
        "config": asdict(config),
        "base_folder": str(prepared.base_folder),
        "sequences": prepared.sequences,
        "output": str(scratch / f"baseline-output-{repeat}"),
    }
    data = run_child("baseline", request, scratch, budget_bytes=budget)
    return Measurement(
        variant="baseline",
        repeat=repeat,
        seconds_per_step=seconds_per_timed_step(
            {int(step): end for step, end in data["step_ends"].items()}
        ),
        peak_rss_bytes=int(data["peak_rss_bytes"]),
        last_loss=float(data["losses"][-1]),
        steps=len(data["step_ends"]),
        load_average=os.getloadavg()[0],
    )


def seconds_per_timed_step(step_ends: dict[int, float]) -> float:
    """Return the mean time of the steps after the first, from the clock times at the end
    of step 1 and of the last step (keys are 1-based step numbers)."""
    if 1 not in step_ends or len(step_ends) < 2:
        raise BenchmarkError(
            f"step end times are missing: got steps {sorted(step_ends)}, need step 1 and a "
            "later one; run at least 1 timed step"
        )
    last = max(step_ends)
    return (step_ends[last] - step_ends[1]) / (last - 1)


def run_child(
    role: str,
    request: dict[str, Any],
    scratch: Path,
    budget_bytes: int | None,
    module: str = "bench.train_step",
) -> dict[str, Any]:
    """Run `python -m MODULE --child ROLE` and return the JSON it writes.

    The child's stderr goes to a file, because a full pipe would block it."""
    request_path = scratch / f"{role}-request.json"
    result_path = scratch / f"{role}-result.json"
    stderr_path = scratch / f"{role}-stderr.txt"
    request_path.write_text(json.dumps(request))
    result_path.unlink(missing_ok=True)
    with stderr_path.open("w") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-m", module, "--child", role] + [str(request_path), str(result_path)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, "TQDM_DISABLE": "1"},
        )
        exceeded = wait_within_budget(child, budget_bytes)
    if exceeded:
        raise BenchmarkError(
            f"the {role} child was killed because {exceeded}. Lower --batch or --sequence"
        )
    if child.returncode != 0 or not result_path.exists():
        tail = " | ".join(stderr_path.read_text().strip().splitlines()[-3:]) or "no output"
        raise BenchmarkError(f"the {role} child exited with {child.returncode}: {tail}")
    data: dict[str, Any] = json.loads(result_path.read_text())
    return data


def wait_within_budget(child: subprocess.Popen, budget_bytes: int | None) -> str:
    """Wait for the child and kill it when its RSS exceeds the budget. Return why it was
    killed, or "" when it ended by itself."""
    import psutil

    process = psutil.Process(child.pid)
    while child.poll() is None:
        try:
            rss = process.memory_info().rss
        except psutil.NoSuchProcess:
            break
        if budget_bytes is not None and rss > budget_bytes:
            child.kill()
            child.wait()
            return f"its RSS of {rss / 2**30:.2f} GiB exceeded {budget_bytes / 2**30:.2f} GiB"
        time.sleep(0.2)
    child.wait()
    return ""


# Child process: the data


def prepare_data(request: dict[str, Any]) -> dict[str, Any]:
    """Dequantize the base (cached in the cache folder), pack the corpus into texts and
    return them with the token sequences the A3X trainer builds from them.

    The corpus is the request's "paragraphs" when given, else every domain corpus."""
    from transformers import AutoTokenizer

    from lora.tokenizing import tokenize
    from lora.trainer import TrainingSpec
    from runtime.transformers_backend import dequantized_folder

    folder = dequantized_folder(Path(request["model"]), Path(request["cache_dir"]))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    count, sequence = int(request["count"]), int(request["sequence"])
    found = request["paragraphs"] if "paragraphs" in request else corpus_paragraphs()
    texts = pack_texts(tokenizer, found, count, sequence)

    # The A3X trainer's own tokenization, so the baseline trains on the same token ids.
    examples = [{"prompt": "", "completion": text} for text in texts]
    spec = TrainingSpec(
        base_folder=str(folder), examples=examples, output="", max_sequence=sequence
    )
    sequences = tokenize(spec, tokenizer)
    lengths = sorted({len(ids) for ids, _ in sequences})
    if len(sequences) != count or lengths != [sequence]:
        raise BenchmarkError(
            f"packing produced {len(sequences)} sequences of lengths {lengths}, expected "
            f"{count} of {sequence} tokens; the tokenizer of {folder} does not re-encode its "
            "decoded text stably, so try another --sequence"
        )
    return {"base_folder": str(folder), "texts": texts, "sequences": sequences}


def corpus_paragraphs() -> list[str]:
    """Return the paragraphs of every domain corpus of the default task book, in name order."""
    from daemon.taskbook import default_book_path
    from knowledge.corpus import paragraphs

    root = default_book_path().parent / "corpus"
    found: list[str] = []
    for domain in sorted(path for path in root.iterdir() if path.is_dir()):
        found += paragraphs(domain)
    return found


def pack_texts(tokenizer: Any, paragraphs: list[str], count: int, sequence: int) -> list[str]:
    """Cut the paragraphs, joined into one token stream, into `count` consecutive texts that
    each become exactly `sequence` tokens in the A3X trainer (special tokens + text + EOS).
    The stream wraps around when the corpus is shorter than the request."""
    stream = tokenizer("\n\n".join(paragraphs), add_special_tokens=False)["input_ids"]
    expected = sequence - tokenizer.num_special_tokens_to_add() - 1  # the trainer appends EOS
    if expected < 1 or expected + FIT_TRIES > len(stream):
        raise BenchmarkError(
            f"cannot pack sequences of {sequence} tokens from a corpus of {len(stream)} "
            f"tokens; choose --sequence between {tokenizer.num_special_tokens_to_add() + 2} "
            f"and {len(stream) - FIT_TRIES}"
        )
    texts, start = [], 0
    for _ in range(count):
        text, used = fit_window(tokenizer, stream, start, expected, sequence)
        texts.append(text)
        start = (start + used) % len(stream)
    return texts


def fit_window(
    tokenizer: Any, stream: list[int], start: int, expected: int, sequence: int
) -> tuple[str, int]:
    """Decode the window of the stream at `start` whose text encodes back to `sequence`
    tokens with the special tokens and EOS. Return the text and the window length.

    Decoding and encoding again can merge or split tokens at the cut, so window lengths
    near `expected` are tried in turn."""
    for offset in range(FIT_TRIES + 1):
        for length in dict.fromkeys((expected - offset, expected + offset)):
            if length < 1:
                continue
            window = [stream[(start + i) % len(stream)] for i in range(length)]
            text = tokenizer.decode(window)
            if len(tokenizer(text, add_special_tokens=True)["input_ids"]) + 1 == sequence:
                return text, length
    raise BenchmarkError(
        f"no window of {expected} +/- {FIT_TRIES} tokens at stream position {start} encodes "
        f"back to {sequence} tokens; try another --sequence"
    )


# Child process: the baseline


def train_baseline(request: dict[str, Any]) -> dict[str, Any]:
    """Train with a plain transformers Trainer on a PEFT model and return the clock time
    at the end of every optimizer step, the logged losses and the peak RSS."""
    import torch
    from transformers import AutoTokenizer, Trainer, default_data_collator

    from lora.trainer import peak_rss_bytes

    config = BenchmarkConfig.from_json(request["config"])
    torch.set_num_threads(config.threads)
    # The A3X trainer seeds before loading too, so both adapters start from the same weights.
    torch.manual_seed(config.seed)
    # The token ids come ready, but a training script holds its tokenizer as the A3X trainer
    # does, and for Gemma 3's 262,144-token vocabulary it is a sizable part of the peak RSS.
    tokenizer = AutoTokenizer.from_pretrained(request["base_folder"])
    model = baseline_model(request["base_folder"], config)
    dataset = [
        {
            "input_ids": torch.tensor(ids),
            "attention_mask": torch.ones(len(ids), dtype=torch.long),
            "labels": torch.tensor(labels),
        }
        for ids, labels in request["sequences"]
    ]
    clock = step_clock()
    trainer = Trainer(
        model=model,
        args=baseline_arguments(config, request["output"]),
        train_dataset=dataset,  # type: ignore[arg-type]  # a list is a map-style dataset
        data_collator=default_data_collator,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    trainer.train()
    return {
        "step_ends": clock.step_ends,
        "losses": clock.losses,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def baseline_model(base_folder: str, config: BenchmarkConfig) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    # NOTE: dequantized_folder() keeps the GGUF file's quantization_config in config.json
    # although the saved weights are float32, and transformers.Trainer rejects a model marked
    # as GGUF-quantized. Without the marker, loading gives the same modules and logits.
    model_config = AutoConfig.from_pretrained(base_folder)
    if hasattr(model_config, "quantization_config"):
        delattr(model_config, "quantization_config")
    base = AutoModelForCausalLM.from_pretrained(
        base_folder, config=model_config, dtype=torch.float32
    )
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,  # type: ignore[arg-type]  # PEFT accepts a float
        lora_dropout=0.0,
        target_modules=list(config.targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, lora)


def baseline_arguments(config: BenchmarkConfig, output: str) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output,
        per_device_train_batch_size=config.batch,
        gradient_accumulation_steps=config.accumulation,
        max_steps=config.total_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_steps,
        weight_decay=0.0,
        max_grad_norm=config.clip_norm,
        # The A3X trainer's torch.optim.AdamW; transformers 5 defaults to the fused one.
        optim="adamw_torch",
        seed=config.seed,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def step_clock() -> Any:
    """Return a Trainer callback that stores the clock time at the end of every optimizer
    step (by 1-based step number) and every logged training loss."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.step_ends: dict[int, float] = {}
            self.losses: list[float] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.step_ends[int(state.global_step)] = time.perf_counter()

        def on_log(
            self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any
        ) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepClock()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.train_step",
        description="child process of `a3x bench train-step`; not meant to be run by hand",
    )
    parser.add_argument("--child", choices=("prepare", "baseline"), required=True)
    parser.add_argument("request", type=Path, help="JSON request written by the benchmark")
    parser.add_argument("result", type=Path, help="JSON file to write the result to")
    args = parser.parse_args(argv)
    request = json.loads(args.request.read_text())
    handler = prepare_data if args.child == "prepare" else train_baseline
    args.result.write_text(json.dumps(handler(request)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
