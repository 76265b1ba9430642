"""Queries over the journal's Git history: what failed, when and why."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

import git

from journal.logbook import Logbook

FAILED_OUTCOMES = ("failed", "aborted", "degraded")


@dataclass(frozen=True)
class Failure:
    commit: str
    date: str
    kind: str  # an outcome (failed, aborted, degraded) or "rejected" for an adapter
    cycle: int | None
    reason: str
    domains: tuple[str, ...]


def failures(
    logbook: Logbook, since: datetime | None = None, domain: str | None = None
) -> list[Failure]:
    """Failed, aborted and degraded cycles and rejected adapters, newest first."""
    found = []
    for entry in logbook.entries(since=since):
        outcome = entry.outcome
        rejected = [
            d.split()[0] for d in entry.trailers.get("A3X-Decision", []) if d.endswith(" reject")
        ]
        if outcome not in FAILED_OUTCOMES and not rejected:
            continue
        record = _record_at(logbook, entry.commit, entry.cycle)
        domains = tuple(sorted(_failed_domains(record) | set(rejected)))
        if domain is not None and domain not in domains:
            continue
        kind = "rejected" if rejected and outcome not in FAILED_OUTCOMES else str(outcome)
        found.append(
            Failure(
                entry.commit, entry.date, kind, entry.cycle, _reason(entry.subject, record), domains
            )
        )
    return found


def _record_at(logbook: Logbook, commit: str, cycle: int | None) -> dict:
    if cycle is None:
        return {}
    try:
        text = logbook.repo.git.show(f"{commit}:cycles/{cycle:06d}.json")
    except git.GitCommandError:
        return {}
    return json.loads(text)


def _failed_domains(record: dict) -> set[str]:
    """Return the domains with a failed or empty answer, else all the cycle's domains."""
    runs = (record.get("execute") or {}).get("runs", [])
    bad = {run["domain"] for run in runs if run.get("error") or not run["text"].strip()}
    for decision in (record.get("decide") or {}).get("decisions", []):
        if "regressed" in decision["reason"]:
            bad.add(decision["domain"])
    return bad or {run["domain"] for run in runs}


def _reason(subject: str, record: dict) -> str:
    """Return the record's error, or the subject without its "cycle N: outcome, " prefix."""
    if record.get("error"):
        return f"{record.get('summary', '')}: {record['error']}"[:200]
    rest = subject.split(": ", 1)[-1]
    outcome = record.get("outcome")
    return rest.removeprefix(f"{outcome}, ") if outcome else rest
