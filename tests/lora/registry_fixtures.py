"""Adapter versions in a real registry folder: PEFT folders with fixed random weights,
exported to GGUF for a given base, and record.json with a gate record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora.export import export_adapter
from lora.registry import Adapter, AdapterRegistry, AdapterStatus
from tests.runtime.lora_fixtures import lora_weights, write_peft_adapter


def gate_record(domain: str, change: float, others: dict[str, float] | None = None) -> dict:
    """A gate record as lora/retrain.py stores it: held-out perplexity of `domain` moves
    from 20 by the relative `change` (better beyond 2%), and each other domain's by its
    change against the base (better beyond the 5% tolerance)."""
    evidence: list[dict[str, Any]] = [
        {
            "domain": domain,
            "metric": "held-out perplexity",
            "incumbent": 20.0,
            "candidate": 20.0 * (1 + change),
            "change": change,
            "threshold": 0.02,
            "verdict": "better" if change <= -0.02 else "within noise",
            "role": "domain",
        }
    ]
    for other, other_change in (others or {}).items():
        evidence.append(
            {
                "domain": other,
                "metric": "held-out perplexity",
                "incumbent": 30.0,
                "candidate": 30.0 * (1 + other_change),
                "change": other_change,
                "threshold": 0.05,
                "verdict": "better" if other_change < -0.05 else "within noise",
                "role": "other",
            }
        )
    accepted = change <= -0.02
    return {
        "accepted": accepted,
        "reason": f"{'accepted' if accepted else 'rejected'}: held-out perplexity {change:+.1%}",
        "evidence": evidence,
        "answers": [],
    }


def add_version(
    registry: AdapterRegistry,
    domain: str,
    status: AdapterStatus,
    base_gguf: Path,
    seed: int = 0,
    gate: dict | None = None,
    incumbent: str = "",
) -> Adapter:
    """Create the next version of `domain` with real adapter files and the given status."""
    adapter = registry.create(domain, {"reason": "test", "cycle": 1})
    write_peft_adapter(adapter.peft_folder, lora_weights(seed=seed))
    export_adapter(
        adapter.peft_folder,
        adapter.gguf_path,
        base=base_gguf,
        metadata_overrides={"domain": domain},
    )
    if status is AdapterStatus.CANDIDATE:
        return adapter
    fields: dict[str, Any] = {"incumbent": incumbent}
    if gate is not None:
        fields["gate"] = gate
    return registry.set_status(adapter, status, **fields)
