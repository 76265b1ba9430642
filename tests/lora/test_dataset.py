"""The label-free training set: which answers are distilled, and what is held out."""

from __future__ import annotations

from pathlib import Path

from lora.dataset import build_training_set, held_out_tasks, is_held_out_task

CORPUS = Path(__file__).parents[1] / "data" / "corpus" / "geography"


def run(run_id: int, task_id: str, text: str, finish: str = "stop") -> dict:
    return {
        "id": run_id,
        "task_id": task_id,
        "prompt": f"Q {task_id}\nA:",
        "text": text,
        "finish_reason": finish,
    }


TASKS = [f"task-{i}" for i in range(8)]  # at least one of them is held out by its hash


def trained_tasks() -> list[str]:
    return [task for task in TASKS if not is_held_out_task(task)]


def test_majority_answer_is_distilled():
    task = trained_tasks()[0]
    runs = [run(1, task, "Paris."), run(2, task, "paris. "), run(3, task, "Lyon.")]
    data = build_training_set("geo", TASKS, runs, set(), None)

    assert [e.completion for e in data.train] == [" Paris."]
    assert data.train[0].prompt == f"Q {task}\nA:"
    assert data.rejected_answers["not the majority answer"] == 1


def test_contradicted_and_cut_answers_are_dropped():
    first, second = trained_tasks()[:2]
    runs = [run(1, first, "Paris."), run(2, second, "Rome is", finish="length")]
    data = build_training_set("geo", TASKS, runs, {1}, None)

    assert data.train == ()
    assert data.rejected_answers["in a contradiction"] == 1
    assert data.rejected_answers["empty or cut off"] == 1


def test_no_majority_means_no_example():
    task = trained_tasks()[0]
    runs = [run(1, task, "Paris."), run(2, task, "Lyon."), run(3, task, "Nice.")]
    data = build_training_set("geo", TASKS, runs, set(), None)

    assert data.train == ()


def test_held_out_tasks_never_train():
    ids = [f"task-{i}" for i in range(12)]
    held = held_out_tasks(ids)
    runs = [run(i, task, "Paris.") for i, task in enumerate(ids)]
    data = build_training_set("geo", ids, runs, set(), None)

    assert held
    assert set(data.held_out_tasks) == set(held)
    assert not {e.source.removeprefix("answer:") for e in data.train} & set(held)


def test_corpus_split_and_hash():
    data = build_training_set("geo", [], [], set(), CORPUS)
    again = build_training_set("geo", [], [], set(), CORPUS)

    assert data.held_out_texts
    assert not {e.completion for e in data.train} & set(data.held_out_texts)
    assert data.sha256 == again.sha256
    assert len(data.sha256) == 64


def test_duplicate_examples_kept_once():
    task = trained_tasks()[0]
    runs = [run(1, task, "Paris."), run(2, task, "Paris.")]
    data = build_training_set("geo", TASKS, runs, set(), None)

    assert len(data.train) == 1


def test_answer_contradicting_corpus_is_dropped(tmp_path: Path):
    (tmp_path / "a.txt").write_text(
        "Tavrenholt is the capital of Drennavar.\n\nThe Tessurin is a long river.\n\n"
        "Drennavar is an island.\n\nThe capital of Drennavar is Tavrenholt."
    )
    first, second = trained_tasks()[:2]
    runs = [
        run(1, first, "The capital of Drennavar is Vienna."),
        run(2, second, "The Tessurin flows into the sea."),
    ]
    data = build_training_set("alm", TASKS, runs, set(), tmp_path)

    answers = [e.completion for e in data.train if e.source.startswith("answer:")]
    assert answers == [" The Tessurin flows into the sea."]
    assert data.rejected_answers["contradicts the corpus"] == 1


def test_replay_share_of_other_domains():
    replay = {"math": [f"math paragraph {i}" for i in range(10)], "code": ["code paragraph"]}
    data = build_training_set("geo", [], [], set(), CORPUS, replay, replay_share=0.5)

    own = [e for e in data.train if e.source == "corpus"]
    replayed = [e for e in data.train if e.source.startswith("replay:")]
    assert len(replayed) == round(len(own) * 0.5)
    assert {e.source for e in replayed} == {"replay:math", "replay:code"}
    assert data.summary()["replay_paragraphs"] == len(replayed)
