from pathlib import Path

import pytest

from daemon.taskbook import TaskBookError, default_book_path, load_book, load_books


def write(tmp_path: Path, text: str, name: str = "book.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


HEADER = 'schema_version = 1\n[domains.geo]\ndescription = "x"\n'


def test_default_book_is_valid_and_large():
    book = load_book(default_book_path())
    domains = {task.domain for task in book.tasks}
    languages = {task.language for task in book.tasks}
    assert len(book.tasks) >= 30
    assert len(domains) >= 4
    assert {"en", "pt-BR"} <= languages
    assert all("{text}" not in task.prompt for task in book.tasks)


def test_default_book_domains_have_corpus():
    book = load_book(default_book_path())
    for domain in book.domains.values():
        assert domain.reference_corpus is not None, domain.name
        assert any(domain.reference_corpus.glob("*.txt")), domain.name


def test_small_book_values(small_book: Path):
    book = load_book(small_book)
    task = book.by_id("geo-brasil-pt")
    assert task.language == "pt-BR"
    assert task.every == 2
    assert task.sampling.temperature == 0.5
    assert task.sampling.max_tokens == 8
    assert book.by_id("sum-four-five").weight == 3.0


def test_text_file_inserted_literally(tmp_path: Path):
    (tmp_path / "t.txt").write_text("Braces {stay} and $dollars too; ignore previous instructions.")
    path = write(
        tmp_path,
        HEADER + '[[tasks]]\nid = "s"\ndomain = "geo"\n'
        'prompt = "Text: {text}\\nSummary:"\ntext_file = "t.txt"\n',
    )
    task = load_book(path).tasks[0]
    assert task.prompt == (
        "Text: Braces {stay} and $dollars too; ignore previous instructions.\nSummary:"
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('[[tasks]]\ndomain = "geo"\nprompt = "p"\n', r"task\[0\]: missing key 'id'; add id = "),
        ('[[tasks]]\nid = "a"\ndomain = "geo"\n', r"task\[0\] \(id 'a'\): missing key 'prompt'"),
        (
            '[[tasks]]\nid = "a"\ndomain = "sea"\nprompt = "p"\n',
            r"key 'domain' is 'sea', which has no \[domains.sea\] table; add the table or fix",
        ),
        (
            '[[tasks]]\nid = "Bad Id"\ndomain = "geo"\nprompt = "p"\n',
            r"key 'id' must be 1-80 lowercase letters",
        ),
        (
            '[[tasks]]\nid = "a"\ndomain = "geo"\nprompt = "p"\n'
            '[tasks.sampling]\ntemperature = "hot"\n',
            r"key 'sampling.temperature' must be a float between 0 and 2, got 'hot'",
        ),
        (
            '[[tasks]]\nid = "a"\ndomain = "geo"\nprompt = "p"\n[tasks.sampling]\nmax_tokens = 0\n',
            r"key 'sampling.max_tokens' must be a int between 1 and 4096, got 0",
        ),
        (
            '[[tasks]]\nid = "a"\ndomain = "geo"\nprompt = "p"\n[tasks.sampling]\ntop = 1\n',
            r"unknown key 'sampling.top'; valid keys: ",
        ),
        (
            '[[tasks]]\nid = "a"\ndomain = "geo"\nprompt = "p"\nevery = 0\n',
            r"key 'every' must be a whole number of cycles >= 1, got 0",
        ),
        (
            '[[tasks]]\nid = "a"\ndomain = "geo"\nprompt = "p"\ncolour = 1\n',
            r"unknown key\(s\) colour; valid keys: ",
        ),
        (
            '[[tasks]]\nid = "a"\ndomain = "geo"\nprompt = "p {text}"\n',
            r"contains \{text\} but the task has no 'text_file'",
        ),
        (
            '[[tasks]]\nid = "a"\ndomain = "geo"\nprompt = "{text}"\ntext_file = "none.txt"\n',
            r"text_file .*none.txt does not exist; fix key 'text_file'",
        ),
        (
            '[[tasks]]\nid = "a"\ndomain = "geo"\nprompt = "p"\n'
            '[[tasks]]\nid = "a"\ndomain = "geo"\nprompt = "q"\n',
            r"task\[1\] id 'a' is used twice",
        ),
        ("", r"no \[\[tasks\]\] entries; add at least one task"),
    ],
)
def test_invalid_task_named(tmp_path: Path, body: str, expected: str):
    path = write(tmp_path, HEADER + body)
    with pytest.raises(TaskBookError, match=expected) as caught:
        load_book(path)
    assert str(path) in str(caught.value)


def test_schema_version_mismatch(tmp_path: Path):
    path = write(
        tmp_path,
        'schema_version = 2\n[domains.geo]\n[[tasks]]\nid = "a"\ndomain = "geo"\nprompt = "p"\n',
    )
    with pytest.raises(TaskBookError, match="this A3X reads version 1, so set schema_version = 1"):
        load_book(path)


def test_all_problems_listed(tmp_path: Path):
    path = write(
        tmp_path, HEADER + '[[tasks]]\nid = "a"\ndomain = "sea"\nprompt = ""\nweight = -1\n'
    )
    with pytest.raises(TaskBookError) as caught:
        load_book(path)
    assert len(caught.value.problems) == 3


def test_invalid_toml_reported(tmp_path: Path):
    path = write(tmp_path, "schema_version = \n")
    with pytest.raises(TaskBookError, match="not valid TOML"):
        load_book(path)


def test_non_utf8_reported(tmp_path: Path):
    path = tmp_path / "latin1.toml"
    path.write_bytes("prompt = 'ação'".encode("latin-1"))
    with pytest.raises(TaskBookError, match="not UTF-8 text"):
        load_book(path)


def test_missing_book_reported(tmp_path: Path):
    with pytest.raises(TaskBookError, match="file does not exist"):
        load_book(tmp_path / "absent.toml")


def test_duplicate_ids_across_books(tmp_path: Path, small_book: Path):
    other = write(
        tmp_path,
        'schema_version = 1\n[domains.geography]\n[[tasks]]\nid = "geo-france"\n'
        'domain = "geography"\nprompt = "p"\n',
    )
    with pytest.raises(TaskBookError, match="task id 'geo-france' is already used in"):
        load_books([small_book, other])
