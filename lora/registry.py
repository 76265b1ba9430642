"""The adapters of a home: `adapters/<domain>/v<N>/` with a versioned record each.

A version folder holds the PEFT folder (`peft/`), the GGUF adapter
(`adapter.gguf`) and `record.json`: the status (candidate, accepted,
rejected, failed), the reason, the evidence and the training summary. The
adapter that serves a domain is its newest accepted version. Records are
written atomically, so a killed process leaves the old or the new record.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from lora import LoraError

RECORD_FILE = "record.json"
RECORD_SCHEMA_VERSION = 1
DOMAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class AdapterStatus(StrEnum):
    CANDIDATE = "candidate"  # trained, not yet gated
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    FAILED = "failed"  # training or export failed


@dataclass(frozen=True)
class Adapter:
    domain: str
    version: int
    folder: Path
    status: AdapterStatus
    record: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.domain}/v{self.version}"

    @property
    def gguf_path(self) -> Path:
        return self.folder / "adapter.gguf"

    @property
    def peft_folder(self) -> Path:
        return self.folder / "peft"


class AdapterRegistry:
    def __init__(self, root: Path):
        self.root = root

    def create(self, domain: str, fields: dict[str, Any]) -> Adapter:
        """Make the next version folder of a domain, with a candidate record."""
        if not DOMAIN_NAME.match(domain):
            raise LoraError(f"domain name {domain!r} cannot name an adapter folder")
        versions = [adapter.version for adapter in self.versions(domain)]
        version = max(versions, default=0) + 1
        folder = self.root / domain / f"v{version}"
        folder.mkdir(parents=True)
        record = {"domain": domain, "version": version, **fields}
        return self.set_status(
            Adapter(domain, version, folder, AdapterStatus.CANDIDATE, record),
            AdapterStatus.CANDIDATE,
        )

    def set_status(self, adapter: Adapter, status: AdapterStatus, **fields: Any) -> Adapter:
        record = {**adapter.record, **fields, "status": str(status)}
        record["schema_version"] = RECORD_SCHEMA_VERSION
        _write_atomic(adapter.folder / RECORD_FILE, json.dumps(record, indent=2) + "\n")
        return Adapter(adapter.domain, adapter.version, adapter.folder, status, record)

    def versions(self, domain: str) -> list[Adapter]:
        folder = self.root / domain
        if not folder.is_dir():
            return []
        found = []
        for child in folder.iterdir():
            match = re.fullmatch(r"v(\d+)", child.name)
            if match and (child / RECORD_FILE).exists():
                found.append(self._read(domain, int(match.group(1)), child))
        return sorted(found, key=lambda adapter: adapter.version)

    def all(self) -> list[Adapter]:
        if not self.root.is_dir():
            return []
        return [a for d in sorted(self.root.iterdir()) if d.is_dir() for a in self.versions(d.name)]

    def serving(self, domain: str) -> Adapter | None:
        """Return the newest accepted version of a domain, or None (the base answers)."""
        accepted = [a for a in self.versions(domain) if a.status is AdapterStatus.ACCEPTED]
        return accepted[-1] if accepted else None

    def _read(self, domain: str, version: int, folder: Path) -> Adapter:
        path = folder / RECORD_FILE
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise LoraError(f"adapter record {path} is unreadable ({error})") from error
        schema = record.get("schema_version")
        if schema != RECORD_SCHEMA_VERSION:
            raise LoraError(
                f"adapter record {path} has schema_version {schema!r}; this A3X reads version "
                f"{RECORD_SCHEMA_VERSION}. Upgrade A3X"
            )
        try:
            status = AdapterStatus(record.get("status"))
        except ValueError as error:
            raise LoraError(f"adapter record {path} has an unknown status") from error
        return Adapter(domain, version, folder, status, record)


def _write_atomic(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
