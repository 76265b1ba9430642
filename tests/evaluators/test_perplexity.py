from pathlib import Path

from daemon.config import ScoreConfig
from daemon.taskbook import Domain
from evaluators.base import EvaluationContext
from evaluators.perplexity import PerplexityEvaluator, held_out_text
from knowledge.corpus import split_corpus


def test_held_out_text_cut_at_space(tmp_path: Path):
    (tmp_path / "a.txt").write_text("alpha beta gamma delta")
    (tmp_path / "b.txt").write_text("second file")
    held = split_corpus(tmp_path).held_out
    assert len(held) == 1  # two paragraphs: one on each side
    assert held_out_text(tmp_path, 100) == held[0]
    assert held_out_text(tmp_path, 2) == held[0][: held[0].rfind(" ", 0, 8)]


def test_perplexity_per_domain(tiny_gguf: Path, tmp_path: Path):
    from runtime.llama_cpp_backend import LlamaCppBackend

    corpus = tmp_path / "geo"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the capital of france is paris and the river is long")
    broken = tmp_path / "bad"
    broken.mkdir()
    (broken / "a.txt").write_bytes(b"\xff\xfe invalid utf-8")
    backend = LlamaCppBackend(tiny_gguf, n_ctx=512, threads=1)
    domains = {
        "geo": Domain("geo", reference_corpus=corpus),
        "bad": Domain("bad", reference_corpus=broken),
        "none": Domain("none"),
    }
    context = EvaluationContext(
        cycle_id=1,
        runs=(),
        config=ScoreConfig(perplexity_domains=0),
        backend=backend,
        domains=domains,
    )
    scores = PerplexityEvaluator().score(context)
    backend.close()
    assert [s.domain for s in scores] == ["geo"]
    assert scores[0].value > 1.0
    assert scores[0].evidence["tokens"] > 10
    assert scores[0].higher_is_better is False


def test_rotation_visits_every_domain():
    from evaluators.perplexity import rotation

    names = ["a", "b", "c"]
    assert [rotation(names, 1, cycle)[0] for cycle in range(1, 7)] == ["b", "c", "a", "b", "c", "a"]
    assert rotation(names, 0, 5) == names
    assert rotation(names, 2, 1) == ["c", "a"]
