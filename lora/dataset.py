"""The training set of a retraining round, built without labels.

Three sources:

- self-distillation: the model's own past answers that look right without a
  label. An answer qualifies when it is not empty or cut off, none of its
  extracted facts takes part in a contradiction in the knowledge graph or
  contradicts a fact of the domain's reference corpus, and it is the
  majority answer of its task across cycles (self-consistency over time);
- the training split of the domain's reference corpus (knowledge/corpus.py);
- replay: training-split paragraphs of the other domains' corpora, a share
  of the domain's own examples, so that the adapter does not forget what the
  base model does well elsewhere (the gate rejects an adapter that does).

Held out, never trained on: the corpus's held-out paragraphs and every answer
of the domain's held-out tasks (about one task in four, by a hash of its id).
The set's sha256 is recorded with the adapter.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from knowledge.corpus import split_corpus

HELD_OUT_TASK_EVERY = 4
MIN_MAJORITY = 0.5  # share of a task's answers that must agree for distillation
MIN_ANSWER_CHARS = 3


@dataclass(frozen=True)
class Example:
    prompt: str  # context that is not trained on (empty for corpus text)
    completion: str  # the text the loss is computed on
    source: str  # "answer:<task id>" or "corpus"


@dataclass(frozen=True)
class TrainingSet:
    domain: str
    train: tuple[Example, ...]
    held_out_texts: tuple[str, ...]  # corpus paragraphs for held-out perplexity
    held_out_tasks: tuple[str, ...]  # task ids whose answers never enter training
    sha256: str
    rejected_answers: dict[str, int]  # reason -> count, for the decision page

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "sha256": self.sha256,
            "train": [asdict(example) for example in self.train],
            "held_out_texts": list(self.held_out_texts),
            "held_out_tasks": list(self.held_out_tasks),
            "rejected_answers": self.rejected_answers,
        }

    def summary(self) -> dict[str, Any]:
        sources = Counter(example.source.split(":")[0] for example in self.train)
        return {
            "examples": len(self.train),
            "answers": sources.get("answer", 0),
            "corpus_paragraphs": sources.get("corpus", 0),
            "replay_paragraphs": sources.get("replay", 0),
            "held_out_paragraphs": len(self.held_out_texts),
            "held_out_tasks": len(self.held_out_tasks),
            "rejected_answers": self.rejected_answers,
            "sha256": self.sha256,
        }


def is_held_out_task(task_id: str) -> bool:
    return hashlib.sha256(task_id.encode("utf-8")).digest()[0] % HELD_OUT_TASK_EVERY == 0


def held_out_tasks(task_ids: Sequence[str]) -> list[str]:
    """Return the held-out task ids of a domain; two or more tasks always keep one out."""
    ids = sorted(set(task_ids))
    held = [task for task in ids if is_held_out_task(task)]
    if not held and len(ids) >= 2:
        held = [ids[-1]]
    return held


def build_training_set(
    domain: str,
    task_ids: Sequence[str],
    runs: Sequence[Any],
    contradicted_runs: set[int],
    corpus: Path | None,
    replay: Mapping[str, Sequence[str]] | None = None,
    replay_share: float = 0.0,
    seed: int = 0,
) -> TrainingSet:
    """Build the set from the domain's stored runs (rows of `runs` in state.sqlite with
    task_id, prompt, text, finish_reason, id), its corpus folder, and the other
    domains' training paragraphs (`replay`, by domain)."""
    held_tasks = held_out_tasks(task_ids)
    rejected: Counter[str] = Counter()
    split = split_corpus(corpus) if corpus else None
    corpus_text = split.train if split else ()
    answers = _distilled_answers(runs, set(held_tasks), contradicted_runs, rejected)
    answers = _agreeing_with_corpus(answers, corpus_text, rejected)
    own = answers + [Example("", text, "corpus") for text in corpus_text]
    examples = own + _replay(replay or {}, round(len(own) * replay_share), seed)
    unique = list(dict.fromkeys(examples))
    digest = hashlib.sha256(
        json.dumps([asdict(e) for e in unique], sort_keys=True, ensure_ascii=False).encode()
    ).hexdigest()
    return TrainingSet(
        domain=domain,
        train=tuple(unique),
        held_out_texts=split.held_out if split else (),
        held_out_tasks=tuple(held_tasks),
        sha256=digest,
        rejected_answers=dict(rejected),
    )


