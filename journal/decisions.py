"""Journal pages for retraining decisions: `decisions/<domain>-v<N>.md` (or
`<domain>-cycle<N>.md` for a round refused before it made an adapter), the
round's JSON next to it, and a PNG of the training loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from journal.pages import _cell

SCHEMA_VERSION = 1


def decision_stem(result: dict[str, Any]) -> str:
    if result.get("adapter"):
        return result["adapter"].replace("/", "-")
    return f"{result['domain']}-cycle{result['cycle']:06d}"


def decision_subject(result: dict[str, Any]) -> str:
    name = result.get("adapter") or result["domain"]
    subject = f"decision: {name} {result['outcome']}"
    target = _domain_row(result)
    if target:
        subject += f", held-out perplexity {target['incumbent']:.2f} -> {target['candidate']:.2f}"
    return subject[:72]


def decision_trailers(result: dict[str, Any]) -> dict[str, list[str]]:
    trailers = {"A3X-Cycle": [str(result["cycle"])], "A3X-Decision": [result["outcome"]]}
    if result.get("adapter"):
        trailers["A3X-Adapter"] = [result["adapter"]]
    return trailers


def decision_page(result: dict[str, Any], loss_plot: str | None) -> str:
    name = result.get("adapter") or result["domain"]
    lines = [
        f"# Decision: {name} {result['outcome']}",
        "",
        f"- Cycle: {result['cycle']}",
        f"- Domain: {result['domain']}",
        f"- Why it trained: {result['reason']}",
        f"- Outcome: {result['message']}",
        f"- Compared with: {result.get('incumbent') or 'the base model'}",
        f"- Round took {result['seconds']:.0f} s",
        "",
    ]
    lines += _evidence(result)
    lines += _training(result, loss_plot)
    lines += _answers(result)
    return "\n".join(lines).rstrip() + "\n"


def _evidence(result: dict[str, Any]) -> list[str]:
    rows = result.get("gate", {}).get("evidence", [])
    if not rows:
        return []
    lines = [
        "## Evidence",
        "",
        "| domain | metric | incumbent | candidate | change | threshold | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        perplexity = row["metric"] == "held-out perplexity"
        change = f"{row['change']:+.1%}" if perplexity else f"{row['change']:+g}"
        threshold = f"{row['threshold']:.1%}" if perplexity else f"{row['threshold']:g}"
        role = " (retrained)" if row["role"] == "domain" else ""
        lines.append(
            f"| {row['domain']}{role} | {row['metric']} | {row['incumbent']:.3f} | "
            f"{row['candidate']:.3f} | {change} | {threshold} | {row['verdict']} |"
        )
    return [*lines, ""]


def _training(result: dict[str, Any], loss_plot: str | None) -> list[str]:
    data, training, memory = (
        result.get("dataset", {}),
        result.get("training", {}),
        result.get("memory", {}),
    )
    lines = ["## Training", ""]
    if data:
        lines += [
            f"- Data: {data.get('examples', 0)} examples ({data.get('answers', 0)} distilled "
            f"answers, {data.get('corpus_paragraphs', 0)} corpus paragraphs, "
            f"{data.get('replay_paragraphs', 0)} replayed from other domains); held out: "
            f"{data.get('held_out_paragraphs', 0)} paragraphs, "
            f"{data.get('held_out_tasks', 0)} tasks",
            f"- Data sha256: `{data.get('sha256', '')}`",
            f"- Answers not used: {_counts(data.get('rejected_answers', {}))}",
        ]
    if training:
        lines += [
            f"- Steps: {training['steps']}, learning rate {training['learning_rate']:.2e} "
            f"({training['learning_rate_source']}), {training['seconds_per_step']:.2f} s per step, "
            f"{training['skipped_updates']} updates skipped as outliers",
        ]
    predicted = memory.get("predicted", {}).get("peak_bytes")
    if predicted:
        measured = memory.get("measured_peak_bytes")
        lines.append(
            f"- Memory: predicted peak {predicted / 2**30:.2f} GiB, measured peak "
            + (f"{measured / 2**30:.2f} GiB" if measured else "not measured")
            + f", budget {memory.get('budget_bytes', 0) / 2**30:.2f} GiB"
        )
    if loss_plot:
        lines += ["", f"![training loss]({loss_plot})"]
    return [*lines, ""] if len(lines) > 2 else []


def _answers(result: dict[str, Any]) -> list[str]:
    answers = result.get("gate", {}).get("answers", [])
    if not answers:
        return []
    lines = [
        "## Answers: incumbent and candidate",
        "",
        "| task | incumbent | candidate |",
        "|---|---|---|",
    ]
    for task_id, before, after in answers:
        lines.append(f"| {task_id} | {_cell(before)} | {_cell(after)} |")
    return [*lines, ""]


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items())) or "none"


def write_loss_plot(losses: list[float], path: Path) -> None:
    """Draw the mean loss per optimizer step as a small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.2), dpi=80)
    try:
        axes.plot(range(1, len(losses) + 1), losses, marker=".", linewidth=1)
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("training loss (nats/token)")
        axes.set_title("training loss")
        axes.grid(alpha=0.3)
        figure.tight_layout()
        temporary = path.with_name(f".{path.name}.tmp")
        figure.savefig(temporary, format="png", metadata={"Software": None})
        temporary.replace(path)
    finally:
        plt.close(figure)


def _domain_row(result: dict[str, Any]) -> dict[str, Any] | None:
    for row in result.get("gate", {}).get("evidence", []):
        if row["role"] == "domain" and row["metric"] == "held-out perplexity":
            return row
    return None
