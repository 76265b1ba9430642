"""The adapters of a home: `adapters/<domain>/v<N>/` with a versioned record each.

A version folder holds the PEFT folder (`peft/`), the GGUF adapter
(`adapter.gguf`) and `record.json`: the status (candidate, accepted,
rejected, failed), the reason, the evidence and the training summary.
Records are written atomically, so a killed process leaves the old or the
new record.

The adapter that serves a domain is chosen in this order:

1. the version the owner activated (`a3x adapters activate`), whatever its status;
2. otherwise the gate's choice, the newest accepted version, unless the owner
   deactivated it: then the base model answers.

The owner's overrides are stored in the version's record under "owner"
(`{"serving": true|false, "by": user, "at": time}`), pins under "pinned", and
every change is appended to "owner_history". A record with owner fields is
written as schema version 2, so that an A3X that reads only version 1, and
would ignore the override, rejects it instead; other records stay version 1.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora import LoraError
from lora.metadata import AdapterMetadata, BaseModelRef

if TYPE_CHECKING:
    from lora.layers import LayerScales
    from runtime.loader import ModelInfo

RECORD_FILE = "record.json"
RECORD_SCHEMA_VERSION = 2  # the newest version written and read
PLAIN_RECORD_SCHEMA_VERSION = 1  # for records without owner fields
READABLE_RECORD_VERSIONS = (1, 2)
OWNER_FIELDS = ("owner", "pinned", "layer_scales")
DOMAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ADAPTER_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,63})/v(\d+)$")


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

    @property
    def owner_serving(self) -> bool | None:
        """The owner's override: True activated, False deactivated, None the gate decides."""
        owner = self.record.get("owner")
        return bool(owner["serving"]) if isinstance(owner, dict) else None

    @property
    def pinned(self) -> bool:
        return isinstance(self.record.get("pinned"), dict)

    @property
    def layer_scales(self) -> LayerScales | None:
        """The owner's per-layer scales (lora/layers.py), applied wherever this version
        is used, or None when none are set. Raises LayerScalesError for a malformed
        record entry."""
        entry = self.record.get("layer_scales")
        if not isinstance(entry, dict):
            return None
        from lora.layers import LayerScales

        return LayerScales.parse(entry.get("scales") or {})


