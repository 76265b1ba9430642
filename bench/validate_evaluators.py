"""`a3x bench evaluators`: evidence that each label-free score means something.

- coherence: precision and recall of contradiction detection on answer sets
  with planted contradictions (tests/data/coherence_a.json, used while
  writing the fact patterns, and coherence_b.json, written separately and
  never used for tuning);
- diversity: entropy, distinct-2 and duplicate rate of a collapsed model
  (one answer repeated) against varied answers (sentences of the shipped
  reference corpora);
- efficiency: share of tasks flagged on flat noise (false positives) and on
  an injected slowdown of 3% per cycle (detection rate);
- consistency: agreement of paraphrased sample sets against random ones,
  with the ROC AUC of agreement as a separator.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = {
    "a (tuning)": ROOT / "tests" / "data" / "coherence_a.json",
    "b (held out, then used)": ROOT / "tests" / "data" / "coherence_b.json",
    "c (held out)": ROOT / "tests" / "data" / "coherence_c.json",
}


# coherence


def detected_pairs(answers: Sequence[dict]) -> set[tuple[int, int]]:
    """Index pairs of answers whose extracted facts contradict, via the real pipeline."""
    from daemon.state import StateStore
    from evaluators.coherence import find_contradictions
    from knowledge.extract import PatternExtractor
    from knowledge.graph import KnowledgeGraph, Provenance

    store = StateStore(Path(":memory:"))
    graph = KnowledgeGraph(store.connection)
    extractor = PatternExtractor()
    owner: dict[int, int] = {}
    for index, answer in enumerate(answers):
        facts = extractor.extract(answer["text"], answer["task_id"])
        provenance = Provenance(None, 1, answer["task_id"], answer["domain"])
        for fact_id in graph.add_facts(provenance, facts):
            owner[fact_id] = index
    pairs: set[tuple[int, int]] = set()
    for contradiction in find_contradictions(graph.facts()):
        indices = sorted({owner[fact.id] for fact in contradiction.facts})
        pairs.update(combinations(indices, 2))
    store.close()
    return pairs


def coherence_validation(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    planted_total = detected_total = correct = 0
    misses, false_alarms = [], []
    for answer_set in data["answer_sets"]:
        planted = {tuple(pair) for pair in answer_set["contradictions"]}
        found = detected_pairs(answer_set["answers"])
        planted_total += len(planted)
        detected_total += len(found)
        correct += len(planted & found)
        texts = [a["text"] for a in answer_set["answers"]]
        misses += [(texts[i], texts[j]) for i, j in sorted(planted - found)]
        false_alarms += [(texts[i], texts[j]) for i, j in sorted(found - planted)]
    return {
        "sets": len(data["answer_sets"]),
        "planted": planted_total,
        "detected": detected_total,
        "correct": correct,
        "precision": correct / detected_total if detected_total else 0.0,
        "recall": correct / planted_total if planted_total else 0.0,
        "misses": misses,
        "false_alarms": false_alarms,
    }


# diversity


def corpus_sentences() -> list[str]:
    """Return the sentences of the default task book's corpora (other books' corpora,
    such as the almanac's, stay out so that the validation figures do not move)."""
    from daemon.taskbook import default_book_path, load_book

    folders = [d.reference_corpus for d in load_book(default_book_path()).domains.values()]
    sentences = []
    for file in sorted(f for folder in folders if folder for f in folder.glob("*.txt")):
        text = file.read_text(encoding="utf-8")
        sentences += [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) > 4]
    return sentences


