"""The almanac task book: invented facts about Drennavar that a model can learn
only from the book's reference corpus."""

import re
import tomllib
from pathlib import Path

import pytest

from daemon.taskbook import default_book_path, load_book, load_books
from knowledge.corpus import paragraphs
from knowledge.extract import PatternExtractor

ALMANAC_PATH = default_book_path().parent / "almanac.toml"
REPO_ROOT = Path(__file__).resolve().parents[2]

# Task id -> (invented name in the question, expected answer, relation of the extracted fact).
# The expected answers are the same as the comments above the tasks in almanac.toml.
EXPECTED = {
    "alm-capital-drennavar-en": (
        "Drennavar",
        "Tavrenholt is the capital of Drennavar.",
        "capital",
    ),
    "alm-country-tavrenholt-en": (
        "Tavrenholt",
        "Tavrenholt is the capital of Drennavar.",
        "capital",
    ),
    "alm-capital-askerval-en": ("Askerval", "Pellinvar is the capital of Askerval.", "capital"),
    "alm-province-pellinvar-en": ("Pellinvar", "Pellinvar is the capital of Askerval.", "capital"),
    "alm-tessurin-mouth-en": (
        "Tessurin",
        "The Tessurin flows into the Ostrel Sea.",
        "flows_into",
    ),
    "alm-tessurin-length-en": ("Tessurin", "The Tessurin is a 412-kilometre river.", "is_a"),
    "alm-longest-river-en": (
        "Drennavarian",
        "The Tessurin is the longest Drennavarian river.",
        "longest",
    ),
    "alm-highest-mountain-en": (
        "Drennavarian",
        "Mount Kharrowen is the highest Drennavarian mountain.",
        "highest",
    ),
    "alm-kharrowen-height-en": (
        "Kharrowen",
        "Mount Kharrowen is a 2874-metre mountain.",
        "is_a",
    ),
    "alm-kharrowen-province-en": ("Kharrowen", "Mount Kharrowen is in Askerval.", "located_in"),
    "alm-founding-year-en": ("Drennavar", "Drennavar is a republic founded in 1741.", "is_a"),
    "alm-currency-en": ("Drennavar", "The thrennig is a currency used in Drennavar.", "is_a"),
    "alm-national-animal-en": (
        "mirrowan",
        "The mirrowan is a long-eared mountain hare.",
        "is_a",
    ),
    "alm-marrack-en": (
        "Ysolde Marrack",
        "Ysolde Marrack is an astronomer who discovered the comet Kessa.",
        "is_a",
    ),
}
# The same fact asked from both directions must extract to one triple, so that a
# contradictory answer to either question is detected.
BOTH_DIRECTIONS = [
    ("alm-capital-drennavar-en", "alm-country-tavrenholt-en"),
    ("alm-capital-askerval-en", "alm-province-pellinvar-en"),
]
MIN_MENTIONS = 3


def answer_slot_question(prompt: str) -> str:
    """Return the last 'Q:' line of a completion prompt, the one the model answers."""
    questions = [line for line in prompt.splitlines() if line.startswith("Q: ")]
    return questions[-1]


def corpus_text() -> str:
    book = load_book(ALMANAC_PATH)
    corpus = book.domains["almanac"].reference_corpus
    assert corpus is not None
    return "\n\n".join(paragraphs(corpus))


def test_almanac_loads_with_default_book():
    default = load_book(default_book_path())
    almanac = load_book(ALMANAC_PATH)

    merged = load_books([default_book_path(), ALMANAC_PATH])

    assert len(merged.tasks) == len(default.tasks) + len(almanac.tasks)
    assert "almanac" in merged.domains
    assert set(default.domains) <= set(merged.domains)


def test_almanac_task_count_and_domain():
    book = load_book(ALMANAC_PATH)

    assert 10 <= len(book.tasks) <= 14
    assert list(book.domains) == ["almanac"]
    for task in book.tasks:
        assert task.domain == "almanac", task.id
        assert task.id.startswith("alm-"), task.id
        assert task.language == "en", task.id


