"""`a3x bench lean-compile`: the lean trainer's step, eager against torch.compile.

Two lean models of the same base and seed train side by side in one process:
one eager, one with every decoder layer wrapped in `torch.compile`. They take
the same batches, step by step, in alternating order, so machine noise hits
both alike. The result is the median ratio of compiled to eager step time
after the first steps (which include compiling), and dynamo's graph-break
counters, which tell whether anything was compiled at all.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.train_step import default_cache_dir, positive_int

WARM_UP_STEPS = 2  # not counted: compiling, allocator and autograd warm-up


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=positive_int, default=10, help="steps per side")
    parser.add_argument("--batch", type=positive_int, default=2, help="sequences per step")
    parser.add_argument("--sequence", type=positive_int, default=256, help="tokens per sequence")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads")
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: bundled)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="dequantized-model cache")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def command(args: argparse.Namespace) -> int:
    from runtime.default_model import default_model_path
    from runtime.transformers_backend import dequantized_folder

    model = Path(args.model or default_model_path())
    folder = dequantized_folder(model, args.cache_dir or default_cache_dir())
    result = measure(folder, model, args.steps, args.batch, args.sequence, args.threads)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for side in ("eager", "compiled"):
        times = ", ".join(f"{t:.2f}" for t in result[side])
        print(f"{side:9s} s per step: {times}")
    print(f"compiled / eager, median after {WARM_UP_STEPS} steps: {result['ratio']:.3f}")
    print(f"dynamo graph breaks: {result['graph_breaks'] or 'none'}")
    return 0


def measure(
    folder: Path, model: Path, steps: int, batch: int, sequence: int, threads: int
) -> dict[str, Any]:
    import torch
    from torch._dynamo.utils import counters

    from lora.lean import LeanSettings, build_lean_model

    torch.set_num_threads(threads)
    sides: dict[str, Any] = {}
    for side in ("eager", "compiled"):
        torch.manual_seed(0)
        lean = build_lean_model(folder, LeanSettings(dropout=0.0, checkpointing=True), model)
        if side == "compiled":
            layers: Any = lean.decoder.layers  # a ModuleList
            for index, layer in enumerate(layers):
                layers[index] = torch.compile(layer)
        trainable = [p for p in lean.parameters() if p.requires_grad]
        sides[side] = (lean, torch.optim.AdamW(trainable, lr=1e-4))
    vocab = int(lean.output.shape[0])
    generator = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {side: [] for side in sides}
    for step in range(steps):
        ids = torch.randint(0, vocab, (batch, sequence), generator=generator)
        order = list(sides) if step % 2 == 0 else list(reversed(sides))
        for side in order:
            lean, optimizer = sides[side]
            started = time.perf_counter()
            lean(ids, torch.ones_like(ids), ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times[side].append(time.perf_counter() - started)
    counted = slice(WARM_UP_STEPS, None)
    pairs = zip(times["compiled"][counted], times["eager"][counted], strict=True)
    ratios = [compiled / eager for compiled, eager in pairs]
    return {
        "eager": times["eager"],
        "compiled": times["compiled"],
        "ratio": statistics.median(ratios) if ratios else float("nan"),
        "graph_breaks": sum(counters["graph_break"].values()),
    }
