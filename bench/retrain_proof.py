"""`a3x bench retrain-proof`: one retraining round teaches the default model facts it
does not know, and poisoned rounds are rejected by the gate without labels.

In a fresh home with the default task book and the almanac book (invented
facts about an island nation that no model has seen), on the default model:

1. a cycle of the almanac tasks: the base model's answers;
2. a clean round on the almanac domain: expected accepted, because held-out
   perplexity of the almanac corpus falls clearly;
3. a cycle of the almanac tasks: the adapter now answers (see the journal);
4. a round trained on the corpus with every name swapped (contradicting facts);
5. with `--poisons contradict,shuffle`, also a round on shuffled tokens.

The poisoned rounds are gated against the adapter accepted in round 2. The gate
uses only held-out text and the answers' own contradictions, never labels.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.generate import machine_description

DOMAIN = "almanac"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", type=Path, required=True, help="new, empty home folder to use")
    parser.add_argument("--threads", type=int, default=0, help="threads (0: all cores)")
    parser.add_argument(
        "--epochs", type=float, default=1.0, help="training epochs per round (default: 1)"
    )
    parser.add_argument(
        "--max-sequence",
        type=int,
        default=256,
        help="tokens per training example (default: 256, as retrain.max_sequence)",
    )
    parser.add_argument(
        "--poisons",
        default="contradict",
        help="poisoned rounds to run, comma-separated: contradict, shuffle (default: contradict)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def command(args: argparse.Namespace) -> int:
    poisons = [p.strip() for p in args.poisons.split(",") if p.strip()]
    unknown = set(poisons) - {"contradict", "shuffle"}
    if unknown:
        raise SystemExit(f"a3x: error: unknown poison {', '.join(sorted(unknown))}")
    result = run_proof(args.home, args.threads, args.epochs, poisons, args.max_sequence)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"machine: {result['machine']}")
    print(f"home: {result['home']}")
    for step in result["steps"]:
        print(_describe(step))
    return 0


def run_proof(
    home: Path, threads: int, epochs: float, poisons: list[str], max_sequence: int = 256
) -> dict[str, Any]:
    from daemon.config import Config, ModelConfig, RetrainConfig, TasksConfig
    from daemon.cycle import Agent, CycleRequest
    from daemon.taskbook import default_book_path

    if (home / "state.sqlite").exists() or (home / "journal").exists():
        # A cache/ folder alone is fine: it saves the minute of dequantizing the model.
        raise SystemExit(f"a3x: error: {home} already has cycles; give a new folder with --home")
    book = default_book_path()
    config = Config(
        home=home,
        model=ModelConfig(threads=threads),
        tasks=TasksConfig(books=(book, book.with_name("almanac.toml"))),
        retrain=RetrainConfig(epochs=epochs, max_sequence=max_sequence),
    )
    agent = Agent(config)
    steps = []
    try:
        for label, request in (
            ("base answers", CycleRequest(domain=DOMAIN)),
            ("clean round", CycleRequest(domain=DOMAIN, retrain=(DOMAIN,))),
            ("answers after", CycleRequest(domain=DOMAIN)),
            (
                "contradicting facts",
                CycleRequest(domain=DOMAIN, retrain=(DOMAIN,), poison="contradict"),
            ),
            ("shuffled tokens", CycleRequest(domain=DOMAIN, retrain=(DOMAIN,), poison="shuffle")),
        ):
            record = agent.run_cycle(request)
            step: dict[str, Any] = {"label": label, "cycle": record.cycle}
            if record.retrain and record.retrain.rounds:
                step["round"] = _round_summary(record.retrain.rounds[0])
            else:
                step["answers"] = {run.task_id: run.text for run in record.runs}
                step["adapters"] = sorted({a for run in record.runs for a in run.adapters})
            steps.append(step)
    finally:
        agent.close()
    return {"machine": machine_description(), "home": str(home), "steps": steps}


def _round_summary(result: dict[str, Any]) -> dict[str, Any]:
    evidence = result.get("gate", {}).get("evidence", [])
    own = next((r for r in evidence if r["role"] == "domain" and "perplexity" in r["metric"]), None)
    others = [r for r in evidence if r["role"] == "other"]
    worst = max(others, key=lambda r: r["change"], default=None)
    training = result.get("training", {})
    memory = result.get("memory", {})
    return {
        "outcome": result["outcome"],
        "message": result["message"],
        "adapter": result.get("adapter"),
        "incumbent": result.get("incumbent") or "base",
        "held_out_perplexity": [own["incumbent"], own["candidate"]] if own else None,
        "worst_other_domain": [worst["domain"], worst["change"]] if worst else None,
        "steps": training.get("steps"),
        "learning_rate": training.get("learning_rate"),
        "seconds_per_step": training.get("seconds_per_step"),
        "predicted_peak_bytes": memory.get("predicted", {}).get("peak_bytes"),
        "measured_peak_bytes": memory.get("measured_peak_bytes"),
        "examples": result.get("dataset", {}).get("examples"),
        "seconds": result.get("seconds"),
    }


def _describe(step: dict[str, Any]) -> str:
    if "round" not in step:
        adapters = ", ".join(step["adapters"]) or "base model"
        return (
            f"cycle {step['cycle']} ({step['label']}): {len(step['answers'])} answers by {adapters}"
        )
    summary = step["round"]
    line = f"cycle {step['cycle']} ({step['label']}): {summary['outcome']} - {summary['message']}"
    if summary.get("measured_peak_bytes"):
        line += (
            f"\n    {summary['steps']} steps, lr {summary['learning_rate']:.2e}, "
            f"{summary['seconds_per_step']:.2f} s/step, peak RSS predicted "
            f"{summary['predicted_peak_bytes'] / 2**30:.2f} GiB, measured "
            f"{summary['measured_peak_bytes'] / 2**30:.2f} GiB"
        )
    return line