def parse_adapter_name(name: str) -> tuple[str, int]:
    """Split `domain/vN` into the domain and the version number."""
    match = ADAPTER_NAME.match(name)
    if not match:
        raise LoraError(
            f"adapter name {name!r} is invalid; write domain/vN, for example geography/v2 "
            "(see `a3x adapters list`)"
        )
    return match.group(1), int(match.group(2))


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
        return self._write(Adapter(adapter.domain, adapter.version, adapter.folder, status, record))

    def _write(self, adapter: Adapter) -> Adapter:
        record = dict(adapter.record)
        uses_owner_fields = any(key in record for key in OWNER_FIELDS)
        record["schema_version"] = (
            RECORD_SCHEMA_VERSION if uses_owner_fields else PLAIN_RECORD_SCHEMA_VERSION
        )
        _write_atomic(adapter.folder / RECORD_FILE, json.dumps(record, indent=2) + "\n")
        return Adapter(adapter.domain, adapter.version, adapter.folder, adapter.status, record)

    def get(self, name: str) -> Adapter:
        """Return the version named `domain/vN`, or raise LoraError listing the known names."""
        domain, version = parse_adapter_name(name)
        for adapter in self.versions(domain):
            if adapter.version == version:
                return adapter
        known = ", ".join(a.name for a in self.all()) or "none"
        raise LoraError(f"no adapter {name} in {self.root}; known adapters: {known}")

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
        """Return the version that serves a domain, or None (the base answers): the one
        the owner activated, else the gate's choice unless the owner deactivated it."""
        versions = self.versions(domain)
        activated = [a for a in versions if a.owner_serving is True]
        if activated:
            return activated[-1]
        choice = gate_choice(versions)
        if choice is None or choice.owner_serving is False:
            return None
        return choice

    # Owner overrides: each re-reads the record first, so that a change made by
    # another process since `adapter` was read is kept.

    def activate(self, adapter: Adapter, by: str | None = None) -> Adapter:
        """Make a version serve its domain; any other activated version of the domain
        returns to the gate's decision."""
        _require_settled(adapter, "be activated")
        if adapter.status is AdapterStatus.FAILED or not adapter.gguf_path.exists():
            raise LoraError(
                f"adapter {adapter.name} is {adapter.status} and its {adapter.gguf_path.name} "
                f"{'exists' if adapter.gguf_path.exists() else 'is missing'}, so it cannot "
                "serve; activate an accepted or rejected version"
            )
        for other in self.versions(adapter.domain):
            if other.version != adapter.version and other.owner_serving is True:
                self._change(other, "return to the gate's choice", by, _clear_owner)
        return self._change(adapter, "activate", by, _set_owner(True))

    def deactivate(self, adapter: Adapter, by: str | None = None) -> Adapter:
        """Stop a version from serving; where it was the gate's choice, the base answers."""
        _require_settled(adapter, "be deactivated")
        return self._change(adapter, "deactivate", by, _set_owner(False))

    def pin(self, adapter: Adapter, by: str | None = None) -> Adapter:
        """Pin a version. One already pinned keeps its pin and its history unchanged."""
        _require_settled(adapter, "be pinned")
        fresh = self._reread(adapter)
        if fresh.pinned:
            return fresh
        return self._change(fresh, "pin", by, _pin)

    def unpin(self, adapter: Adapter, by: str | None = None) -> Adapter:
        """Unpin a version. One not pinned is left unchanged."""
        fresh = self._reread(adapter)
        if not fresh.pinned:
            return fresh
        return self._change(fresh, "unpin", by, _unpin)

    def set_layer_scales(
        self, adapter: Adapter, scales: LayerScales | None, by: str | None = None
    ) -> Adapter:
        """Store per-layer scales for a version (None clears them), after checking them
        against the modules and blocks its GGUF file modifies."""
        _require_settled(adapter, "get layer scales")
        if scales is None:
            fresh = self._reread(adapter)
            if "layer_scales" not in fresh.record:
                return fresh
            return self._change(fresh, "clear layer scales", by, _clear_layer_scales)
        from lora.gguf_adapter import read_gguf_adapter
        from lora.layers import LayerScalesError, tensor_factors
        from lora.names import block_of

        if not adapter.gguf_path.exists():
            raise LoraError(
                f"adapter {adapter.name} has no {adapter.gguf_path.name}, so layer scales "
                "cannot be checked against it"
            )
        gguf = read_gguf_adapter(adapter.gguf_path, load_tensors=False)
        blocks = [block for block in map(block_of, gguf.pairs) if block is not None]
        factors = tensor_factors(gguf, scales, max(blocks, default=-1) + 1)
        if scales.is_identity:
            raise LayerScalesError(
                f"the layer scales set every factor of {adapter.name} to 1, which changes "
                "nothing; clear them instead (`a3x adapters layers NAME --clear`)"
            )
        if not any(factors.values()):
            raise LayerScalesError(
                f"the layer scales set every tensor of {adapter.name} to 0; deactivate the "
                "adapter instead (`a3x adapters deactivate`)"
            )
        return self._change(adapter, "set layer scales", by, _set_layer_scales(scales))

    def pinned(self) -> list[Adapter]:
        """Return the pinned versions, which `remove` rejects without `force`. A cycle
        keeps the serving ones among them loaded in the llama.cpp adapter cache."""
        return [adapter for adapter in self.all() if adapter.pinned]

    def remove(self, adapter: Adapter, force: bool = False) -> None:
        """Delete a version folder; a pinned or serving version only with `force`."""
        fresh = self._reread(adapter)
        serving = self.serving(fresh.domain)
        reasons = []
        if fresh.pinned:
            reasons.append("it is pinned (`a3x adapters unpin` it first)")
        if serving is not None and serving.version == fresh.version:
            reasons.append("it serves its domain (`a3x adapters deactivate` it first)")
        if reasons and not force:
            raise LoraError(
                f"adapter {fresh.name} was not removed because {' and '.join(reasons)}, "
                "or pass --force"
            )
        shutil.rmtree(fresh.folder)

    def _change(
        self,
        adapter: Adapter,
        action: str,
        by: str | None,
        update: Callable[[dict[str, Any], dict[str, str]], None],
    ) -> Adapter:
        """Apply `update(record, stamp)` to a fresh copy of the record and log the action."""
        fresh = self._reread(adapter)
        record = dict(fresh.record)
        stamp = {"by": by or current_user(), "at": datetime.now(UTC).isoformat(timespec="seconds")}
        update(record, stamp)
        record["owner_history"] = [*record.get("owner_history", []), {"action": action, **stamp}]
        return self._write(Adapter(fresh.domain, fresh.version, fresh.folder, fresh.status, record))

    def _reread(self, adapter: Adapter) -> Adapter:
        if not (adapter.folder / RECORD_FILE).exists():
            raise LoraError(f"adapter {adapter.name} was removed from {self.root}")
        return self._read(adapter.domain, adapter.version, adapter.folder)

    def _read(self, domain: str, version: int, folder: Path) -> Adapter:
        path = folder / RECORD_FILE
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise LoraError(f"adapter record {path} is unreadable ({error})") from error
        schema = record.get("schema_version")
        if schema not in READABLE_RECORD_VERSIONS:
            raise LoraError(
                f"adapter record {path} has schema_version {schema!r}; this A3X reads versions "
                f"{', '.join(map(str, READABLE_RECORD_VERSIONS))}. Upgrade A3X"
            )
        try:
            status = AdapterStatus(record.get("status"))
        except ValueError as error:
            raise LoraError(f"adapter record {path} has an unknown status") from error
        return Adapter(domain, version, folder, status, record)