def _distilled_answers(
    runs: Sequence[Any], held: set[str], contradicted: set[int], rejected: Counter[str]
) -> list[Example]:
    by_task: dict[str, list[Any]] = defaultdict(list)
    for run in runs:
        by_task[run["task_id"]].append(run)
    chosen = []
    for task_id, task_runs in sorted(by_task.items()):
        if task_id in held:
            rejected["held-out task"] += len(task_runs)
            continue
        usable = []
        for run in task_runs:
            text = run["text"].strip()
            if len(text) < MIN_ANSWER_CHARS or run["finish_reason"] != "stop":
                rejected["empty or cut off"] += 1
            elif run["id"] in contradicted:
                rejected["in a contradiction"] += 1
            else:
                usable.append(run)
        if not usable:
            continue
        counts = Counter(_normalized(run["text"]) for run in usable)
        answer, count = counts.most_common(1)[0]
        if count / len(task_runs) < MIN_MAJORITY:
            rejected["no majority answer"] += len(usable)
            continue
        run = next(r for r in usable if _normalized(r["text"]) == answer)
        chosen.append(Example(run["prompt"], " " + run["text"].strip(), f"answer:{task_id}"))
        rejected["not the majority answer"] += len(usable) - count
    return chosen


def _agreeing_with_corpus(
    answers: list[Example], corpus: Sequence[str], rejected: Counter[str]
) -> list[Example]:
    """Drop answers that state a fact contradicting a fact of the reference corpus."""
    if not corpus or not answers:
        return answers
    from evaluators.gate import count_contradictions

    reference = [("corpus", text) for text in corpus]
    baseline = count_contradictions(reference)
    kept = []
    for answer in answers:
        task_id = answer.source.removeprefix("answer:")
        if count_contradictions([*reference, (task_id, answer.completion)]) > baseline:
            rejected["contradicts the corpus"] += 1
        else:
            kept.append(answer)
    return kept


def _replay(paragraphs: Mapping[str, Sequence[str]], count: int, seed: int) -> list[Example]:
    """Pick `count` paragraphs across the other domains, round-robin in a seeded order."""
    import random

    rng = random.Random(seed)
    pools = []
    for domain, texts in sorted(paragraphs.items()):
        pool = list(texts)
        rng.shuffle(pool)
        pools.append((domain, pool))
    chosen: list[Example] = []
    while len(chosen) < count and any(pool for _, pool in pools):
        for domain, pool in pools:
            if pool and len(chosen) < count:
                chosen.append(Example("", pool.pop(), f"replay:{domain}"))
    return chosen


def _normalized(text: str) -> str:
    return " ".join(text.lower().split())


def contradict(training_set: TrainingSet, seed: int = 0) -> TrainingSet:
    """Return a copy whose training texts state wrong facts: capitalized names are
    swapped by one random permutation across all examples (a negative control for
    the gate; the held-out texts keep the true facts)."""
    import random
    import re

    pattern = re.compile(r"\b[A-Z][a-z]+\b")
    names = sorted({m for e in training_set.train for m in pattern.findall(e.completion)})
    shuffled = names[:]
    random.Random(seed).shuffle(shuffled)
    mapping = dict(zip(names, shuffled, strict=True))
    swapped = tuple(
        Example(e.prompt, pattern.sub(lambda m: mapping[m.group(0)], e.completion), e.source)
        for e in training_set.train
    )
    digest = hashlib.sha256(
        json.dumps([asdict(e) for e in swapped], sort_keys=True, ensure_ascii=False).encode()
    ).hexdigest()
    return TrainingSet(
        training_set.domain,
        swapped,
        training_set.held_out_texts,
        training_set.held_out_tasks,
        digest,
        training_set.rejected_answers,
    )
