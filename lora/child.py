"""Running a training spec in a child process under a memory limit.

The parent samples the child's resident memory every WATCH_SECONDS and kills
it when it exceeds the budget, so a run the planner underestimated ends as
a recorded failure instead of pushing the machine into swap or the kernel's
OOM killer choosing the daemon.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import structlog

from lora import LoraError
from lora.trainer import TrainingResult, TrainingSpec

log = structlog.get_logger(__name__)

WATCH_SECONDS = 0.2


class TrainingFailed(LoraError):
    """The training child failed, was killed, or exceeded its memory budget."""

    def __init__(self, message: str, peak_rss_bytes: int = 0):
        super().__init__(message)
        self.peak_rss_bytes = peak_rss_bytes


def run_training_child(
    spec: TrainingSpec,
    budget_bytes: int,
    stop: threading.Event | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> TrainingResult:
    """Train in a child process and return its result; raise TrainingFailed otherwise.

    `on_start` receives the child's pid (tests and the kill benchmark use it).
    """
    import psutil

    with tempfile.TemporaryDirectory(prefix="a3x-train-") as scratch:
        spec_path, result_path = Path(scratch) / "spec.json", Path(scratch) / "result.json"
        spec_path.write_text(json.dumps(asdict(spec)))
        child = subprocess.Popen(
            [sys.executable, "-m", "lora.worker", str(spec_path), str(result_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "TQDM_DISABLE": "1", **allocator_settings(spec)},
        )
        if on_start:
            on_start(child.pid)
        reader = threading.Thread(target=_read_events, args=(child, on_event), daemon=True)
        reader.start()
        peak, reason = _watch(child, psutil.Process(child.pid), budget_bytes, stop)
        reader.join(timeout=5)
        stderr = child.stderr.read() if child.stderr else ""
        return _result(child.returncode, result_path, reason, peak, stderr)


def allocator_settings(spec: TrainingSpec) -> dict[str, str]:
    """glibc settings for the training child.

    glibc serves a freed block larger than its mmap threshold back to the
    kernel, but it raises that threshold to the size of each such block it
    frees (up to 32 MiB). The lean trainer frees many blocks of 1 to 20 MiB per
    step (vocabulary chunks, dequantized layers), so after the first step they
    come from the heap, which fragments. On Gemma 3 270M, batch 2, sequence
    256, the peak grew from 874 to 1,047 MiB by the second step. A fixed 4 MiB
    threshold keeps the peak at 862 MiB for about 17% more CPU time per step
    (a 1 MiB threshold: 780 MiB, but 60% more). A variable the user already
    set wins.
    """
    if spec.engine != "lean":
        return {}
    return {"MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", str(4 * 2**20))}


def _watch(
    child: subprocess.Popen, process: Any, budget: int, stop: threading.Event | None
) -> tuple[int, str]:
    import psutil

    peak = 0
    while child.poll() is None:
        try:
            rss = process.memory_info().rss
        except psutil.NoSuchProcess:
            break
        rss += _children_rss(process)  # the lean trainer's tokenizing child
        peak = max(peak, rss)
        if rss > budget:
            child.kill()
            child.wait()
            return (
                peak,
                f"exceeded the memory budget ({rss / 2**30:.2f} GiB > {budget / 2**30:.2f} GiB)",
            )
        if stop is not None and stop.is_set():
            child.terminate()
            child.wait()
            return peak, "stopped because the daemon is shutting down"
        time.sleep(WATCH_SECONDS)
    return peak, ""


def _children_rss(process: Any) -> int:
    import psutil

    total = 0
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _read_events(child: subprocess.Popen, on_event: Callable | None) -> None:
    """Log the child's events; on a terminal, show progress as a bar instead."""
    assert child.stdout is not None
    bar = None
    for line in child.stdout:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        name = event.pop("event", "train.event")
        if name == "train.progress" and sys.stderr.isatty():
            bar = bar or _progress_bar(event["steps"])
            bar.update(event["step"] - bar.n)
            bar.set_postfix(loss=f"{event['loss']:.3f}")
        else:
            log.info(name, **event)
        if on_event:
            on_event(event)
    if bar is not None:
        bar.close()


def _progress_bar(steps: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=steps, desc="training", unit="step")


def _result(code: int | None, path: Path, reason: str, peak: int, stderr: str) -> TrainingResult:
    if reason:
        raise TrainingFailed(f"training was killed: {reason}", peak)
    data = json.loads(path.read_text()) if path.exists() else {}
    if code == 0 and "result" in data:
        # Fields a worker of another A3X version wrote (an upgrade during a round) are dropped.
        known = {f.name for f in fields(TrainingResult)}
        result = TrainingResult(**{k: v for k, v in data["result"].items() if k in known})
        result.range_test = [tuple(point) for point in result.range_test]  # type: ignore[misc]
        return result
    if "error" in data:
        raise TrainingFailed(f"training failed: {data['error']}", peak)
    tail = stderr.strip().splitlines()[-3:]
    how = (
        f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with {code}"
    )
    raise TrainingFailed(f"the training process {how}: {' | '.join(tail) or 'no output'}", peak)
