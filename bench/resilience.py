"""Resilience kit: kill a real daemon at random moments, and soak one for many cycles.

`a3x bench kill --rounds 50` starts `a3x run` on a tiny model with cycles
back to back, sends SIGKILL after a random delay (so kills land in model
loading, recovery, generation, SQLite writes and Git commits), and after
every kill checks that `git fsck --strict` passes on the journal and that
`PRAGMA integrity_check` passes on state.sqlite. A final in-process cycle
must then succeed, every cycle in state.sqlite must be finished and have
its record in the journal, and every killed cycle must be recorded as
aborted.

`a3x bench soak --cycles 200` runs one daemon until it has committed that
many cycles and samples its RSS and open file descriptors from outside.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from bench.tiny_model import write_tiny_gguf

ROOT = Path(__file__).resolve().parent.parent
TINY_BOOK = ROOT / "tests" / "data" / "small_book.toml"


def daemon_environment(
    home: Path, model: Path, interval_minutes: float, evaluators: str
) -> dict[str, str]:
    config = home.parent / "config.toml"
    config.write_text("")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("A3X_")}
    environ.update(
        A3X_CONFIG=str(config),
        A3X_HOME=str(home),
        A3X_MODEL__PATH=str(model),
        A3X_MODEL__THREADS="1",
        A3X_MODEL__N_CTX="512",
        A3X_TASKS__BOOKS=str(TINY_BOOK),
        A3X_SCHEDULE__RUN_ON_START="true",
        A3X_SCHEDULE__INTERVAL_MINUTES=str(interval_minutes),
        A3X_SCORE__ENABLED=evaluators,
    )
    return environ


def check_stores(home: Path) -> list[str]:
    """Problems found in the journal and state.sqlite, as sentences (empty when sound)."""
    problems = []
    journal = home / "journal"
    if (journal / ".git").exists():
        fsck = subprocess.run(
            ["git", "fsck", "--strict", "--no-dangling"],
            cwd=journal,
            capture_output=True,
            text=True,
        )
        if fsck.returncode != 0:
            problems.append(f"git fsck failed: {fsck.stderr.strip()[:300]}")
    state = home / "state.sqlite"
    if state.exists():
        db = sqlite3.connect(state)
        try:
            result = db.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            db.close()
        if result != "ok":
            problems.append(f"state.sqlite integrity_check: {result}")
    return problems


def final_audit(home: Path, environ: dict[str, str]) -> dict[str, Any]:
    """Run one cycle in-process, then compare state.sqlite with the journal."""
    result = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "cycle"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    problems = [] if result.returncode == 0 else [f"final cycle failed: {result.stderr[-500:]}"]
    problems += check_stores(home)
    db = sqlite3.connect(home / "state.sqlite")
    rows = db.execute("SELECT id, outcome, journal_commit FROM cycles ORDER BY id").fetchall()
    db.close()
    head_files = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", "HEAD", "cycles/"],
        cwd=home / "journal",
        capture_output=True,
        text=True,
    ).stdout.split()
    outcomes: dict[str, int] = {}
    for cycle, outcome, commit in rows:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if outcome == "running":
            problems.append(f"cycle {cycle} is still marked running")
        if f"cycles/{cycle:06d}.json" not in head_files:
            problems.append(f"cycle {cycle} has no record in the journal")
        if commit is None and outcome != "running":
            problems.append(f"cycle {cycle} has no journal commit in state.sqlite")
    lock = home / "journal" / ".git" / "index.lock"
    if lock.exists():
        problems.append("a stale index.lock is left in the journal")
    return {"cycles": len(rows), "outcomes": outcomes, "problems": problems}


def run_kill_test(
    rounds: int,
    seed: int = 0,
    min_delay: float = 0.3,
    max_delay: float = 6.0,
    evaluators: str = "execution,coherence,efficiency",
    workdir: Path | None = None,
) -> dict[str, Any]:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="a3x-kill-", dir=workdir) as folder:
        root = Path(folder)
        model = write_tiny_gguf(root / "tiny.gguf")
        home = root / "home"
        environ = daemon_environment(home, model, 0.005, evaluators)  # a cycle every 0.3 s
        problems: list[str] = []
        delays = []
        for round_index in range(rounds):
            delay = rng.uniform(min_delay, max_delay)
            delays.append(delay)
            process = subprocess.Popen(
                [sys.executable, "-m", "daemon.cli", "run"],
                env=environ,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(delay)
            process.send_signal(signal.SIGKILL)
            process.wait()
            for problem in check_stores(home):
                problems.append(f"round {round_index + 1} (kill after {delay:.2f} s): {problem}")
        audit = final_audit(home, environ)
    return {
        "rounds": rounds,
        "seed": seed,
        "delay_seconds": [min_delay, max_delay],
        "cycles": audit["cycles"],
        "outcomes": audit["outcomes"],
        "problems": problems + audit["problems"],
    }


def run_soak(
    cycles: int, warmup: int = 20, evaluators: str = "", workdir: Path | None = None
) -> dict[str, Any]:
    from daemon.config import EVALUATORS

    with tempfile.TemporaryDirectory(prefix="a3x-soak-", dir=workdir) as folder:
        root = Path(folder)
        model = write_tiny_gguf(root / "tiny.gguf")
        home = root / "home"
        environ = daemon_environment(home, model, 0.005, evaluators or ",".join(EVALUATORS))
        process = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "run"],
            env=environ,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        monitor = psutil.Process(process.pid)
        samples: list[dict[str, float]] = []
        descriptors: dict[str, list[str]] = {}
        started = time.monotonic()
        try:
            done = 0
            while done < cycles:
                time.sleep(1.0)
                done = _finished_cycles(home)
                if process.poll() is not None:
                    raise RuntimeError(f"the daemon exited with {process.returncode}")
                samples.append(
                    {
                        "cycle": done,
                        "rss_mib": monitor.memory_info().rss / 2**20,
                        "fds": monitor.num_fds(),
                        "threads": monitor.num_threads(),
                    }
                )
                if done >= warmup and "after_warmup" not in descriptors:
                    descriptors["after_warmup"] = _descriptors(process.pid)
            descriptors["end"] = _descriptors(process.pid)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
        elapsed = time.monotonic() - started
    after_warmup = [s for s in samples if s["cycle"] >= warmup]
    first, last = after_warmup[0], after_warmup[-1]
    return {
        "cycles": samples[-1]["cycle"],
        "seconds": elapsed,
        "warmup_cycles": warmup,
        "rss_mib_after_warmup": first["rss_mib"],
        "rss_mib_end": last["rss_mib"],
        "rss_growth": (last["rss_mib"] - first["rss_mib"]) / first["rss_mib"],
        "rss_mib_max": max(s["rss_mib"] for s in after_warmup),
        "fds_after_warmup": first["fds"],
        "fds_end": last["fds"],
        "threads_end": last["threads"],
        "exit_code": process.returncode,
        "new_descriptors": sorted(
            (Counter(descriptors["end"]) - Counter(descriptors["after_warmup"])).elements()
        ),
        "samples": samples,
    }


def _descriptors(pid: int) -> list[str]:
    """Return the target of each open file descriptor of a process."""
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return targets


def run_control_latency(requests: int = 10, workdir: Path | None = None) -> dict[str, Any]:
    """Time from a cycle request on the control socket to the daemon's "started" reply,
    and the wall time of the whole `a3x cycle` command against the daemon."""
    from daemon.control import ControlClient, socket_path

    with tempfile.TemporaryDirectory(prefix="a3x-control-", dir=workdir) as folder:
        root = Path(folder)
        model = write_tiny_gguf(root / "tiny.gguf")
        home = root / "home"
        environ = daemon_environment(home, model, 60.0, "execution,coherence,efficiency")
        environ["A3X_SCHEDULE__RUN_ON_START"] = "false"
        process = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "run"],
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert process.stdout is not None
            for line in process.stdout:
                if '"service.started"' in line:
                    break
            client = ControlClient(socket_path(home))
            socket_times, command_times = [], []
            for _ in range(requests):
                started = time.perf_counter()
                replies = client.request({"command": "cycle", "wait": True})
                first = next(replies)
                socket_times.append(time.perf_counter() - started)
                assert first["state"] == "started", first
                list(replies)  # wait for the result before the next request
                started = time.perf_counter()
                subprocess.run(
                    [sys.executable, "-m", "daemon.cli", "cycle"],
                    env=environ,
                    capture_output=True,
                    check=True,
                )
                command_times.append(time.perf_counter() - started)
                time.sleep(1.5)  # let that cycle finish
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
    return {
        "requests": requests,
        "socket_median_seconds": sorted(socket_times)[len(socket_times) // 2],
        "socket_max_seconds": max(socket_times),
        "command_median_seconds": sorted(command_times)[len(command_times) // 2],
        "command_max_seconds": max(command_times),
    }


def add_control_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=10, help="cycle requests to time")
    parser.add_argument("--json", action="store_true")


def control_command(args: argparse.Namespace) -> int:
    result = run_control_latency(args.requests)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"cycle requests: {result['requests']}")
    print(
        f"socket request to 'started' reply: median {result['socket_median_seconds']:.3f} s, "
        f"max {result['socket_max_seconds']:.3f} s"
    )
    print(
        f"whole `a3x cycle` command: median {result['command_median_seconds']:.3f} s, "
        f"max {result['command_max_seconds']:.3f} s"
    )
    return 0


def _finished_cycles(home: Path) -> int:
    state = home / "state.sqlite"
    if not state.exists():
        return 0
    db = sqlite3.connect(state, timeout=30)
    try:
        return int(
            db.execute("SELECT count(*) FROM cycles WHERE outcome != 'running'").fetchone()[0]
        )
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


def add_kill_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=50, help="daemon starts to kill")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill delays")
    parser.add_argument(
        "--max-delay", type=float, default=6.0, help="maximum time in seconds before a kill"
    )
    parser.add_argument("--json", action="store_true")


def kill_command(args: argparse.Namespace) -> int:
    result = run_kill_test(args.rounds, args.seed, max_delay=args.max_delay)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"rounds: {result['rounds']} kills (SIGKILL after 0.3-{args.max_delay:g} s, "
            f"seed {result['seed']})"
        )
        print(f"cycles recorded: {result['cycles']} {result['outcomes']}")
        print(f"problems: {len(result['problems'])}")
        for problem in result["problems"]:
            print(f"  {problem}")
    return 1 if result["problems"] else 0


def add_soak_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cycles", type=int, default=200, help="cycles to run")
    parser.add_argument("--json", action="store_true")


def soak_command(args: argparse.Namespace) -> int:
    result = run_soak(args.cycles)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"cycles: {result['cycles']} in {result['seconds']:.0f} s, exit code {result['exit_code']}"
    )
    print(
        f"RSS after {result['warmup_cycles']} warm-up cycles: "
        f"{result['rss_mib_after_warmup']:.1f} MiB; at the end: {result['rss_mib_end']:.1f} MiB "
        f"({100 * result['rss_growth']:+.1f}%); max {result['rss_mib_max']:.1f} MiB"
    )
    print(
        f"open file descriptors: {result['fds_after_warmup']} after warm-up, "
        f"{result['fds_end']} at the end; threads at the end: {result['threads_end']}"
    )
    if result["new_descriptors"]:
        print(f"descriptors opened after warm-up: {', '.join(result['new_descriptors'])}")
    every = max(1, len(result["samples"]) // 12)
    trace = ", ".join(f"{s['cycle']}: {s['rss_mib']:.0f}" for s in result["samples"][::every])
    print(f"RSS MiB by cycle: {trace}")
    return 0
