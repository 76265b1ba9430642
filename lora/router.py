"""Routing by prompt similarity: which adapters answer a prompt, and with what weights.

Each adapter version has a profile: a unit vector in the MiniLM embedding
space for the texts it was trained on. The training texts come in two
groups, the task prompts of its distilled answers and its corpus paragraphs.
The profile is the centroid of the two groups' centroids, so that a corpus
of a hundred paragraphs does not drown the dozen prompts the adapter is
routed on. On the shipped books, pooling every text routed 49 of 60 prompts
to their domain, and averaging the groups routed 58 (docs/routing.md).

A retraining round writes the profile as `profile.npy` in the version
folder when it accepts the adapter, with the texts it averages in
`profile_texts.json` and, in `profile.json`, the embedder that made it. A
profile made by another embedder (another precision or input length) is
built again from the stored texts. For a version without texts it is built
on first use from the task book: the domain's prompts of tasks that are not
held out and its corpus training paragraphs, the texts its training set
drew on.

`Router.route(prompt, domain)` embeds the prompt, searches a FAISS
inner-product index of the profiles (cosine similarity, since every vector
has unit length) and keeps, in order of similarity:

1. the adapters whose similarity is at least `floor`;
2. of those, the ones the specialization policy allows on the task's domain
   (lora/specialize.py), when a policy is given;
3. at most `top_k` of them.

The kept adapters are weighted by a softmax of similarity / temperature, and
each is applied with its weight as its scale. With none kept, the base model
answers alone.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import structlog

from lora import LoraError
from lora.registry import Adapter

log = structlog.get_logger(__name__)

PROFILE_FILE = "profile.npy"
PROFILE_INFO_FILE = "profile.json"
PROFILE_TEXTS_FILE = "profile_texts.json"
PROFILE_FORMAT_VERSION = 1
SOURCE_TRAINING_SET = "training set"
SOURCE_TASK_BOOK = "task book"
# The embedder of profiles written before profile.json named one.
LEGACY_EMBEDDER = "all-MiniLM-L6-v2 float32 256"

# (adapter name, task domain) -> (allowed, reason)
Policy = Callable[[str, str], tuple[bool, str]]


class TextEmbedder(Protocol):
    """The part of knowledge.embed.Embedder that the router uses."""

    dimension: int
    identity: str  # names the model and settings; profiles of another identity are rebuilt

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


# Profiles


@dataclass(frozen=True)
class Profile:
    adapter: str  # domain/vN
    domain: str
    vector: np.ndarray  # float32, unit length
    source: str  # SOURCE_TRAINING_SET or SOURCE_TASK_BOOK
    texts: int  # how many texts the centroid averages


def centroid(vectors: np.ndarray) -> np.ndarray:
    """Return the mean of unit vectors scaled back to unit length."""
    if len(vectors) == 0:
        raise LoraError("no texts to build a routing profile from; the adapter needs training text")
    mean = np.asarray(vectors, dtype=np.float64).mean(axis=0)
    norm = float(np.linalg.norm(mean))
    if not math.isfinite(norm) or norm == 0.0:
        raise LoraError("the profile texts' embeddings cancel out; their centroid has no direction")
    return (mean / norm).astype(np.float32)


def profile_vector(groups: Sequence[Sequence[str]], embedder: TextEmbedder) -> np.ndarray:
    """Return the centroid of the centroids of the non-empty groups of texts."""
    centroids = [centroid(embedder.encode(list(group))) for group in groups if group]
    if not centroids:
        raise LoraError("no texts to build a routing profile from; the adapter needs training text")
    return centroid(np.stack(centroids))


def training_groups(examples: Sequence[Any]) -> list[list[str]]:
    """Split lora.dataset examples into the routing texts of two groups: the prompts of
    distilled answers, and the domain's corpus paragraphs (their completions). Replayed
    paragraphs of other domains are left out, because they are not the domain's text."""
    prompts = [e.prompt.strip() for e in examples if e.source.startswith("answer")]
    paragraphs = [e.completion.strip() for e in examples if e.source == "corpus"]
    return [[text for text in prompts if text], [text for text in paragraphs if text]]


