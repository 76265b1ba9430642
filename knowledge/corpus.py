"""A domain's reference corpus, split once and for all into training and held-out text.

The corpus is the `.txt` files of the domain's folder; their paragraphs are
separated by blank lines. A paragraph belongs to the held-out split when
the first byte of the sha256 of its text, modulo HELD_OUT_EVERY, is 0. The
split therefore depends on a paragraph's text only: adding a file never moves
an old paragraph from one side to the other, and held-out text never enters
training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

HELD_OUT_EVERY = 4  # about one paragraph in four is held out


@dataclass(frozen=True)
class CorpusSplit:
    train: tuple[str, ...]
    held_out: tuple[str, ...]


def paragraphs(corpus: Path) -> list[str]:
    """Return the non-empty paragraphs of a corpus folder's `.txt` files, in name order."""
    found = []
    for file in sorted(corpus.glob("*.txt")):
        text = file.read_text(encoding="utf-8")
        found += [" ".join(part.split()) for part in text.split("\n\n") if part.strip()]
    return found


def is_held_out(paragraph: str) -> bool:
    return hashlib.sha256(paragraph.encode("utf-8")).digest()[0] % HELD_OUT_EVERY == 0


def split_corpus(corpus: Path) -> CorpusSplit:
    """Split a corpus folder. A corpus of two or more paragraphs always keeps one
    paragraph on each side; a single paragraph is held out, so it still measures."""
    found = list(dict.fromkeys(paragraphs(corpus)))  # exact duplicates once
    held = [p for p in found if is_held_out(p)]
    train = [p for p in found if not is_held_out(p)]
    if len(found) == 1:
        return CorpusSplit((), tuple(found))
    if len(found) >= 2 and not held:
        held, train = [train[-1]], train[:-1]
    if len(found) >= 2 and not train:
        held, train = held[:-1], [held[-1]]
    return CorpusSplit(tuple(train), tuple(held))
