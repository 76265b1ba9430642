"""`a3x bench routing`: how often routing by prompt similarity picks the adapter of a
prompt's own domain.

The labelled mix is every task prompt of the shipped task books (default.toml
and almanac.toml), labelled with its task's domain. Each domain gets one
adapter profile, built the way lora/router.py builds them but without
training an adapter. Two kinds of profile are measured:

- "book": the texts a retraining round of the domain trains on, as the task
  book shows them (prompts of the tasks that are not held out, and corpus
  training paragraphs, each group counting once). Recurring tasks are routed on the prompts their
  adapter trained on, so accuracy is reported separately for those tasks and
  for the held-out tasks, whose prompts no profile contains;
- "corpus": the corpus training paragraphs alone, so that no routed prompt is
  in any profile.

A prompt counts as correct when its nearest profile is its own domain's. The
report also gives the similarity to the own profile and to the best other
profile, which is what the `[routing] floor` default was read from.

Accuracy is measured with two embedders: the router's (int8, 128 word
pieces; knowledge/embed.py) and, as the baseline, the evaluators' float32
embedder at 256 word pieces, which routed before. Their speed is measured side
by side: each prompt is embedded alone by one and then the other, for a
few rounds, and the report gives p50 and p99 per prompt and their ratio.

Last, it routes the prompts with the default `[routing]` settings twice,
without a policy and with the specialization policy. The policy assumes
gate records in which every adapter beats the base on its own domain only,
with the other domains within the gate's tolerance. For each run it counts
the prompts that an adapter of another domain takes part in.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lora.router import (
    Profile,
    Router,
    RouterSettings,
    TextEmbedder,
    book_groups,
    profile_vector,
)

PROFILE_KINDS = ("book", "corpus")
DEFAULT_FLOOR = 0.4  # the [routing] floor default of daemon/config.py


@dataclass(frozen=True)
class RoutingAccuracy:
    profile: str  # "book" or "corpus"
    prompts: int
    correct: int
    seen_prompts: int  # prompts that are part of their domain's profile
    seen_correct: int
    per_domain: dict[str, tuple[int, int]]  # domain -> (correct, prompts)
    confusions: dict[str, int]  # "label -> routed" -> count
    own_similarity: dict[str, float]  # quantiles of the similarity to the own profile
    best_other_similarity: dict[str, float]  # quantiles of the best wrong profile's similarity
    floor: float
    routed_above_floor: int  # prompts whose nearest profile is at or above the floor
    routed_correct_above_floor: int
    own_above_floor: float  # share of prompts at or above the floor with their own profile
    other_pairs_above_floor: float  # share of (prompt, other domain's profile) pairs

    @property
    def accuracy(self) -> float:
        return self.correct / self.prompts if self.prompts else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy": self.accuracy}


class MemoEmbedder:
    """An embedder that encodes each distinct text once, since every profile kind embeds
    the same prompts and corpus paragraphs."""

    def __init__(self, embedder: TextEmbedder):
        self.embedder = embedder
        self.dimension = embedder.dimension
        self.identity = embedder.identity
        self._vectors: dict[str, np.ndarray] = {}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        if missing:
            for text, vector in zip(missing, self.embedder.encode(missing), strict=True):
                self._vectors[text] = vector
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.stack([self._vectors[text] for text in texts])


def shipped_books() -> list[Path]:
    from daemon.taskbook import default_book_path

    default = default_book_path()
    return [default, default.with_name("almanac.toml")]


def routing_accuracy(
    books: Sequence[Path],
    embedder: TextEmbedder,
    profile: str = "book",
    floor: float = DEFAULT_FLOOR,
) -> RoutingAccuracy:
    """Route every task prompt of the books to one profile per domain and count hits."""
    from daemon.taskbook import load_books

    book = load_books(books)
    profiles, in_profile = domain_profiles(book, embedder, profile)
    router = Router(profiles, embedder, RouterSettings(top_k=1, floor=floor))
    prompts = [task.prompt for task in book.tasks]
    similarities = embedder.encode(prompts) @ np.stack([p.vector for p in profiles]).T
    decisions = router.route_many(prompts, [None] * len(prompts))
    return _report(book.tasks, profiles, similarities, decisions, in_profile, profile, floor)


def domain_profiles(book: Any, embedder: TextEmbedder, kind: str) -> tuple[list[Profile], set[str]]:
    """Return one profile per domain of a task book, named `domain/v1`, and the ids of
    the tasks whose prompt is part of its domain's profile."""
    from knowledge.corpus import split_corpus

    profiles = []
    in_profile: set[str] = set()
    for name, domain in sorted(book.domains.items()):
        tasks = [task for task in book.tasks if task.domain == name]
        if kind == "book":
            groups = book_groups(tasks, domain.reference_corpus)
            in_profile |= {task.id for task in tasks if task.prompt in groups[0]}
        elif domain.reference_corpus is not None:
            groups = [list(split_corpus(domain.reference_corpus).train)]
        else:
            raise ValueError(f"domain {name} has no reference corpus to build a profile from")
        vector = profile_vector(groups, embedder)
        profiles.append(Profile(f"{name}/v1", name, vector, kind, sum(map(len, groups))))
    return profiles, in_profile


