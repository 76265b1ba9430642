"""Markdown pages and commit messages for the journal."""

from __future__ import annotations

import re
from collections import defaultdict
from statistics import fmean
from typing import Any

from daemon.records import CycleRecord, Run, Score

ANSWER_PREVIEW_CHARS = 80


def commit_message(record: CycleRecord) -> str:
    """Subject, body and A3X trailers for a cycle's commit."""
    subject = f"cycle {record.cycle}: {record.outcome.value}, {record.summary}"
    body = [f"Trigger: {record.trigger}. Model: {record.model.get('name', '?')}."]
    if record.error:
        body.append(f"Error: {record.error}")
    trailers = [f"A3X-Cycle: {record.cycle}", f"A3X-Outcome: {record.outcome.value}"]
    if record.decide:
        for decision in record.decide.decisions:
            if decision.action != "keep":  # keeping the incumbent is the default, not news
                trailers.append(f"A3X-Decision: {decision.domain} {decision.action}")
    adapters = sorted({name for run in record.runs for name in run.adapters})
    trailers.extend(f"A3X-Adapter: {name}" for name in adapters)
    return f"{subject[:72]}\n\n" + "\n".join(body) + "\n\n" + "\n".join(trailers) + "\n"


def index_entry(record: CycleRecord) -> dict[str, Any]:
    runs = record.runs
    return {
        "cycle": record.cycle,
        "outcome": record.outcome.value,
        "started_at": record.started_at,
        "runs": len(runs),
        "answered": sum(run.ok for run in runs),
        "summary": record.summary,
    }


def index_page(index: list[dict[str, Any]]) -> str:
    lines = [
        "# A3X journal",
        "",
        "Latest cycles, newest first. Each links to its page; `git log` holds them all.",
        "",
        "| cycle | started (UTC) | outcome | answered | summary |",
        "|---:|---|---|---:|---|",
    ]
    for entry in index:
        link = f"[{entry['cycle']}](cycles/{entry['cycle']:06d}.md)"
        lines.append(
            f"| {link} | {entry['started_at']} | {entry['outcome']} | "
            f"{entry['answered']}/{entry['runs']} | {_cell(entry['summary'])} |"
        )
    return "\n".join(lines) + "\n"


def cycle_page(record: CycleRecord) -> str:
    sections = [
        _header(record),
        _domain_table(record.runs),
        _run_table(record.runs),
        _scores(record.score.scores if record.score else ()),
        _decisions(record),
        _answers(record.runs),
    ]
    return "\n".join(section for section in sections if section)


def _header(record: CycleRecord) -> str:
    lines = [
        f"# Cycle {record.cycle}: {record.outcome.value}",
        "",
        f"- Started: {record.started_at}",
        f"- Finished: {record.finished_at}",
        f"- Trigger: {record.trigger}",
        f"- Model: {record.model.get('name', '?')} ({record.model.get('backend', '?')}, "
        f"sha256 {str(record.model.get('sha256', '?'))[:12]})",
        f"- Summary: {record.summary}",
    ]
    if record.error:
        lines.append(f"- Error: {record.error}")
    if record.execute and record.execute.stopped_early:
        lines.append("- Stopped early: a stop was requested during the execute phase")
    return "\n".join(lines) + "\n"


def _domain_table(runs: tuple[Run, ...]) -> str:
    if not runs:
        return ""
    by_domain: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_domain[run.domain].append(run)
    lines = [
        "## Domains",
        "",
        "| domain | runs | answered | mean tokens/s | mean wall s |",
        "|---|---:|---:|---:|---:|",
    ]
    for domain, group in sorted(by_domain.items()):
        lines.append(
            f"| {domain} | {len(group)} | {sum(r.ok for r in group)} | "
            f"{fmean(r.tokens_per_second for r in group):.1f} | "
            f"{fmean(r.wall_seconds for r in group):.2f} |"
        )
    return "\n".join(lines) + "\n"


def _run_table(runs: tuple[Run, ...]) -> str:
    if not runs:
        return ""
    lines = [
        "## Tasks",
        "",
        "| task | domain | lang | prompt tok | answer tok | wall s | tok/s | answer |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for run in runs:
        preview = run.error and f"error: {run.error}" or run.text.strip()
        if len(preview) > ANSWER_PREVIEW_CHARS:
            preview = preview[: ANSWER_PREVIEW_CHARS - 1] + "…"
        lines.append(
            f"| {run.task_id} | {run.domain} | {run.language} | {run.prompt_tokens} | "
            f"{run.completion_tokens} | {run.wall_seconds:.2f} | {run.tokens_per_second:.1f} | "
            f"{_cell(preview) or '*(empty)*'} |"
        )
    return "\n".join(lines) + "\n"


def _scores(scores: tuple[Score, ...]) -> str:
    """Render a table per evaluator: a row per score, a column per domain, one for all."""
    shared = [score for score in scores if score.task_id is None]
    if not shared:
        return ""
    lines = ["## Scores", ""]
    for evaluator in dict.fromkeys(score.evaluator for score in shared):
        group = [score for score in shared if score.evaluator == evaluator]
        domains = sorted({score.domain for score in group if score.domain})
        columns = [*domains, None]
        values = {(score.name, score.domain): score.value for score in group}
        units = {score.name: score.unit for score in group}
        lines.append(f"### {evaluator}")
        lines.append("")
        lines.append("| score | unit | " + " | ".join([*domains, "all"]) + " |")
        lines.append("|---|---|" + "---:|" * len(columns))
        for name, unit in units.items():
            cells = [_number(values.get((name, domain))) for domain in columns]
            lines.append(f"| {name} | {unit} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def _decisions(record: CycleRecord) -> str:
    parts = []
    if record.ingest:
        parts.append(f"- Ingest: {record.ingest.note}")
    if record.decide:
        parts.append(f"- Policy: {record.decide.policy}")
        for decision in record.decide.decisions:
            parts.append(f"- {decision.domain}: {decision.action} ({decision.reason})")
    if record.retrain:
        parts.append(f"- Retrain: {record.retrain.note}")
    if not parts:
        return ""
    return "## Decisions\n\n" + "\n".join(parts) + "\n"


def _answers(runs: tuple[Run, ...]) -> str:
    if not runs:
        return ""
    lines = ["## Answers", ""]
    for run in runs:
        lines.append(f"### {run.task_id}")
        lines.append("")
        lines.append(_fenced(run.text if run.error is None else f"error: {run.error}"))
        lines.append("")
    return "\n".join(lines)


def _fenced(text: str) -> str:
    """Put model text in a code fence longer than any backtick run inside it."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text.strip()}\n{fence}"


def _cell(text: str) -> str:
    """Make text safe for one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")
