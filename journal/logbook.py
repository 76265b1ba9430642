"""The Git logbook: one commit per cycle with JSON records, Markdown pages and trailers.

Layout of the repository (text only):

    index.md                 the latest cycles, newest first
    index.json               the data behind index.md
    cycles/000042.json       the cycle record (schema_version inside)
    cycles/000042.md         the cycle page

Commit messages end with `A3X-*` trailers (`A3X-Cycle`, `A3X-Outcome`,
`A3X-Decision`, `A3X-Adapter`) so that `git log` can be filtered by them.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import git
import structlog

from daemon.records import CycleRecord, cycle_from_json
from journal import pages

log = structlog.get_logger(__name__)

AUTHOR = git.Actor("A3X", "a3x@localhost")
INDEX_LENGTH = 50  # cycles listed on index.md
TRAILER_PREFIX = "A3X-"


class JournalError(Exception):
    """The journal repository cannot be opened, read or written."""


@dataclass(frozen=True)
class JournalEntry:
    """One commit of the logbook, with its A3X trailers."""

    commit: str
    subject: str
    date: str
    trailers: dict[str, list[str]]

    @property
    def cycle(self) -> int | None:
        values = self.trailers.get("A3X-Cycle")
        return int(values[0]) if values else None

    @property
    def outcome(self) -> str | None:
        values = self.trailers.get("A3X-Outcome")
        return values[0] if values else None


class Logbook:
    def __init__(self, path: Path):
        self.path = path
        try:
            self.repo = self._open_or_init(path)
        except (OSError, git.GitError) as error:
            raise JournalError(
                f"journal {path} cannot be opened as a Git repository: {error}"
            ) from error

    @staticmethod
    def _open_or_init(path: Path) -> git.Repo:
        if (path / ".git").exists():
            return git.Repo(path)
        path.mkdir(parents=True, exist_ok=True)
        repo = git.Repo.init(path, initial_branch="main")
        with repo.config_writer() as config:
            config.set_value("user", "name", AUTHOR.name)
            config.set_value("user", "email", AUTHOR.email)
            config.set_value("core", "fsync", "all")
        return repo

    def remove_stale_lock(self) -> bool:
        """Remove a leftover `index.lock`. Call only while holding the A3X cycle lock,
        which guarantees that no other A3X process is committing."""
        lock = Path(self.repo.git_dir) / "index.lock"
        if lock.exists():
            lock.unlink()
            log.warning("journal.stale_lock_removed", path=str(lock))
            return True
        return False

    def discard_uncommitted(self) -> None:
        """Bring the work tree back to the last commit, dropping files that a killed
        cycle wrote but did not commit. Committed history is never touched."""
        if self.repo.head.is_valid():
            self.repo.git.reset("--quiet")
            self.repo.git.checkout("--quiet", "HEAD", "--", ".")
        self.repo.git.clean("-fdq", "--", ".")

    def committed_cycle(self, cycle: int) -> CycleRecord | None:
        """Return the cycle's record as committed at HEAD, or None when it was never committed."""
        if not self.repo.head.is_valid():
            return None
        try:
            blob = self.repo.head.commit.tree / f"cycles/{cycle:06d}.json"
        except KeyError:
            return None
        return cycle_from_json(json.loads(blob.data_stream.read().decode("utf-8")))

    def commit_of_cycle(self, cycle: int) -> str | None:
        """Return the sha of the last commit that wrote the cycle's record, if any."""
        sha = self.repo.git.log("-1", "--format=%H", "--", f"cycles/{cycle:06d}.json")
        return sha.strip() or None

    def commit_cycle(self, record: CycleRecord) -> str:
        """Write the cycle's record and page, update the index, commit; return the sha."""
        name = f"cycles/{record.cycle:06d}"
        self._write(f"{name}.json", json.dumps(record.to_json(), indent=2, ensure_ascii=False))
        self._write(f"{name}.md", pages.cycle_page(record))
        index = self._updated_index(record)
        self._write("index.json", json.dumps(index, indent=2, ensure_ascii=False))
        self._write("index.md", pages.index_page(index))
        message = pages.commit_message(record)
        files = [f"{name}.json", f"{name}.md", "index.json", "index.md"]
        if (self.path / "plots").is_dir():
            files.append("plots")
        return self._commit(files, message)

    def commit_decision(self, result: dict) -> str:
        """Write a retraining decision's page, JSON and loss plot, commit; return the sha."""
        from journal import decisions

        stem = f"decisions/{decisions.decision_stem(result)}"
        document = {"schema_version": decisions.SCHEMA_VERSION, **result}
        self._write(f"{stem}.json", json.dumps(document, indent=2, ensure_ascii=False))
        files = [f"{stem}.json", f"{stem}.md"]
        plot = None
        losses = result.get("training", {}).get("losses")
        if losses:
            try:
                decisions.write_loss_plot(losses, self.path / f"{stem}-loss.png")
                plot = f"{Path(stem).name}-loss.png"
                files.append(f"{stem}-loss.png")
            except Exception:  # a plot is never worth a lost decision
                log.exception("journal.loss_plot_failed", adapter=result.get("adapter"))
        self._write(f"{stem}.md", decisions.decision_page(result, plot))
        message = (
            decisions.decision_subject(result)
            + "\n\n"
            + format_trailers(decisions.decision_trailers(result))
        )
        return self._commit(files, message)

    def _updated_index(self, record: CycleRecord) -> list[dict]:
        index_file = self.path / "index.json"
        index = json.loads(index_file.read_text(encoding="utf-8")) if index_file.exists() else []
        index = [entry for entry in index if entry["cycle"] != record.cycle]
        index.insert(0, pages.index_entry(record))
        return index[:INDEX_LENGTH]

    def _write(self, relative: str, text: str) -> None:
        """Write a file atomically: a killed process leaves the old or the new content."""
        target = self.path / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                stream.write(text)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def _commit(self, files: Sequence[str], message: str) -> str:
        try:
            self.repo.git.add("--", *files)
            self.repo.git.commit("--quiet", "--no-verify", "-m", message)
        except git.GitCommandError as error:
            raise JournalError(
                f"commit to journal {self.path} failed: {error.stderr.strip()}"
            ) from error
        return self.repo.head.commit.hexsha

    def entries(
        self, last: int | None = None, since: datetime | None = None
    ) -> Iterator[JournalEntry]:
        """Yield commits newest first, with their A3X trailers."""
        if not self.repo.head.is_valid():
            return
        for commit in self.repo.iter_commits("HEAD", max_count=last):
            date = commit.committed_datetime.astimezone(UTC)
            if since is not None and date < since:
                break
            yield JournalEntry(
                commit=commit.hexsha,
                subject=commit.summary
                if isinstance(commit.summary, str)
                else commit.summary.decode(),
                date=date.isoformat(timespec="seconds"),
                trailers=parse_trailers(str(commit.message)),
            )

    def read_cycle(self, cycle: int) -> CycleRecord:
        path = self.path / "cycles" / f"{cycle:06d}.json"
        if not path.exists():
            raise JournalError(f"cycle {cycle} is not in the journal {self.path}")
        return cycle_from_json(json.loads(path.read_text(encoding="utf-8")))

    def cycle_page_path(self, cycle: int) -> Path:
        return self.path / "cycles" / f"{cycle:06d}.md"


def parse_trailers(message: str) -> dict[str, list[str]]:
    """Read the `A3X-Key: value` lines of a commit message's last paragraph."""
    paragraphs = [p for p in message.strip().split("\n\n") if p.strip()]
    if len(paragraphs) < 2:
        return {}
    trailers: dict[str, list[str]] = {}
    for line in paragraphs[-1].splitlines():
        key, separator, value = line.partition(": ")
        if separator and key.startswith(TRAILER_PREFIX):
            trailers.setdefault(key, []).append(value.strip())
    return trailers


def format_trailers(trailers: Mapping[str, Sequence[str]]) -> str:
    return "\n".join(f"{key}: {value}" for key, values in trailers.items() for value in values)