@dataclass(frozen=True)
class PolicyEffect:
    """Counts of the adapters routing gives the prompts under one policy."""

    policy: str  # "none" or "own domain only"
    own_first: int  # prompts whose heaviest adapter is their own domain's
    other_first: int  # prompts whose heaviest adapter is another domain's
    base_only: int  # prompts the base answers alone
    with_other: int  # prompts given any adapter of another domain
    other_weight: float  # total weight given to adapters of other domains, over all prompts

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def policy_effect(
    books: Sequence[Path], embedder: TextEmbedder, settings: RouterSettings
) -> list[PolicyEffect]:
    """Route the prompts with book profiles, once without a policy and once with the
    policy a gate record gives when other domains stay within tolerance."""
    from daemon.taskbook import load_books

    book = load_books(books)
    profiles, _ = domain_profiles(book, embedder, "book")
    prompts = [task.prompt for task in book.tasks]
    domains = [task.domain for task in book.tasks]

    def own_domain_only(name: str, domain: str) -> tuple[bool, str]:
        return name.split("/")[0] == domain, "no gain on this domain"

    effects = []
    for label, policy in (("none", None), ("own domain only", own_domain_only)):
        router = Router(profiles, embedder, settings, policy)
        decisions = router.route_many(prompts, domains)
        effects.append(_effect(label, domains, decisions))
    return effects


def _effect(label: str, domains: Sequence[str], decisions: Sequence[Any]) -> PolicyEffect:
    own_first = other_first = base_only = with_other = 0
    other_weight = 0.0
    for domain, decision in zip(domains, decisions, strict=True):
        if not decision.adapters:
            base_only += 1
            continue
        first = decision.adapters[0].name.split("/")[0]
        own_first += first == domain
        other_first += first != domain
        others = [a for a in decision.adapters if a.name.split("/")[0] != domain]
        with_other += bool(others)
        other_weight += sum(a.weight for a in others)
    return PolicyEffect(label, own_first, other_first, base_only, with_other, other_weight)


def _report(
    tasks: Sequence[Any],
    profiles: list[Profile],
    similarities: np.ndarray,
    decisions: Sequence[Any],
    in_profile: set[str],
    kind: str,
    floor: float,
) -> RoutingAccuracy:
    domains = [p.domain for p in profiles]
    correct = Counter[str]()
    total = Counter[str]()
    confusions = Counter[str]()
    own: list[float] = []
    other: list[float] = []
    pairs: list[float] = []
    seen = seen_correct = above = above_correct = 0
    for index, (task, decision) in enumerate(zip(tasks, decisions, strict=True)):
        routed = decision.nearest.name.split("/")[0]
        hit = routed == task.domain
        total[task.domain] += 1
        correct[task.domain] += hit
        if not hit:
            confusions[f"{task.domain} -> {routed}"] += 1
        if task.id in in_profile:
            seen += 1
            seen_correct += hit
        if decision.adapters:
            above += 1
            above_correct += hit
        row = similarities[index]
        own.append(float(row[domains.index(task.domain)]))
        wrong = [float(s) for d, s in zip(domains, row, strict=True) if d != task.domain]
        other.append(max(wrong))
        pairs += wrong
    return RoutingAccuracy(
        profile=kind,
        prompts=len(tasks),
        correct=sum(correct.values()),
        seen_prompts=seen,
        seen_correct=seen_correct,
        per_domain={d: (correct[d], total[d]) for d in sorted(total)},
        confusions=dict(confusions.most_common()),
        own_similarity=_quantiles(own),
        best_other_similarity=_quantiles(other),
        floor=floor,
        routed_above_floor=above,
        routed_correct_above_floor=above_correct,
        own_above_floor=float(np.mean(np.asarray(own) >= floor)),
        other_pairs_above_floor=float(np.mean(np.asarray(pairs) >= floor)),
    )


def _quantiles(values: list[float]) -> dict[str, float]:
    points = np.quantile(np.asarray(values), [0.1, 0.5, 0.9])
    return {
        "p10": round(float(points[0]), 3),
        "p50": round(float(points[1]), 3),
        "p90": round(float(points[2]), 3),
    }


@dataclass(frozen=True)
class EmbeddingSpeed:
    """Wall time of embedding one prompt alone, per embedder, over the same prompts."""

    embedders: tuple[str, ...]  # identities, the first is the router's
    samples_ms: tuple[tuple[float, ...], ...]  # per embedder

    def quantile(self, index: int, q: float) -> float:
        return float(np.quantile(np.asarray(self.samples_ms[index]), q))

    def to_json(self) -> dict[str, Any]:
        return {
            name: {
                "p50_ms": round(self.quantile(index, 0.5), 2),
                "p99_ms": round(self.quantile(index, 0.99), 2),
                "samples": len(self.samples_ms[index]),
            }
            for index, name in enumerate(self.embedders)
        }