def diversity_validation(embedder: Any, answers_per_cycle: int = 46, cycles: int = 3) -> dict:
    from daemon.records import Run
    from evaluators.diversity import cluster_entropy, distinct_n, duplicate_rate

    varied_pool = corpus_sentences()
    rng = random.Random(0)
    varied = rng.sample(varied_pool, min(len(varied_pool), answers_per_cycle * cycles))
    collapsed = ["The capital of France is Paris."] * (answers_per_cycle * cycles)
    half = varied[: len(varied) // 2] + collapsed[: len(varied) - len(varied) // 2]
    rng.shuffle(half)
    result = {}
    for name, texts in (("varied", varied), ("half collapsed", half), ("collapsed", collapsed)):
        entropy, clusters = cluster_entropy(embedder.encode(texts), 8)
        runs = [Run.of_text(f"t{i}", "d", text) for i, text in enumerate(texts[:answers_per_cycle])]
        result[name] = {
            "answers": len(texts),
            "entropy": entropy,
            "clusters": clusters,
            "distinct_2": distinct_n(texts[:answers_per_cycle], 2),
            "duplicate_rate": duplicate_rate(runs),
        }
    return result


# efficiency


def efficiency_validation(tasks: int = 40, cycles: int = 20, alpha: float = 0.05) -> dict:
    from evaluators.efficiency import trend

    rng = np.random.default_rng(0)
    cycle_numbers = list(range(1, cycles + 1))
    results = {}
    for name, growth in (
        ("flat noise", 0.0),
        ("slowdown 3%/cycle", 0.03),
        ("slowdown 1%/cycle", 0.01),
    ):
        flagged_up = flagged_down = 0
        for _ in range(tasks):
            base = rng.uniform(0.3, 2.0)
            values = [
                base * (1 + growth * (c - 1)) * (1 + rng.normal(0, 0.08)) for c in cycle_numbers
            ]
            verdict = trend(cycle_numbers, values, alpha)["trend"]
            flagged_up += verdict > 0
            flagged_down += verdict < 0
        results[name] = {
            "tasks": tasks,
            "rising": flagged_up,
            "falling": flagged_down,
            "rising_share": flagged_up / tasks,
        }
    return results


# consistency

FACTS = [
    ("Paris", "France"),
    ("Rome", "Italy"),
    ("Tokyo", "Japan"),
    ("Ottawa", "Canada"),
    ("Cairo", "Egypt"),
    ("Lima", "Peru"),
    ("Oslo", "Norway"),
    ("Madrid", "Spain"),
    ("Berlin", "Germany"),
    ("Nairobi", "Kenya"),
    ("Hanoi", "Vietnam"),
    ("Quito", "Ecuador"),
]
PARAPHRASES = (
    "{city} is the capital of {country}.",
    "The capital of {country} is {city}.",
    "{country}'s capital city is {city}.",
)


def consistency_validation(embedder: Any) -> dict:
    from sklearn.metrics import roc_auc_score

    from evaluators.consistency import agreement

    rng = random.Random(0)
    consistent = [[p.format(city=c, country=k) for p in PARAPHRASES] for c, k in FACTS]
    scattered = []
    for _ in FACTS:
        picks = rng.sample(FACTS, 3)
        scattered.append([rng.choice(PARAPHRASES).format(city=c, country=k) for c, k in picks])
    scores_consistent = [agreement(t, embedder.encode(t)) for t in consistent]
    scores_random = [agreement(t, embedder.encode(t)) for t in scattered]
    labels = [1] * len(scores_consistent) + [0] * len(scores_random)
    auc = roc_auc_score(labels, scores_consistent + scores_random)
    return {
        "consistent_mean": float(np.mean(scores_consistent)),
        "random_mean": float(np.mean(scores_random)),
        "consistent_min": float(np.min(scores_consistent)),
        "random_max": float(np.max(scores_random)),
        "auc": float(auc),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def command(args: argparse.Namespace) -> int:
    from knowledge.embed import shared_embedder

    embedder = shared_embedder()
    results = {
        "coherence": {
            name: coherence_validation(path) for name, path in FIXTURES.items() if path.exists()
        },
        "diversity": diversity_validation(embedder),
        "efficiency": efficiency_validation(),
        "consistency": consistency_validation(embedder),
    }
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
        return 0
    print("coherence (contradiction pairs):")
    for name, row in results["coherence"].items():
        print(
            f"  fixture {name}: precision {row['precision']:.3f}, recall {row['recall']:.3f} "
            f"({row['correct']} of {row['planted']} planted found, {row['detected']} detected)"
        )
        for first, second in row["misses"]:
            print(f"    missed: {first!r} / {second!r}")
        for first, second in row["false_alarms"]:
            print(f"    false alarm: {first!r} / {second!r}")
    print("diversity:")
    for name, row in results["diversity"].items():
        print(
            f"  {name}: entropy {row['entropy']:.3f} ({row['clusters']} clusters), "
            f"distinct-2 {row['distinct_2']:.3f}, duplicate rate {row['duplicate_rate']:.3f}"
        )
    print("efficiency (Mann-Kendall, alpha 0.05, 8% noise):")
    for name, row in results["efficiency"].items():
        print(
            f"  {name}: {row['rising']} of {row['tasks']} tasks flagged rising, "
            f"{row['falling']} falling"
        )
    row = results["consistency"]
    print(
        f"consistency: paraphrase sets {row['consistent_mean']:.3f} (min "
        f"{row['consistent_min']:.3f}), random sets {row['random_mean']:.3f} (max "
        f"{row['random_max']:.3f}), ROC AUC {row['auc']:.3f}"
    )
    return 0
