"""Markdown pages and commit messages for the journal."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from statistics import fmean
from typing import Any

from daemon.records import CycleRecord, Run, Score, ScoreRecord
from journal.plots import PLOTTED

ANSWER_PREVIEW_CHARS = 80


def commit_message(record: CycleRecord) -> str:
    """Subject, body and A3X trailers for a cycle's commit."""
    subject = f"cycle {record.cycle}: {record.outcome.value}"
    for part in record.summary.split(", "):  # whole parts only, within 72 characters
        if len(subject) + 2 + len(part) > 72:
            break
        subject += f", {part}"
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
    body.insert(0, f"Summary: {record.summary}.")
    return f"{subject}\n\n" + "\n".join(body) + "\n\n" + "\n".join(trailers) + "\n"


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
        _routing(record.runs),
        _scores(record.score),
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
    if record.phase_seconds:
        timings = ", ".join(
            f"{phase} {seconds:.1f}" for phase, seconds in record.phase_seconds.items()
        )
        lines.append(f"- Phase wall times (s): {timings}")
    if record.plan is not None:
        lines.append(
            f"- Plan: {len(record.plan.tasks)} tasks, {record.plan.reason}; "
            f"{record.plan.skipped_not_due} not due"
        )
        for name, scales in sorted(record.plan.layer_scales.items()):
            lines.append(f"- Per-layer scales of {name}: `{json.dumps(scales)}`")
    lines.append("")
    lines.append(
        "Outcomes: `ok`, every task produced a non-empty answer; `degraded`, some did not "
        "or the cycle stopped early; `failed`, none did or a phase failed. Whether answers "
        "are right is what the scores below estimate, without labels."
    )
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
        "| domain | runs | answered | tokens/s | mean wall s |",
        "|---|---:|---:|---:|---:|",
    ]
    for domain, group in sorted(by_domain.items()):
        lines.append(
            f"| {domain} | {len(group)} | {sum(r.ok for r in group)} | "
            f"{_speed(group):.1f} | "
            f"{fmean(r.wall_seconds for r in group):.2f} |"
        )
    return "\n".join(lines) + "\n"


def _speed(runs: list[Run]) -> float:
    """Completion tokens over generation time, summed over the runs."""
    seconds = sum(run.wall_seconds for run in runs)
    return sum(run.completion_tokens for run in runs) / seconds if seconds else 0.0