def build_profile(
    adapter: Adapter, groups: Sequence[Sequence[str]], embedder: TextEmbedder, source: str
) -> Profile:
    """Embed the groups of texts, write the profile and its texts to the version
    folder and return it."""
    vector = profile_vector(groups, embedder)
    texts = sum(len(group) for group in groups)
    _write_profile(adapter.folder, vector, source, texts, embedder.identity, groups)
    log.info(
        "routing.profile_built",
        adapter=adapter.name,
        source=source,
        texts=texts,
        embedder=embedder.identity,
    )
    return Profile(adapter.name, adapter.domain, vector, source, texts)


def read_profile(adapter: Adapter, embedder: TextEmbedder) -> Profile | None:
    """Return the stored profile, or None when it is missing, unreadable, or made by
    another embedder or of another dimension (then it is built again)."""
    path = adapter.folder / PROFILE_FILE
    info_path = adapter.folder / PROFILE_INFO_FILE
    if not path.exists() or not info_path.exists():
        return None
    try:
        vector = np.load(path, allow_pickle=False)
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as error:
        log.warning("routing.profile_unreadable", adapter=adapter.name, error=str(error))
        return None
    made_by = info.get("embedder", LEGACY_EMBEDDER)
    if (
        info.get("format_version") != PROFILE_FORMAT_VERSION
        or vector.shape != (embedder.dimension,)
        or made_by != embedder.identity
    ):
        log.info(
            "routing.profile_outdated",
            adapter=adapter.name,
            shape=list(vector.shape),
            format_version=info.get("format_version"),
            embedder=made_by,
            wanted=embedder.identity,
        )
        return None
    return Profile(
        adapter.name, adapter.domain, vector.astype(np.float32), info["source"], info["texts"]
    )


def read_profile_texts(adapter: Adapter) -> tuple[str, list[list[str]]] | None:
    """Return the source and groups of texts a stored profile was built from, or None
    when the version has none (written before texts were stored) or they are unreadable."""
    texts_path = adapter.folder / PROFILE_TEXTS_FILE
    if not texts_path.exists():
        return None
    try:
        stored = json.loads(texts_path.read_text())
        groups = [[str(text) for text in group] for group in stored["groups"]]
        return str(stored["source"]), groups
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("routing.profile_texts_unreadable", adapter=adapter.name, error=str(error))
        return None


def ensure_profile(
    adapter: Adapter,
    embedder: TextEmbedder,
    fallback_groups: Callable[[str], Sequence[Sequence[str]]],
) -> Profile:
    """Return the adapter's profile for this embedder: the stored one, else one built
    from the stored texts, else from `fallback_groups(domain)` (the task book's texts
    of the domain)."""
    stored = read_profile(adapter, embedder)
    if stored is not None:
        return stored
    texts = read_profile_texts(adapter)
    if texts is not None:
        source, groups = texts
        return build_profile(adapter, groups, embedder, source)
    return build_profile(adapter, fallback_groups(adapter.domain), embedder, SOURCE_TASK_BOOK)


def _write_profile(
    folder: Path,
    vector: np.ndarray,
    source: str,
    texts: int,
    embedder: str,
    groups: Sequence[Sequence[str]],
) -> None:
    info = {
        "format_version": PROFILE_FORMAT_VERSION,
        "source": source,
        "texts": texts,
        "embedder": embedder,
    }
    stored = {"source": source, "groups": [list(group) for group in groups]}
    # The texts go first: a profile.json that names this embedder is then never
    # left beside texts of an older profile.
    _write_json(folder / PROFILE_TEXTS_FILE, stored)
    _replace_atomically(folder / PROFILE_FILE, lambda stream: np.save(stream, vector))
    _write_json(folder / PROFILE_INFO_FILE, info)


def _write_json(path: Path, value: Any) -> None:
    data = json.dumps(value, ensure_ascii=False).encode()
    _replace_atomically(path, lambda stream: stream.write(data))


def _replace_atomically(path: Path, write: Callable[[Any], Any]) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# Decisions


class RoutedAdapter(NamedTuple):
    name: str
    weight: float  # applied as the adapter's scale; the weights of a decision sum to 1
    similarity: float  # cosine similarity of the prompt and the adapter's profile


@dataclass(frozen=True)
class RouterSettings:
    top_k: int = 2
    floor: float = 0.4
    temperature: float = 0.05


