"""Task books: TOML files of recurring tasks, loaded and validated.

A book has `schema_version`, a `[domains.NAME]` table per domain and a
`[[tasks]]` array. Validation collects every problem in the file and reports
each with the file, the task, the key and the fix.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from runtime.backend import SamplingParams

SCHEMA_VERSION = 1
TEXT_PLACEHOLDER = "{text}"
MAX_TEXT_FILE_BYTES = 64 * 1024
TASK_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,79}$")
DOMAIN_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")

TASK_KEYS = {"id", "domain", "language", "prompt", "text_file", "every", "weight", "sampling"}
SAMPLING_LIMITS: dict[str, tuple[type, float, float]] = {
    "temperature": (float, 0.0, 2.0),
    "top_p": (float, 0.0, 1.0),
    "top_k": (int, 0, 1000),
    "max_tokens": (int, 1, 4096),
    "repeat_penalty": (float, 0.5, 2.0),
    "seed": (int, 0, 2**31 - 1),
}


class TaskBookError(Exception):
    """A task book is unreadable or invalid; `problems` lists every finding."""

    def __init__(self, path: Path, problems: Sequence[str]):
        self.path = path
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid task book {path}:\n{lines}")


@dataclass(frozen=True)
class Domain:
    name: str
    description: str = ""
    reference_corpus: Path | None = None


@dataclass(frozen=True)
class Task:
    """One recurring task. `prompt` is final text: a text file is already inserted."""

    id: str
    domain: str
    language: str
    prompt: str
    sampling: SamplingParams
    every: int = 1  # due every N cycles
    weight: float = 1.0  # share when a cycle runs only a subset
    source: Path | None = None


@dataclass(frozen=True)
class TaskBook:
    tasks: tuple[Task, ...]
    domains: dict[str, Domain] = field(default_factory=dict)
    sources: tuple[Path, ...] = ()

    def by_id(self, task_id: str) -> Task:
        for task in self.tasks:
            if task.id == task_id:
                return task
        raise KeyError(task_id)


def default_book_path() -> Path:
    """Return the path of the task book shipped inside the package."""
    return Path(str(resources.files("daemon") / "taskbook" / "default.toml"))


def load_books(paths: Iterable[Path]) -> TaskBook:
    """Load and merge task books; task ids must be unique across all of them."""
    paths = list(paths) or [default_book_path()]
    tasks: list[Task] = []
    domains: dict[str, Domain] = {}
    seen: dict[str, Path] = {}
    for path in paths:
        book = load_book(path)
        for task in book.tasks:
            if task.id in seen:
                raise TaskBookError(
                    path,
                    [f"task id '{task.id}' is already used in {seen[task.id]}; rename one"],
                )
            seen[task.id] = path
        tasks.extend(book.tasks)
        domains.update(book.domains)
    return TaskBook(tasks=tuple(tasks), domains=domains, sources=tuple(paths))


def load_book(path: Path) -> TaskBook:
    """Load one task book file, raising TaskBookError with every problem found."""
    path = Path(path).expanduser()
    raw = _read(path)
    problems: list[str] = []

    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        problems.append(
            f"key 'schema_version' is {version!r}; this A3X reads version {SCHEMA_VERSION}, "
            f"so set schema_version = {SCHEMA_VERSION}"
        )
    unknown = set(raw) - {"schema_version", "domains", "tasks"}
    if unknown:
        problems.append(
            f"unknown top-level key(s) {', '.join(sorted(unknown))}; "
            "valid keys: schema_version, domains, tasks"
        )

    domains = _parse_domains(raw.get("domains", {}), path, problems)
    tasks = _parse_tasks(raw.get("tasks"), domains, path, problems)
    if problems:
        raise TaskBookError(path, problems)
    return TaskBook(tasks=tuple(tasks), domains=domains, sources=(path,))


def _read(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError as error:
        raise TaskBookError(path, ["file does not exist; check the path"]) from error
    except OSError as error:
        raise TaskBookError(path, [f"file cannot be read: {error.strerror}"]) from error
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise TaskBookError(
            path, [f"file is not UTF-8 text ({error}); save it as UTF-8"]
        ) from error
    except tomllib.TOMLDecodeError as error:
        raise TaskBookError(path, [f"not valid TOML: {error}"]) from error


def _parse_domains(raw: Any, path: Path, problems: list[str]) -> dict[str, Domain]:
    if not isinstance(raw, dict):
        problems.append("key 'domains' must be a table of [domains.NAME] tables")
        return {}
    domains = {}
    for name, table in raw.items():
        where = f"[domains.{name}]"
        if not DOMAIN_PATTERN.match(name):
            problems.append(f"{where}: domain names use lowercase letters, digits, '-' and '_'")
        if not isinstance(table, dict):
            problems.append(f"{where} must be a table")
            continue
        unknown = set(table) - {"description", "reference_corpus"}
        if unknown:
            problems.append(
                f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
                "valid keys: description, reference_corpus"
            )
        corpus = None
        if "reference_corpus" in table:
            corpus = (path.parent / str(table["reference_corpus"])).resolve()
            if not corpus.is_dir():
                problems.append(
                    f"{where}: key 'reference_corpus' points to {corpus}, which is not a "
                    "folder; create it or remove the key"
                )
        domains[name] = Domain(name, str(table.get("description", "")), corpus)
    return domains


def _parse_tasks(
    raw: Any, domains: dict[str, Domain], path: Path, problems: list[str]
) -> list[Task]:
    if raw is None:
        problems.append("no [[tasks]] entries; add at least one task")
        return []
    if not isinstance(raw, list):
        problems.append("key 'tasks' must be an array of tables, written [[tasks]]")
        return []
    tasks = []
    ids: set[str] = set()
    for index, table in enumerate(raw):
        task = _parse_task(index, table, domains, path, problems)
        if task is None:
            continue
        if task.id in ids:
            problems.append(f"task[{index}] id '{task.id}' is used twice; ids must be unique")
        ids.add(task.id)
        tasks.append(task)
    return tasks


def _parse_task(
    index: int, table: Any, domains: dict[str, Domain], path: Path, problems: list[str]
) -> Task | None:
    if not isinstance(table, dict):
        problems.append(f"task[{index}] must be a table")
        return None
    where = f"task[{index}]" + (
        f" (id '{table['id']}')" if isinstance(table.get("id"), str) else ""
    )
    before = len(problems)

    unknown = set(table) - TASK_KEYS
    if unknown:
        problems.append(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
            f"valid keys: {', '.join(sorted(TASK_KEYS))}"
        )
    task_id = _required_string(table, "id", where, problems)
    if task_id and not TASK_ID_PATTERN.match(task_id):
        problems.append(
            f"{where}: key 'id' must be 1-80 lowercase letters, digits or '-', got {task_id!r}"
        )
    domain = _required_string(table, "domain", where, problems)
    if domain and domain not in domains:
        problems.append(
            f"{where}: key 'domain' is '{domain}', which has no [domains.{domain}] table; "
            "add the table or fix the name"
        )
    language = table.get("language", "en")
    if not isinstance(language, str) or not language:
        problems.append(f"{where}: key 'language' must be a language tag such as 'en' or 'pt-BR'")
    prompt = _required_string(table, "prompt", where, problems)
    if prompt is not None:
        prompt = _insert_text_file(prompt, table.get("text_file"), path, where, problems)
    every = table.get("every", 1)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        problems.append(
            f"{where}: key 'every' must be a whole number of cycles >= 1, got {every!r}"
        )
    weight = table.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0:
        problems.append(f"{where}: key 'weight' must be a number above 0, got {weight!r}")
    sampling = _parse_sampling(table.get("sampling", {}), where, problems)

    if len(problems) > before or task_id is None or domain is None or prompt is None:
        return None
    return Task(
        id=task_id,
        domain=domain,
        language=str(language),
        prompt=prompt,
        sampling=sampling,
        every=int(every),
        weight=float(weight),
        source=path,
    )


def _required_string(table: dict, key: str, where: str, problems: list[str]) -> str | None:
    value = table.get(key)
    if value is None:
        problems.append(f"{where}: missing key '{key}'; add {key} = \"...\"")
        return None
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{where}: key '{key}' must be a non-empty string, got {value!r}")
        return None
    return value


def _insert_text_file(
    prompt: str, text_file: Any, path: Path, where: str, problems: list[str]
) -> str | None:
    count = prompt.count(TEXT_PLACEHOLDER)
    if text_file is None:
        if count:
            problems.append(
                f"{where}: key 'prompt' contains {TEXT_PLACEHOLDER} but the task has no "
                "'text_file'; add text_file or remove the placeholder"
            )
            return None
        return prompt
    if not isinstance(text_file, str):
        problems.append(f"{where}: key 'text_file' must be a path string, got {text_file!r}")
        return None
    if count != 1:
        problems.append(
            f"{where}: key 'prompt' must contain {TEXT_PLACEHOLDER} exactly once when "
            f"'text_file' is set (found {count})"
        )
        return None
    file = (path.parent / text_file).resolve()
    try:
        if file.stat().st_size > MAX_TEXT_FILE_BYTES:
            problems.append(
                f"{where}: text_file {file} is over {MAX_TEXT_FILE_BYTES} bytes; shorten it"
            )
            return None
        text = file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        problems.append(f"{where}: text_file {file} does not exist; fix key 'text_file'")
        return None
    except UnicodeDecodeError:
        problems.append(f"{where}: text_file {file} is not UTF-8 text; save it as UTF-8")
        return None
    except OSError as error:
        problems.append(f"{where}: text_file {file} cannot be read: {error.strerror}")
        return None
    # Plain replacement: the text is data and is never interpreted as a template.
    return prompt.replace(TEXT_PLACEHOLDER, text)


def _parse_sampling(raw: Any, where: str, problems: list[str]) -> SamplingParams:
    if not isinstance(raw, dict):
        problems.append(f"{where}: key 'sampling' must be a table, written [tasks.sampling]")
        return SamplingParams()
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "stop":
            if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
                problems.append(
                    f"{where}: key 'sampling.stop' must be a list of non-empty strings, "
                    f"got {value!r}"
                )
                continue
            values["stop"] = tuple(value)
            continue
        if key not in SAMPLING_LIMITS:
            valid = ", ".join(sorted([*SAMPLING_LIMITS, "stop"]))
            problems.append(f"{where}: unknown key 'sampling.{key}'; valid keys: {valid}")
            continue
        kind, low, high = SAMPLING_LIMITS[key]
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if kind is int and not isinstance(value, int):
            is_number = False
        if not is_number or not low <= value <= high:
            problems.append(
                f"{where}: key 'sampling.{key}' must be a {kind.__name__} between {low:g} "
                f"and {high:g}, got {value!r}"
            )
            continue
        values[key] = kind(value)
    return SamplingParams(**values)
