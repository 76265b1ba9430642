"""Byte-budgeted paging of LoRA adapters loaded into llama.cpp.

Loading an adapter costs memory for as long as its handle lives, so the
cache keeps handles up to a byte budget and frees the least recently used
one (`llama_adapter_lora_free`) when a new adapter needs room. The active
set (the adapters llama.cpp applies now) and pinned adapters are never
evicted. Resident bytes are counted from the GGUF tensor table, which is
what llama.cpp allocates, up to a few bytes of alignment per tensor.

llama.cpp does not memory-map adapter files. `llama_adapter_lora_init` reads
each tensor with plain file reads into a buffer that it allocates and keeps
(src/llama-adapter.cpp in the llama.cpp that llama-cpp-python 0.3.36
vendors), and it closes the file after loading. Measured with that build on
Gemma 3 270M: loading a 61.9 MiB adapter raised the process RSS by 62.8 MiB,
/proc/self/maps listed no mapping of the file, and freeing the handle gave
back all but 0.9 MiB. So the budget is anonymous memory, not page cache,
and an adapter file may be replaced or deleted once it is loaded.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

MIB = 2**20
# The signature of a file that no longer exists. A resident adapter whose file
# was deleted stays usable, because llama.cpp keeps a copy of its tensors.
_MISSING = (-1, -1)


class AdapterError(Exception):
    """A LoRA adapter file cannot be loaded or does not fit the base model."""


class AdapterBudgetError(AdapterError):
    """The adapters requested do not fit the adapter byte budget."""


@dataclass
class ResidentAdapter:
    """A loaded adapter: its llama.cpp handle and the bytes of its tensors."""

    path: Path
    handle: Any  # llama_adapter_lora_p
    resident_bytes: int
    signature: tuple[int, int]  # (size, mtime in ns) of the file when it was loaded
    pinned: bool = False


class AdapterCache:
    """Loaded adapters within a byte budget, evicted in least-recently-used order.

    The cache owns no llama.cpp state itself; the backend passes three
    functions. `inspect(path)` validates a file without llama.cpp and returns
    its resident bytes, so that a bad file or a budget overrun is found before
    anything is evicted; `load(path)` returns a llama.cpp handle;
    `free(handle)` releases it. Calls are serialized by a lock.
    """

    def __init__(
        self,
        budget_bytes: int,
        inspect: Callable[[Path], int],
        load: Callable[[Path], Any],
        free: Callable[[Any], None],
    ):
        if budget_bytes <= 0:
            raise ValueError(
                f"adapter budget {budget_bytes} bytes is not positive; give a budget in bytes "
                f"such as {256 * MIB} (256 MiB)"
            )
        self.budget_bytes = budget_bytes
        self._inspect, self._load, self._free = inspect, load, free
        self._entries: OrderedDict[str, ResidentAdapter] = OrderedDict()  # least recent first
        # Files validated before, by path: (signature, resident bytes). Reloading an
        # evicted adapter whose file is unchanged skips the validation (about 1.2 ms
        # for a 144-tensor adapter).
        self._validated: dict[str, tuple[tuple[int, int], int]] = {}
        self._active: tuple[str, ...] = ()
        self._lock = threading.RLock()

    # Queries

    @property
    def resident_bytes(self) -> int:
        return sum(entry.resident_bytes for entry in self._entries.values())

    @property
    def active(self) -> tuple[Path, ...]:
        return tuple(self._entries[key].path for key in self._active)

    def entries(self) -> list[ResidentAdapter]:
        """Return the resident adapters, least recently used first."""
        with self._lock:
            return list(self._entries.values())

    def is_resident(self, path: Path | str) -> bool:
        return _key(path) in self._entries

    # Changes

    def activate(self, paths: Sequence[Path], detach: Callable[[], None]) -> list[Any]:
        """Make `paths` resident and the active set; return their handles in order.

        Room is made from inactive, unpinned adapters first. When only the
        previous active set can make room, `detach()` is called once before
        the first of them is freed, and it must make llama.cpp stop applying
        the previous set. Raises AdapterBudgetError before any eviction when
        the requested set and the pinned adapters exceed the budget together.
        """
        with self._lock:
            keys = [_key(path) for path in paths]
            wanted = list(dict.fromkeys(keys))
            sizes = self._sizes(wanted)
            self._check_fits(wanted, sizes, f"activating {len(wanted)} adapter(s)")
            detacher = _Once(detach, self._forget_active)
            for key in wanted:
                self._ensure_resident(key, sizes[key], set(wanted), detacher)
            self._active = tuple(wanted)
            for key in wanted:
                self._entries.move_to_end(key)
            return [self._entries[key].handle for key in keys]

    def prefetch(self, paths: Iterable[Path], skip_invalid: bool = False) -> list[Path]:
        """Load adapters ahead of use without activating them; return those now resident.

        An adapter that does not fit beside the active, pinned and earlier
        prefetched adapters is skipped with a warning, because prefetching is
        a hint; its file is read ahead into the page cache instead, so that
        loading it later reads memory rather than the disk. An invalid file
        raises AdapterError, or with `skip_invalid` is skipped with a warning
        (activating it later raises).
        """
        with self._lock:
            protected = set(self._active)
            resident = []
            for path in paths:
                key = _key(path)
                if not self._is_fresh(key):
                    try:
                        size = self._sizes([key])[key]
                    except AdapterError as error:
                        if not skip_invalid:
                            raise
                        log.warning("adapter_cache.prefetch_invalid", path=key, error=str(error))
                        continue
                    if not self._room_possible(size, protected):
                        log.warning(
                            "adapter_cache.prefetch_skipped",
                            path=str(path),
                            bytes=size,
                            budget_bytes=self.budget_bytes,
                            locked_bytes=self._locked_bytes(protected),
                        )
                        read_ahead(Path(key))
                        continue
                    self._ensure_resident(key, size, protected, detacher=None)
                self._entries.move_to_end(key)
                protected.add(key)
                resident.append(self._entries[key].path)
            return resident

    def pin(self, path: Path) -> None:
        """Load an adapter if needed and keep it resident until `unpin`."""
        with self._lock:
            key = _key(path)
            size = self._sizes([key])[key]
            others = sum(
                entry.resident_bytes
                for other, entry in self._entries.items()
                if other != key and (entry.pinned or other in self._active)
            )
            if others + size > self.budget_bytes:
                raise AdapterBudgetError(
                    f"pinning {path} ({_mib(size)}) exceeds the adapter budget of "
                    f"{_mib(self.budget_bytes)}: active and pinned adapters already hold "
                    f"{_mib(others)}; unpin an adapter or raise the adapter budget "
                    "([model] adapter_budget_mb)"
                )
            self._ensure_resident(key, size, set(self._active) | {key}, detacher=None)
            self._entries[key].pinned = True

    def unpin(self, path: Path) -> None:
        """Let a pinned adapter be evicted again; a path that is not resident is ignored."""
        with self._lock:
            entry = self._entries.get(_key(path))
            if entry is not None:
                entry.pinned = False

    def evict(self, path: Path) -> bool:
        """Free a resident adapter now; return False when it was not resident."""
        with self._lock:
            key = _key(path)
            entry = self._entries.get(key)
            if entry is None:
                return False
            if key in self._active:
                raise AdapterError(
                    f"adapter {path} is active and cannot be evicted; activate another set first"
                )
            if entry.pinned:
                raise AdapterError(f"adapter {path} is pinned; unpin it before evicting it")
            self._drop(key, reason="requested")
            return True

    def close(self) -> None:
        """Free every handle. The caller detaches the active set from llama.cpp first."""
        with self._lock:
            self._active = ()
            for key in list(self._entries):
                self._drop(key, reason="closed")

    # Internals

    def _sizes(self, keys: list[str]) -> dict[str, int]:
        """Resident bytes per key: the stored size when the file is unchanged since it was
        loaded or validated, else what `inspect` reads from the file (validating it)."""
        sizes = {}
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None and self._is_fresh(key):
                sizes[key] = entry.resident_bytes
                continue
            signature = _signature(key)
            known = self._validated.get(key)
            if known is not None and known[0] == signature:
                sizes[key] = known[1]
                continue
            sizes[key] = self._inspect(Path(key))
            self._validated[key] = (signature, sizes[key])
        return sizes

    def _check_fits(self, keys: list[str], sizes: dict[str, int], action: str) -> None:
        wanted = sum(sizes[key] for key in keys)
        pinned = sum(
            entry.resident_bytes
            for key, entry in self._entries.items()
            if entry.pinned and key not in keys
        )
        if wanted + pinned <= self.budget_bytes:
            return
        listed = ", ".join(f"{Path(key).name} {_mib(sizes[key])}" for key in keys)
        held = f", and pinned adapters hold {_mib(pinned)}" if pinned else ""
        raise AdapterBudgetError(
            f"{action} needs {_mib(wanted)} ({listed}){held}, but the adapter budget is "
            f"{_mib(self.budget_bytes)}; raise the adapter budget ([model] adapter_budget_mb), "
            "unpin adapters or use "
            "fewer or smaller adapters"
        )

    def _ensure_resident(
        self, key: str, size: int, protected: set[str], detacher: _Once | None
    ) -> None:
        entry = self._entries.get(key)
        if entry is not None and self._is_fresh(key):
            return
        if entry is not None:  # the file changed since it was loaded
            if key in self._active:
                if detacher is None:
                    raise AdapterError(
                        f"adapter {key} changed on disk while active; activate it again to "
                        "load the new file"
                    )
                detacher()
            self._drop(key, reason="file changed")
        self._make_room(size, protected, detacher)
        signature = _signature(key)
        handle = self._load(Path(key))
        self._entries[key] = ResidentAdapter(Path(key), handle, size, signature)
        log.debug("adapter_cache.loaded", path=key, bytes=size, resident_bytes=self.resident_bytes)

    def _make_room(self, size: int, protected: set[str], detacher: _Once | None) -> None:
        while self.resident_bytes + size > self.budget_bytes:
            victim = self._victim(protected, allow_active=False)
            if victim is None and detacher is not None:
                victim = self._victim(protected, allow_active=True)
                if victim is not None:
                    detacher()
            if victim is None:
                raise AdapterBudgetError(
                    f"no adapter can be evicted to make room for {_mib(size)}: "
                    f"{_mib(self.resident_bytes)} of the {_mib(self.budget_bytes)} budget are "
                    "held by active or pinned adapters; unpin adapters or raise the budget "
                    "([model] adapter_budget_mb)"
                )
            self._drop(victim, reason="budget")

    def _victim(self, protected: set[str], allow_active: bool) -> str | None:
        for key, entry in self._entries.items():  # least recently used first
            if key in protected or entry.pinned:
                continue
            if key in self._active and not allow_active:
                continue
            return key
        return None

    def _room_possible(self, size: int, protected: set[str]) -> bool:
        return self._locked_bytes(protected) + size <= self.budget_bytes

    def _locked_bytes(self, protected: set[str]) -> int:
        """Bytes that eviction without detaching cannot free: protected, active and pinned."""
        return sum(
            entry.resident_bytes
            for key, entry in self._entries.items()
            if key in protected or key in self._active or entry.pinned
        )

    def _is_fresh(self, key: str) -> bool:
        """Tell whether `key` is resident and its file is unchanged or deleted since loading."""
        entry = self._entries.get(key)
        if entry is None:
            return False
        current = _signature(key)
        return current == entry.signature or current == _MISSING

    def _forget_active(self) -> None:
        self._active = ()

    def _drop(self, key: str, reason: str) -> None:
        entry = self._entries.pop(key)
        self._free(entry.handle)
        log.debug("adapter_cache.evicted", path=key, bytes=entry.resident_bytes, reason=reason)


class _Once:
    """Call the backend's detach function at most once, then mark the active set empty."""

    def __init__(self, detach: Callable[[], None], forget: Callable[[], None]):
        self._detach, self._forget, self.done = detach, forget, False

    def __call__(self) -> None:
        if not self.done:
            self._detach()
            self._forget()
            self.done = True


def read_ahead(path: Path) -> bool:
    """Ask the kernel to read a file into the page cache in the background
    (posix_fadvise WILLNEED). Return False where that is not possible."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:  # not on macOS
        return False
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        advise(descriptor, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        return False
    finally:
        os.close(descriptor)
    return True


def _key(path: Path | str) -> str:
    return os.path.abspath(path)


def _signature(key: str) -> tuple[int, int]:
    try:
        stat = os.stat(key)
    except OSError:
        return _MISSING
    return (stat.st_size, stat.st_mtime_ns)


def _mib(count: int) -> str:
    return f"{count / MIB:.1f} MiB" if count >= MIB else f"{count:,} bytes"
