"""The fixed split of a reference corpus into training and held-out paragraphs."""

from __future__ import annotations

from pathlib import Path

from knowledge.corpus import HELD_OUT_EVERY, is_held_out, paragraphs, split_corpus

SHIPPED = Path(__file__).parents[2] / "daemon" / "taskbook" / "corpus"


def test_paragraphs_split_at_blank_lines(tmp_path: Path):
    (tmp_path / "a.txt").write_text("one two\nthree\n\n\nfour five\n")
    assert paragraphs(tmp_path) == ["one two three", "four five"]


def test_split_is_disjoint_and_complete():
    for corpus in sorted(SHIPPED.iterdir()):
        split = split_corpus(corpus)
        assert not set(split.train) & set(split.held_out), corpus.name
        assert set(split.train) | set(split.held_out) == set(paragraphs(corpus)), corpus.name
        assert split.held_out, corpus.name


def test_split_depends_on_text_only(tmp_path: Path):
    texts = [f"paragraph number {i} about rivers" for i in range(40)]
    (tmp_path / "a.txt").write_text("\n\n".join(texts))
    before = split_corpus(tmp_path)
    (tmp_path / "0-new.txt").write_text("a new first file\n\nwith two paragraphs")
    after = split_corpus(tmp_path)

    assert set(before.held_out) <= set(after.held_out)
    assert set(before.train) <= set(after.train)
    held = sum(is_held_out(text) for text in texts)
    assert 40 // HELD_OUT_EVERY - 6 <= held <= 40 // HELD_OUT_EVERY + 6