@dataclass(frozen=True)
class RoutingDecision:
    adapters: tuple[RoutedAdapter, ...]  # empty: the base model generates alone
    floor: float
    temperature: float
    top_k: int = 2
    nearest: RoutedAdapter | None = None  # the most similar adapter, used or not (weight 0)
    skipped: tuple[tuple[str, str], ...] = field(default=())  # (adapter, reason) by the policy

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(adapter.name for adapter in self.adapters)

    @property
    def scales(self) -> tuple[float, ...]:
        return tuple(adapter.weight for adapter in self.adapters)

    def to_json(self) -> dict[str, Any]:
        return {
            "adapters": [adapter._asdict() for adapter in self.adapters],
            "floor": self.floor,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "nearest": self.nearest._asdict() if self.nearest else None,
            "skipped": [{"adapter": name, "reason": reason} for name, reason in self.skipped],
        }


def softmax_weights(similarities: Sequence[float], temperature: float) -> list[float]:
    """Return exp(s / T) normalized to sum 1, computed stably."""
    if not similarities:
        return []
    top = max(similarities)
    exps = [math.exp((s - top) / temperature) for s in similarities]
    total = sum(exps)
    return [value / total for value in exps]


class Router:
    """A FAISS inner-product index over adapter profiles, and the routing rule."""

    def __init__(
        self,
        profiles: Sequence[Profile],
        embedder: TextEmbedder,
        settings: RouterSettings,
        policy: Policy | None = None,
    ):
        import faiss

        self.profiles = list(profiles)
        self.embedder = embedder
        self.settings = settings
        self.policy = policy
        self.index = faiss.IndexFlatIP(embedder.dimension)
        if self.profiles:
            vectors = np.stack([profile.vector for profile in self.profiles]).astype(np.float32)
            self.index.add(np.ascontiguousarray(vectors))

    def route(self, prompt: str, domain: str | None = None) -> RoutingDecision:
        return self.route_many([prompt], [domain])[0]

    def route_many(
        self, prompts: Sequence[str], domains: Sequence[str | None]
    ) -> list[RoutingDecision]:
        """Route each prompt, embedding them in one batch; `domains` gives each prompt's
        task domain for the policy (None: no policy check)."""
        if not self.profiles:
            return [self._decide([], domain) for domain in domains]
        vectors = self.embedder.encode(list(prompts))
        similarities, ids = self.index.search(
            np.ascontiguousarray(vectors, dtype=np.float32), len(self.profiles)
        )
        decisions = []
        for row_similarities, row_ids, domain in zip(similarities, ids, domains, strict=True):
            ranked = [
                (self.profiles[int(i)].adapter, float(s))
                for i, s in zip(row_ids, row_similarities, strict=True)
                if i >= 0
            ]
            decisions.append(self._decide(ranked, domain))
        return decisions

    def _decide(self, ranked: list[tuple[str, float]], domain: str | None) -> RoutingDecision:
        """Apply floor, policy and top_k to (adapter, similarity) pairs, most similar first."""
        settings = self.settings
        above = [(name, s) for name, s in ranked if s >= settings.floor]
        skipped = []
        allowed = []
        for name, similarity in above:
            if self.policy is not None and domain is not None:
                ok, reason = self.policy(name, domain)
                if not ok:
                    skipped.append((name, reason))
                    continue
            allowed.append((name, similarity))
        chosen = allowed[: settings.top_k]
        weights = softmax_weights([s for _, s in chosen], settings.temperature)
        nearest = RoutedAdapter(ranked[0][0], 0.0, ranked[0][1]) if ranked else None
        return RoutingDecision(
            adapters=tuple(
                RoutedAdapter(name, weight, similarity)
                for (name, similarity), weight in zip(chosen, weights, strict=True)
            ),
            floor=settings.floor,
            temperature=settings.temperature,
            top_k=settings.top_k,
            nearest=nearest,
            skipped=tuple(skipped),
        )


def book_groups(tasks: Sequence[Any], corpus: Path | None) -> list[list[str]]:
    """Return the texts a retraining round of a domain trains on, as far as the task
    book shows them: the prompts of its tasks that are not held out, and the training
    paragraphs of its reference corpus. `tasks` are the domain's daemon.taskbook.Task."""
    from knowledge.corpus import split_corpus
    from lora.dataset import held_out_tasks

    held = set(held_out_tasks([task.id for task in tasks]))
    prompts = [task.prompt for task in tasks if task.id not in held]
    paragraphs = list(split_corpus(corpus).train) if corpus is not None else []
    return [prompts, paragraphs]