def embedding_speed(
    prompts: Sequence[str], embedders: Sequence[TextEmbedder], rounds: int
) -> EmbeddingSpeed:
    """Embed each prompt alone with every embedder in turn, `rounds` times over."""
    for embedder in embedders:
        embedder.encode(prompts[:1])  # warm-up: the first call allocates the work buffers
    samples: list[list[float]] = [[] for _ in embedders]
    for _ in range(rounds):
        for prompt in prompts:
            for index, embedder in enumerate(embedders):
                started = time.perf_counter_ns()
                embedder.encode([prompt])
                samples[index].append((time.perf_counter_ns() - started) / 1e6)
    return EmbeddingSpeed(
        tuple(embedder.identity for embedder in embedders), tuple(map(tuple, samples))
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--profile",
        choices=(*PROFILE_KINDS, "all"),
        default="all",
        help="which profiles to measure (default: all)",
    )
    parser.add_argument(
        "--floor",
        type=float,
        default=DEFAULT_FLOOR,
        help=f"cosine similarity floor (default: {DEFAULT_FLOOR}, as [routing] floor)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="times each prompt is embedded per embedder for the speed table (default: 3)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def command(args: argparse.Namespace) -> int:
    from bench.generate import machine_description
    from daemon.taskbook import load_books
    from knowledge.embed import routing_embedder, shared_embedder

    if args.rounds < 1:
        raise SystemExit(f"--rounds {args.rounds} is not positive; give 1 or more")
    books = shipped_books()
    router_embedder, baseline = routing_embedder(), shared_embedder()
    kinds = PROFILE_KINDS if args.profile == "all" else (args.profile,)
    results = {}
    for embedder in (router_embedder, baseline):
        memo = MemoEmbedder(embedder)
        results[embedder.identity] = [
            routing_accuracy(books, memo, kind, args.floor) for kind in kinds
        ]
    settings = RouterSettings(floor=args.floor)
    effects = policy_effect(books, MemoEmbedder(router_embedder), settings)
    prompts = [task.prompt for task in load_books(books).tasks]
    speed = embedding_speed(prompts, [router_embedder, baseline], args.rounds)
    if args.json:
        print(
            json.dumps(
                {
                    "accuracy": {
                        name: [r.to_json() for r in rows] for name, rows in results.items()
                    },
                    "policy": [e.to_json() for e in effects],
                    "settings": asdict(settings),
                    "embedding_speed": speed.to_json(),
                },
                indent=2,
            )
        )
        return 0
    print(f"machine: {machine_description()}")
    for name, rows in results.items():
        role = "router" if name == router_embedder.identity else "baseline"
        print(f"embedder {name} ({role}):")
        for result in rows:
            print(_format(result))
    print(
        f"routing with book profiles, top_k {settings.top_k}, floor {settings.floor:g}, "
        f"temperature {settings.temperature:g}, embedder {router_embedder.identity}:"
    )
    for effect in effects:
        print(
            f"  policy {effect.policy}: {effect.own_first} prompts led by their own adapter, "
            f"{effect.other_first} by another domain's, {effect.base_only} by the base alone; "
            f"{effect.with_other} given another domain's adapter, total weight "
            f"{effect.other_weight:.2f}"
        )
    print(f"embedding one prompt, ms, {len(prompts)} prompts x {args.rounds} rounds:")
    for index, name in enumerate(speed.embedders):
        print(
            f"  {name}: p50 {speed.quantile(index, 0.5):.1f}, p99 {speed.quantile(index, 0.99):.1f}"
        )
    print(
        f"  ratio router/baseline: p50 {speed.quantile(0, 0.5) / speed.quantile(1, 0.5):.2f}, "
        f"p99 {speed.quantile(0, 0.99) / speed.quantile(1, 0.99):.2f}"
    )
    return 0


def _format(result: RoutingAccuracy) -> str:
    held = result.prompts - result.seen_prompts
    lines = [
        f"profiles from {result.profile}: the nearest profile is the prompt's own domain's "
        f"for {result.correct}/{result.prompts} prompts ({result.accuracy:.1%})",
    ]
    if result.seen_prompts:
        lines.append(
            f"  prompts in their profile: {result.seen_correct}/{result.seen_prompts}; "
            f"held-out prompts: {result.correct - result.seen_correct}/{held}"
        )
    lines.append(
        "  per domain: " + ", ".join(f"{d} {c}/{n}" for d, (c, n) in result.per_domain.items())
    )
    if result.confusions:
        lines.append(
            "  wrong: " + ", ".join(f"{pair} x{n}" for pair, n in result.confusions.items())
        )
    lines.append(
        f"  similarity to own profile p10/p50/p90: {_triple(result.own_similarity)}; "
        f"to the best other: {_triple(result.best_other_similarity)}"
    )
    lines.append(
        f"  at floor {result.floor:g}: {result.routed_above_floor} prompts have a profile at "
        f"or above it, {result.routed_correct_above_floor} of them their own domain's; "
        f"{result.own_above_floor:.1%} of prompts reach their own profile, "
        f"{result.other_pairs_above_floor:.1%} of (prompt, other profile) pairs pass"
    )
    return "\n".join(lines)


def _triple(quantiles: dict[str, float]) -> str:
    return "/".join(f"{quantiles[key]:.2f}" for key in ("p10", "p50", "p90"))
