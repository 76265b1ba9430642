"""`a3x bench score-cost`: what label-free scoring adds to a cycle.

Two agents run the same task book on the same model in one process, each
in its own temporary home: one with every evaluator (consistency samples,
embeddings, knowledge graph, perplexity), one with only the execution
metrics. Their cycles alternate, and the first cycle of each is a warm-up
(it loads the model and, for the full agent, the embedding model once, as
a running service does). The result is the ratio of mean cycle wall times.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from statistics import fmean

from bench.generate import machine_description


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cycles", type=int, default=3, help="measured cycles per agent")
    parser.add_argument("--threads", type=int, default=0, help="inference threads (0: all cores)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def command(args: argparse.Namespace) -> int:
    result = run_benchmark(args.cycles, args.threads)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"machine: {result['machine']}")
    print(f"tasks per cycle: {result['tasks']}, measured cycles per agent: {result['cycles']}")
    print(f"execution metrics only: {result['baseline_seconds']:.2f} s per cycle")
    print(f"every evaluator:        {result['full_seconds']:.2f} s per cycle")
    print(f"ratio: {result['ratio']:.3f}")
    phases = ", ".join(f"{k} {v:.2f}" for k, v in result["full_phases"].items())
    print(f"full cycle phases (mean s): {phases}")
    return 0


def run_benchmark(cycles: int, threads: int) -> dict:
    from daemon.config import Config, ModelConfig, ScoreConfig
    from daemon.cycle import Agent

    with tempfile.TemporaryDirectory(prefix="a3x-score-cost-") as folder:
        root = Path(folder)
        base = Config(home=root / "full", model=ModelConfig(threads=threads))
        full = Agent(base)
        lean = Agent(replace(base, home=root / "lean", score=ScoreConfig(enabled=("execution",))))
        timings: dict[str, list[float]] = {"full": [], "lean": []}
        phases: list[dict[str, float]] = []
        tasks = 0
        for index in range(cycles + 1):
            order = [("full", full), ("lean", lean)]
            if index % 2 == 0:
                order.reverse()
            for name, agent in order:
                started = time.perf_counter()
                record = agent.run_cycle()
                elapsed = time.perf_counter() - started
                if index == 0:
                    continue  # warm-up: model and embedder loading
                timings[name].append(elapsed)
                tasks = len(record.runs)
                if name == "full":
                    phases.append(record.phase_seconds)
        full.close()
        lean.close()
    full_mean, lean_mean = fmean(timings["full"]), fmean(timings["lean"])
    phase_means = {key: fmean(p.get(key, 0.0) for p in phases) for key in phases[0]}
    return {
        "machine": machine_description(),
        "tasks": tasks,
        "cycles": cycles,
        "full_seconds": full_mean,
        "baseline_seconds": lean_mean,
        "ratio": full_mean / lean_mean,
        "full_cycles": timings["full"],
        "baseline_cycles": timings["lean"],
        "full_phases": phase_means,
    }