def _run_table(runs: tuple[Run, ...]) -> str:
    if not runs:
        return ""
    lines = [
        "## Tasks",
        "",
        "| task | domain | lang | adapter | prompt tok | answer tok | wall s | tok/s | answer |",
        "|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for run in runs:
        preview = run.error and f"error: {run.error}" or run.text.strip()
        if len(preview) > ANSWER_PREVIEW_CHARS:
            preview = preview[: ANSWER_PREVIEW_CHARS - 1] + "…"
        lines.append(
            f"| {run.task_id} | {run.domain} | {run.language} | "
            f"{_adapter_cell(run)} | {run.prompt_tokens} | "
            f"{run.completion_tokens} | {run.wall_seconds:.2f} | {run.tokens_per_second:.1f} | "
            f"{_cell(preview) or '*(empty)*'} |"
        )
    return "\n".join(lines) + "\n"


def _adapter_cell(run: Run) -> str:
    """Name the adapters of a run, with their weights when routing chose them."""
    if run.routing is None:
        return ", ".join(run.adapters) or "base"
    routed = [f"{a['name']} ({a['weight']:.2f})" for a in run.routing["adapters"]]
    return ", ".join(routed) or "base"


def _routing(runs: tuple[Run, ...]) -> str:
    """List each routed task's adapters with weight and similarity, or why the base answered."""
    routed = [run for run in runs if run.routing is not None]
    if not routed:
        return ""
    first = routed[0].routing or {}
    lines = [
        "## Routing",
        "",
        f"Adapters chosen by prompt similarity: at most {first.get('top_k')} per task with "
        f"cosine similarity at least {first.get('floor')}, weighted by a softmax at "
        f"temperature {first.get('temperature')}.",
        "",
        "| task | domain | adapters: weight (similarity) | note |",
        "|---|---|---|---|",
    ]
    for run in routed:
        decision = run.routing or {}
        chosen = ", ".join(
            f"{a['name']}: {a['weight']:.2f} ({a['similarity']:.3f})" for a in decision["adapters"]
        )
        lines.append(
            f"| {run.task_id} | {run.domain} | {chosen or 'base'} | "
            f"{_cell(_routing_note(decision))} |"
        )
    return "\n".join(lines) + "\n"


def _routing_note(decision: dict[str, Any]) -> str:
    notes = [f"{s['adapter']} skipped: {s['reason']}" for s in decision.get("skipped", [])]
    nearest = decision.get("nearest")
    if not decision["adapters"] and nearest and nearest["similarity"] < decision["floor"]:
        notes.append(f"nearest {nearest['name']} at {nearest['similarity']:.3f} is below the floor")
    if not decision["adapters"] and nearest is None:
        notes.append("no adapter to route to")
    return "; ".join(notes)


def _scores(score_record: ScoreRecord | None) -> str:
    """Render a table per evaluator: a row per score, a column per domain, one for all.

    A cell shows the value; a change beyond noise also shows the baseline
    mean and spread and the verdict (better, worse, up, down).
    """
    if score_record is None:
        return ""
    shared = [score for score in score_record.scores if score.task_id is None]
    lines = ["## Scores", ""]
    lines.append(
        "Each value is compared with the mean and spread of the same score over recent "
        "cycles; only changes beyond the noise threshold are marked."
    )
    lines.append("")
    worse = [s for s in shared if (s.baseline or {}).get("verdict") == "worse"]
    if worse:
        lines.append(
            "Regressed beyond noise: "
            + ", ".join(
                f"{s.evaluator}.{s.name} ({s.domain or 'all'}) {_cell_value(s)}" for s in worse
            )
        )
        lines.append("")
    for note in score_record.notes:
        lines.append(f"- Note: {note}")
    if score_record.notes:
        lines.append("")
    for evaluator in dict.fromkeys(score.evaluator for score in shared):
        group = [score for score in shared if score.evaluator == evaluator]
        domains = sorted({score.domain for score in group if score.domain})
        columns: list[str | None] = [*domains, None]
        by_key = {(score.name, score.domain): score for score in group}
        units = {score.name: score.unit for score in group}
        lines.append(f"### {evaluator}")
        lines.append("")
        lines.append("| score | unit | " + " | ".join([*domains, "all"]) + " |")
        lines.append("|---|---|" + "---:|" * len(columns))
        for name, unit in units.items():
            cells = [_cell_value(by_key.get((name, domain))) for domain in columns]
            lines.append(f"| {name} | {unit} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.extend(_evidence(evaluator, group, score_record.scores))
    return "\n".join(line for line in lines) + "\n"


def _cell_value(score: Score | None) -> str:
    if score is None:
        return ""
    base = score.baseline or {}
    verdict = base.get("verdict")
    value = _number(score.value)
    if verdict in ("better", "worse", "up", "down"):
        return (
            f"**{value}** ({verdict}; baseline {_number(base['mean'])} ± {_number(base['spread'])})"
        )
    if verdict == "new":
        return f"{value} (new)"
    return value


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def _evidence(evaluator: str, group: list[Score], every: tuple[Score, ...]) -> list[str]:
    """List the facts behind an evaluator's scores."""
    lines: list[str] = []
    cycle = next((s for s in group if s.domain is None), None)
    if evaluator == "coherence" and cycle is not None:
        for item in cycle.evidence.get("contradictions", []):
            facts = " vs ".join(
                f"{'NOT ' if f['negated'] else ''}{' '.join(f['triple'])} "
                f"(task {', '.join(f.get('tasks', [f['task']]))}; "
                f"cycle {', '.join(map(str, f.get('cycles', [f['cycle']])))})"
                for f in item["facts"]
            )
            lines.append(f"- {item['kind']}: {facts}")
        total = cycle.evidence.get("contradictions_total", 0)
        lines.append(
            f"- {total} conflict(s) involve this cycle's facts; "
            f"{cycle.evidence.get('window_facts', 0)} facts in the window."
        )
    elif evaluator == "efficiency":
        for score in group:
            if score.domain is None and score.name.endswith("_median_change"):
                rising = score.evidence.get("rising", [])
                falling = score.evidence.get("falling", [])
                metric = score.name.removesuffix("_median_change")
                lines.append(
                    f"- {metric}: {score.evidence.get('tasks', 0)} tasks with a trend "
                    f"test; rising: {', '.join(rising) or 'none'}; falling: "
                    f"{', '.join(falling) or 'none'}"
                )
    elif evaluator == "consistency":
        per_task = sorted(
            (s for s in every if s.evaluator == evaluator and s.task_id), key=lambda s: s.value
        )
        for score in per_task:
            lines.append(
                f"- {score.task_id}: agreement {score.value:.3f} over "
                f"{score.evidence.get('samples')} answers"
            )
    elif evaluator == "diversity" and cycle is not None:
        entropy = next((s for s in group if s.name == "entropy" and s.domain is None), None)
        if entropy is not None:
            lines.append(
                f"- entropy over {entropy.evidence.get('answers')} answers in "
                f"{entropy.evidence.get('clusters')} k-means clusters"
            )
    elif evaluator == "perplexity":
        for score in group:
            lines.append(
                f"- {score.domain}: {score.evidence.get('tokens')} held-out tokens "
                f"from {score.evidence.get('corpus')}"
            )
    plotted = [
        name for name in dict.fromkeys(s.name for s in group) if (evaluator, name) in PLOTTED
    ]
    for name in plotted:
        lines.append(f"- plot: [{evaluator}-{name}.png](../plots/{evaluator}-{name}.png)")
    return [*lines, ""] if lines else []


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
        adapter = f" (adapter {', '.join(run.adapters)})" if run.adapters else ""
        lines.append(f"### {run.task_id}{adapter}")
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