def gate_choice(versions: list[Adapter]) -> Adapter | None:
    """Return the newest accepted version among a domain's versions."""
    accepted = [a for a in versions if a.status is AdapterStatus.ACCEPTED]
    return accepted[-1] if accepted else None


def _set_owner(serving: bool) -> Callable[[dict[str, Any], dict[str, str]], None]:
    def update(record: dict[str, Any], stamp: dict[str, str]) -> None:
        record["owner"] = {"serving": serving, **stamp}

    return update


def _clear_owner(record: dict[str, Any], stamp: dict[str, str]) -> None:
    record.pop("owner", None)


def _pin(record: dict[str, Any], stamp: dict[str, str]) -> None:
    record["pinned"] = stamp


def _unpin(record: dict[str, Any], stamp: dict[str, str]) -> None:
    record.pop("pinned", None)


def _set_layer_scales(scales: LayerScales) -> Callable[[dict[str, Any], dict[str, str]], None]:
    def update(record: dict[str, Any], stamp: dict[str, str]) -> None:
        record["layer_scales"] = {"scales": scales.to_json(), **stamp}

    return update


def _clear_layer_scales(record: dict[str, Any], stamp: dict[str, str]) -> None:
    record.pop("layer_scales", None)


def current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry, as in some containers
        return f"uid {os.getuid()}"


def _require_settled(adapter: Adapter, action: str) -> None:
    if adapter.status is AdapterStatus.CANDIDATE:
        raise LoraError(
            f"adapter {adapter.name} is a candidate still in its retraining round, so it "
            f"cannot {action} now; wait for the round to accept or reject it"
        )


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


# The base an adapter was trained on


def adapter_metadata(adapter: Adapter) -> AdapterMetadata | None:
    """Read the A3X metadata of a version's GGUF adapter, or of its PEFT folder when the
    GGUF file is missing; None when neither has A3X metadata."""
    from lora.info import describe_adapter

    source = adapter.gguf_path if adapter.gguf_path.exists() else adapter.peft_folder
    if not source.exists():
        return None
    return describe_adapter(source).metadata


def base_mismatch(adapter: Adapter, base: BaseModelRef) -> str | None:
    """Return why a version does not fit the configured base, or None when it fits.

    An adapter without A3X metadata cannot be checked here, so it passes; llama.cpp
    loading still checks tensor names and shapes.
    """
    meta = adapter_metadata(adapter)
    if meta is None:
        return None
    trained = meta.base
    if trained.sha256 == base.sha256 and trained.architecture == base.architecture:
        return None
    if not base.sha256 and trained.architecture == base.architecture:
        return None  # a Hugging Face folder has no GGUF sha256 to compare
    return (
        f"adapter {adapter.name} was trained on base {trained.name or '?'} "
        f"({trained.architecture}, sha256 {trained.sha256[:12]}), but the configured model "
        f"is {base.name or '?'} ({base.architecture}, sha256 {base.sha256[:12] or 'none'}); "
        "configure that base as model.path, or retrain the domain on this one"
    )


def configured_base(model: ModelInfo) -> BaseModelRef | None:
    """Return the configured model as adapter metadata names a base; None for a Hugging
    Face folder, which has no GGUF architecture or file sha256 to compare."""
    if model.info is None:
        return None
    return BaseModelRef(model.info.name, model.info.architecture, model.sha256)