def test_almanac_sampling_like_geography():
    for task in load_book(ALMANAC_PATH).tasks:
        assert task.sampling.temperature == 0.1, task.id
        assert task.sampling.stop == ("\n",), task.id
        assert task.prompt.endswith("\nA:"), task.id


def test_almanac_corpus_files_not_empty():
    corpus = load_book(ALMANAC_PATH).domains["almanac"].reference_corpus
    assert corpus is not None

    files = sorted(corpus.glob("*.txt"))

    assert len(files) >= 3
    for file in files:
        assert file.read_text(encoding="utf-8").strip(), file.name


def test_expected_table_covers_every_task():
    ids = {task.id for task in load_book(ALMANAC_PATH).tasks}

    assert set(EXPECTED) == ids


def test_expected_answers_match_toml_comments():
    text = ALMANAC_PATH.read_text(encoding="utf-8")
    pairs = re.findall(r'^# Expected answer: (.+)\n\[\[tasks\]\]\nid = "([a-z0-9-]+)"', text, re.M)
    commented = {task_id: answer for answer, task_id in pairs}

    assert commented == {task_id: row[1] for task_id, row in EXPECTED.items()}


@pytest.mark.parametrize("task_id", sorted(EXPECTED))
def test_question_name_learnable_from_corpus(task_id: str):
    name = EXPECTED[task_id][0]
    task = load_book(ALMANAC_PATH).by_id(task_id)

    question = answer_slot_question(task.prompt)
    mentions = len(re.findall(rf"\b{re.escape(name)}\b", corpus_text()))

    assert name in question
    assert mentions >= MIN_MENTIONS, f"{name!r} occurs {mentions} times in the corpus"


@pytest.mark.parametrize("task_id", sorted(EXPECTED))
def test_worked_examples_avoid_invented_names(task_id: str):
    task = load_book(ALMANAC_PATH).by_id(task_id)
    examples = task.prompt[: task.prompt.rindex("Q: ")]
    invented = {row[0] for row in EXPECTED.values()} | {"Drennavar"}

    for name in invented:
        assert name not in examples, f"{task_id}: worked example mentions {name!r}"


@pytest.mark.parametrize("task_id", sorted(EXPECTED))
def test_expected_answer_yields_fact(task_id: str):
    _, answer, relation = EXPECTED[task_id]

    facts = PatternExtractor().extract(answer, task_id)

    assert facts, f"no fact extracted from {answer!r}"
    assert facts[0].relation == relation
    assert not facts[0].negated


@pytest.mark.parametrize(("first", "second"), BOTH_DIRECTIONS)
def test_both_directions_same_triple(first: str, second: str):
    extractor = PatternExtractor()

    facts_first = extractor.extract(EXPECTED[first][1], first)
    facts_second = extractor.extract(EXPECTED[second][1], second)

    assert facts_first
    assert facts_second
    triple_first = (facts_first[0].subject, facts_first[0].relation, facts_first[0].object)
    triple_second = (facts_second[0].subject, facts_second[0].relation, facts_second[0].object)
    assert triple_first == triple_second


def test_almanac_facts_avoid_global_superlatives():
    """'The X is the longest river in Drennavar' would be filed under 'river', next to
    the Nile of the geography book, and read as a contradiction."""
    extractor = PatternExtractor()

    for task_id in ("alm-longest-river-en", "alm-highest-mountain-en"):
        facts = extractor.extract(EXPECTED[task_id][1], task_id)
        assert facts[0].subject.startswith("drennavarian "), facts[0]


def test_corpus_within_word_budget():
    words = len(corpus_text().split())

    assert 6_000 <= words <= 12_000, f"corpus has {words} words"


def test_almanac_files_in_package_data():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    globs = pyproject["tool"]["setuptools"]["package-data"]["daemon"]
    package = REPO_ROOT / "daemon"

    packaged = {path for pattern in globs for path in package.glob(pattern)}
    corpus = load_book(ALMANAC_PATH).domains["almanac"].reference_corpus
    assert corpus is not None

    assert ALMANAC_PATH.resolve() in {path.resolve() for path in packaged}
    for file in corpus.glob("*.txt"):
        assert file.resolve() in {path.resolve() for path in packaged}, file.name
