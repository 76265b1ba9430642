"""`a3x bench lean-memory`: the lean trainer's memory planner against measured peaks.

For each configuration (checkpointing on and off, batch 1 and 2, sequence
lengths 128 to 1024) it trains a few optimizer steps with the lean engine in
a child process and compares the child's peak RSS (VmHWM) with the
planner's prediction. The examples are almanac corpus text, long enough
that every sequence has exactly the configured length.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.train_step import default_cache_dir, positive_int

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
CORPUS = Path(__file__).resolve().parent.parent / "daemon" / "taskbook" / "corpus" / "almanac"


@dataclass(frozen=True)
class Point:
    checkpointing: bool
    batch: int
    sequence: int
    predicted_bytes: int
    measured_bytes: int
    tokenizer_predicted_bytes: int
    tokenizer_measured_bytes: int

    @property
    def error(self) -> float:
        return (self.predicted_bytes - self.measured_bytes) / self.measured_bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", default="1,2", help="batch sizes (default: 1,2)")
    parser.add_argument(
        "--sequences", default="128,256,512,1024", help="sequence lengths (default: 128 to 1024)"
    )
    parser.add_argument(
        "--checkpointing", default="on,off", help="checkpointing settings (default: on,off)"
    )
    parser.add_argument("--steps", type=positive_int, default=3, help="optimizer steps per run")
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: bundled)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="dequantized-model cache")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def command(args: argparse.Namespace) -> int:
    from runtime.default_model import default_model_path

    model = args.model or default_model_path()
    points = measure(
        Path(model),
        args.cache_dir or default_cache_dir(),
        [int(b) for b in args.batches.split(",")],
        [int(s) for s in args.sequences.split(",")],
        [flag.strip() == "on" for flag in args.checkpointing.split(",")],
        args.steps,
    )
    if args.json:
        rows = [{**p.__dict__, "error": p.error} for p in points]
        print(json.dumps({"points": rows}, indent=2))
        return 0
    print("| checkpointing | batch | sequence | predicted MiB | measured MiB | error |")
    print("|---|---:|---:|---:|---:|---:|")
    for p in points:
        print(
            f"| {'on' if p.checkpointing else 'off'} | {p.batch} | {p.sequence} | "
            f"{p.predicted_bytes / 2**20:,.0f} | {p.measured_bytes / 2**20:,.0f} | "
            f"{100 * p.error:+.1f}% |"
        )
    worst = max(abs(p.error) for p in points)
    tokenizer = points[0]
    print(
        f"\nworst error {100 * worst:.1f}%; tokenizing child predicted "
        f"{tokenizer.tokenizer_predicted_bytes / 2**20:,.0f} MiB, measured "
        f"{tokenizer.tokenizer_measured_bytes / 2**20:,.0f} MiB"
    )
    return 0


def measure(
    model: Path,
    cache_dir: Path,
    batches: list[int],
    sequences: list[int],
    checkpointing: list[bool],
    steps: int,
) -> list[Point]:
    from lora.child import run_training_child
    from lora.memory_plan import gguf_weight_bytes, plan_lean_memory, read_model_shape
    from lora.trainer import TrainingSpec
    from runtime.transformers_backend import dequantized_folder

    folder = dequantized_folder(model, cache_dir)
    shape = read_model_shape(folder)
    weights = gguf_weight_bytes(model, shape, 2)
    examples = corpus_examples(max(sequences))
    points = []
    with tempfile.TemporaryDirectory(prefix="a3x-lean-memory-") as scratch:
        for flag in checkpointing:
            for batch in batches:
                for sequence in sequences:
                    spec = TrainingSpec(
                        base_folder=str(folder),
                        base_gguf=str(model),
                        examples=examples,
                        output=str(Path(scratch) / f"{flag}-{batch}-{sequence}"),
                        batch_size=batch,
                        accumulation=1,
                        max_sequence=sequence,
                        epochs=steps * batch / len(examples),
                        learning_rate=1e-4,
                        precision="bfloat16",
                        checkpointing=flag,
                        engine="lean",
                    )
                    result = run_training_child(spec, 16 * 2**30)
                    plan = plan_lean_memory(shape, weights, 8, TARGETS, batch, sequence, 2, flag)
                    points.append(
                        Point(
                            flag,
                            batch,
                            sequence,
                            plan.training_bytes,
                            result.peak_rss_bytes,
                            plan.tokenizer_bytes,
                            result.tokenizer_peak_rss_bytes,
                        )
                    )
    return points


def corpus_examples(sequence: int, count: int = 6) -> list[dict[str, Any]]:
    """Return `count` corpus passages of about 0.9 words per token of `sequence`, so the
    tokenizer cuts every one at exactly `sequence` tokens."""
    words = " ".join(p.read_text() for p in sorted(CORPUS.glob("*.txt"))).split()
    size = max(64, sequence)
    if len(words) < count * size:
        raise ValueError(f"the almanac corpus has {len(words)} words, fewer than {count * size}")
    return [
        {"prompt": "", "completion": " ".join(words[i * size : (i + 1) * size])}
        for i in range(count)
    ]
