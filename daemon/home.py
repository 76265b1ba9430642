"""The A3X home folder: its layout, a writability check and the cycle lock."""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType


class HomeError(Exception):
    """A3X_HOME cannot be created or written."""


class CycleBusyError(Exception):
    """Another process holds the cycle lock."""


@dataclass(frozen=True)
class Home:
    root: Path

    @property
    def state_path(self) -> Path:
        return self.root / "state.sqlite"

    @property
    def journal_path(self) -> Path:
        return self.root / "journal"

    @property
    def adapters_path(self) -> Path:
        return self.root / "adapters"

    @property
    def cache_path(self) -> Path:
        return self.root / "cache"

    @property
    def lock_path(self) -> Path:
        return self.root / "cycle.lock"


def prepare_home(root: Path) -> Home:
    """Create the home layout and prove it is writable, or raise HomeError naming the fix."""
    home = Home(root)
    hint = "choose another folder with --home or A3X_HOME, or fix its permissions"
    try:
        for folder in (root, home.journal_path, home.adapters_path, home.cache_path):
            folder.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except PermissionError as error:
        raise HomeError(f"home folder {root} is not writable ({error.strerror}); {hint}") from error
    except (NotADirectoryError, FileExistsError) as error:
        raise HomeError(
            f"home folder {root} cannot be created: {error.filename} is a file, not a folder; "
            f"{hint}"
        ) from error
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise HomeError(
                f"home folder {root}: the disk is full; free space and retry"
            ) from error
        raise HomeError(f"home folder {root} cannot be used ({error.strerror}); {hint}") from error
    return home


class CycleLock:
    """An exclusive flock on `cycle.lock`: at most one cycle runs per home.

    The kernel drops the lock when the holding process dies, so a killed
    cycle never leaves the home locked.
    """

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CycleBusyError(
                f"another cycle is running in this home (process {holder} holds {self.path}); "
                "wait for it to finish"
            ) from error
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> CycleLock:
        self.acquire()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
