"""PNG plots of score series for the journal, one file per score, redrawn each cycle."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

# The series worth a picture; per-task series stay in state.sqlite and `a3x scores`.
PLOTTED = (
    ("execution", "tokens_per_second"),
    ("execution", "empty_rate"),
    ("coherence", "coherence"),
    ("diversity", "entropy"),
    ("diversity", "distinct_2"),
    ("diversity", "drift"),
    ("efficiency", "wall_seconds_median_change"),
    ("consistency", "agreement"),
    ("perplexity", "perplexity"),
)
PLOTTED_CYCLES = 200


def write_plots(state: Any, folder: Path) -> list[Path]:
    """Draw each plotted series of the last cycles as `<evaluator>-<name>.png`."""
    # matplotlib takes about a second to import, so only cycles that draw pay for it.
    import matplotlib

    matplotlib.use("Agg")  # no display: plots are files
    import matplotlib.pyplot as plt

    rows = state.score_series(last_cycles=PLOTTED_CYCLES)
    series: dict[tuple[str, str], dict[str, list[tuple[int, float]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for row in rows:
        key = (row["evaluator"], row["name"])
        if key in PLOTTED:
            series[key][row["domain"] or "all"].append((row["cycle_id"], row["value"]))
    folder.mkdir(parents=True, exist_ok=True)
    # One figure, cleared between series: creating a figure per plot and
    # tight_layout cost more than the drawing itself.
    figure, axes = plt.subplots(figsize=(6, 3.2), dpi=80)
    figure.subplots_adjust(left=0.1, right=0.98, top=0.9, bottom=0.28)
    written = []
    try:
        for (evaluator, name), lines in sorted(series.items()):
            path = folder / f"{evaluator}-{name}.png"
            _draw(axes, f"{evaluator}: {name}", lines)
            temporary = path.with_name(f".{path.name}.tmp")
            figure.savefig(temporary, format="png", metadata={"Software": None})
            temporary.replace(path)
            written.append(path)
    finally:
        plt.close(figure)
    return written


def _draw(axes: Any, title: str, lines: dict[str, list[tuple[int, float]]]) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.clear()
    for label, points in sorted(lines.items(), key=lambda item: item[0] != "all"):
        cycles, values = zip(*points, strict=True)
        style = {"linewidth": 2.2, "color": "black"} if label == "all" else {"linewidth": 1}
        axes.plot(cycles, values, marker="." if len(points) < 30 else None, label=label, **style)
    axes.set_title(title, fontsize=10)
    axes.set_xlabel("cycle", fontsize=8)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.tick_params(labelsize=7)
    axes.grid(alpha=0.3)
    # Below the plot, so that it never hides a line; "best" placement is also slow.
    axes.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=7, frameon=False)
