"""The specialization policy: an adapter serves a domain only where it measurably
beats the base model there.

The evidence is the gate record of the adapter's retraining round
(record.json "gate", written by lora/retrain.py):

- on its own domain, the held-out perplexity row compares the candidate with
  the incumbent. When the incumbent was the base model, a "better" verdict
  (a gain beyond `min_gain` and beyond noise) beats the base. When the
  incumbent was an earlier adapter, the adapter beats the base only if that
  incumbent did too, so the chain is followed down to the base;
- on every other domain, the gate measured the candidate against the base
  directly. Only a "better" verdict there (a fall in perplexity beyond the
  gate's tolerance) beats the base.

Where there is no such evidence, the base answers. An adapter that the owner
activated (`a3x adapters activate`) answers its own domain whatever the
evidence says, because the owner's override wins over the gate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from lora import LoraError
from lora.registry import Adapter, AdapterRegistry, AdapterStatus

PERPLEXITY = "held-out perplexity"


@dataclass(frozen=True)
class Specialization:
    """Whether an adapter beats the base on one domain, with the figures behind it."""

    adapter: str
    domain: str
    beats_base: bool
    reason: str
    base_perplexity: float | None = None  # held-out perplexity of the base on the domain
    adapter_perplexity: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def specialization(registry: AdapterRegistry, adapter: Adapter, domain: str) -> Specialization:
    """Judge from the gate record whether `adapter` beats the base on `domain`."""
    if domain == adapter.domain:
        return _own_domain(registry, adapter, set())
    row = _evidence_row(adapter, domain, role="other")
    if row is None:
        return Specialization(
            adapter.name, domain, False, f"its gate record has no evidence on {domain}"
        )
    beats = row["verdict"] == "better"
    change = f"{row['change']:+.1%} against the base (tolerance {row['threshold']:.0%})"
    return Specialization(
        adapter.name,
        domain,
        beats,
        f"held-out perplexity {change}" + ("" if beats else ", not better beyond tolerance"),
        row["incumbent"],
        row["candidate"],
    )


def specializations(registry: AdapterRegistry, adapter: Adapter) -> list[Specialization]:
    """Judge every domain the adapter's gate record measured, its own domain first."""
    gate = adapter.record.get("gate") or {}
    others = sorted(
        {row["domain"] for row in gate.get("evidence", []) if row.get("role") == "other"}
    )
    return [specialization(registry, adapter, domain) for domain in [adapter.domain, *others]]


class SpecializationPolicy:
    """The router's check of a routed adapter against a task's domain, with each verdict
    computed once."""

    def __init__(self, registry: AdapterRegistry, adapters: dict[str, Adapter]):
        self.registry = registry
        self.adapters = adapters  # by name
        self._verdicts: dict[tuple[str, str], Specialization] = {}

    def judge(self, name: str, domain: str) -> Specialization:
        key = (name, domain)
        if key not in self._verdicts:
            adapter = self.adapters[name]
            if domain == adapter.domain and adapter.owner_serving is True:
                verdict = Specialization(name, domain, True, "activated by the owner")
            else:
                verdict = specialization(self.registry, adapter, domain)
            self._verdicts[key] = verdict
        return self._verdicts[key]


def _own_domain(registry: AdapterRegistry, adapter: Adapter, seen: set[str]) -> Specialization:
    name, domain = adapter.name, adapter.domain
    row = _evidence_row(adapter, domain, role="domain")
    if row is None:
        return Specialization(name, domain, False, "not gated: no held-out perplexity evidence")
    if row["verdict"] != "better":
        return Specialization(
            name,
            domain,
            False,
            f"held-out perplexity {row['change']:+.1%} against its incumbent, "
            f"not beyond the gain needed ({row['threshold']:.1%})",
            None,
            row["candidate"],
        )
    incumbent = incumbent_of(registry, adapter)
    if incumbent is None:
        return Specialization(
            name,
            domain,
            True,
            f"held-out perplexity {row['incumbent']:.4g} -> {row['candidate']:.4g} "
            f"({row['change']:+.1%}) against the base, beyond the gain needed "
            f"({row['threshold']:.1%})",
            row["incumbent"],
            row["candidate"],
        )
    return _via_incumbent(registry, adapter, row, incumbent, seen)


def _via_incumbent(
    registry: AdapterRegistry,
    adapter: Adapter,
    row: dict[str, Any],
    incumbent: str,
    seen: set[str],
) -> Specialization:
    name, domain = adapter.name, adapter.domain
    try:
        earlier: Adapter | None = registry.get(incumbent)
    except LoraError:  # removed since
        earlier = None
    if earlier is None or incumbent in seen:
        return Specialization(
            name,
            domain,
            False,
            f"it beat {incumbent}, which is no longer in the registry, so nothing shows it "
            "beats the base",
            None,
            row["candidate"],
        )
    below = _own_domain(registry, earlier, seen | {name})
    change = f"{row['change']:+.1%} against {incumbent}"
    if not below.beats_base:
        return Specialization(
            name,
            domain,
            False,
            f"held-out perplexity {change}, but {incumbent} does not beat the base: {below.reason}",
            below.base_perplexity,
            row["candidate"],
        )
    return Specialization(
        name,
        domain,
        True,
        f"held-out perplexity {change}, which beats the base ({below.reason})",
        below.base_perplexity,
        row["candidate"],
    )


def incumbent_of(registry: AdapterRegistry, adapter: Adapter) -> str | None:
    """Return the name of the adapter this version was gated against; None: the base.

    Records written before "incumbent" was stored are read as gated against the
    newest older accepted version, which served the domain at the time, because
    owner overrides did not exist before that field.
    """
    if "incumbent" in adapter.record:
        return str(adapter.record["incumbent"]) or None
    older = [
        other
        for other in registry.versions(adapter.domain)
        if other.version < adapter.version and other.status is AdapterStatus.ACCEPTED
    ]
    return older[-1].name if older else None


def _evidence_row(adapter: Adapter, domain: str, role: str) -> dict[str, Any] | None:
    gate = adapter.record.get("gate") or {}
    for row in gate.get("evidence", []):
        if row.get("domain") == domain and row.get("role") == role:
            if row.get("metric") == PERPLEXITY:
                return dict(row)
    return None
