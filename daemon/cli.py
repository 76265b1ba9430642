"""The `a3x` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daemon.config import Config, ConfigError, load_config
from daemon.home import CycleBusyError, Home, HomeError
from daemon.logs import configure_logging
from daemon.records import CycleRecord, Outcome, RecordVersionError
from daemon.state import StateError, StateStore
from daemon.taskbook import TaskBookError, load_book, load_books
from journal.logbook import JournalError, Logbook
from runtime.default_model import default_model_path
from runtime.gguf_file import ModelFileError

# Errors that come from the user's input or environment: printed as one clear
# message with exit code 2, never as a traceback.
USER_ERRORS = (
    ConfigError,
    TaskBookError,
    ModelFileError,
    HomeError,
    CycleBusyError,
    JournalError,
    StateError,
    RecordVersionError,
)
EXIT_OK, EXIT_CYCLE_FAILED, EXIT_USAGE = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USAGE
    configure_logging(sys.stdout if args.command == "run" else sys.stderr, args.log_level)
    try:
        return int(args.handler(args))
    except USER_ERRORS as error:
        print(f"a3x: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyError as error:  # unknown task id or domain in a request
        print(f"a3x: error: {error.args[0]}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="a3x",
        description="A3X: a local agent that runs its recurring tasks on a local model, "
        "scores the answers and records every cycle in a Git journal.",
    )
    parser.add_argument(
        "--home", type=Path, help="A3X home folder (default: $A3X_HOME or ~/.local/share/a3x)"
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="config file (default: $A3X_CONFIG or ~/.config/a3x/config.toml)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="lowest level of log events to print (default: info)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run the scheduler in the foreground")
    run.set_defaults(handler=command_run)

    cycle = commands.add_parser("cycle", help="run one cycle now")
    cycle.add_argument(
        "--task", action="append", default=[], metavar="ID", help="run only this task (repeatable)"
    )
    cycle.add_argument("--domain", help="run only the tasks of this domain")
    cycle.add_argument("--json", action="store_true", help="print the cycle record as JSON")
    cycle.set_defaults(handler=command_cycle)

    scores = commands.add_parser("scores", help="print the score series of recent cycles")
    scores.add_argument("--domain", help="only this domain's series (default: the whole cycle)")
    scores.add_argument("--evaluator", help="only this evaluator's scores")
    scores.add_argument(
        "--last",
        type=positive_int,
        default=10,
        metavar="N",
        help="number of latest cycles to show (default: 10)",
    )
    scores.add_argument("--json", action="store_true")
    scores.set_defaults(handler=command_scores)

    status = commands.add_parser("status", help="show the home, model, tasks and last cycle")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=command_status)

    journal = commands.add_parser("journal", help="show recent cycles from the journal")
    journal.add_argument(
        "--last",
        type=positive_int,
        default=10,
        metavar="N",
        help="number of latest cycles to show (default: 10)",
    )
    journal.add_argument("--json", action="store_true")
    journal.set_defaults(handler=command_journal)

    tasks = commands.add_parser("tasks", help="list or validate task books")
    task_commands = tasks.add_subparsers(dest="tasks_command", metavar="ACTION", required=True)
    validate = task_commands.add_parser("validate", help="validate task book files")
    validate.add_argument("files", nargs="+", type=Path, metavar="FILE")
    validate.set_defaults(handler=command_tasks_validate)
    listing = task_commands.add_parser("list", help="list the configured tasks")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=command_tasks_list)

    bench = commands.add_parser("bench", help="benchmarks")
    bench_commands = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    from bench import generate as bench_generate

    generate = bench_commands.add_parser(
        "generate", help="tokens/s of the A3X runtime against raw llama-cpp-python"
    )
    bench_generate.add_arguments(generate)
    generate.set_defaults(handler=bench_generate.command)

    from bench import validate_evaluators

    validation = bench_commands.add_parser(
        "evaluators", help="validate the label-free scores on fixtures with known answers"
    )
    validate_evaluators.add_arguments(validation)
    validation.set_defaults(handler=validate_evaluators.command)

    from bench import score_cost

    cost = bench_commands.add_parser(
        "score-cost", help="cycle time with every evaluator against execution metrics only"
    )
    score_cost.add_arguments(cost)
    cost.set_defaults(handler=score_cost.command)
    return parser


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1; give a count of 1 or more")
    return value


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, home=args.home)


def command_run(args: argparse.Namespace) -> int:
    from daemon.cycle import Agent
    from daemon.service import Service

    agent = Agent(_config(args))
    return Service(agent).run()


def command_cycle(args: argparse.Namespace) -> int:
    from daemon.cycle import Agent, CycleRequest

    if args.domain is not None and not args.domain.strip():
        raise KeyError("--domain is empty; give a domain name, see `a3x tasks list`")
    if args.domain and args.task:
        raise KeyError("give either --task or --domain, not both")
    agent = Agent(_config(args))
    try:
        request = CycleRequest(trigger="manual", task_ids=tuple(args.task), domain=args.domain)
        record = agent.run_cycle(request)
    finally:
        agent.close()
    if args.json:
        print(json.dumps(record.to_json(), indent=2, ensure_ascii=False))
    else:
        print_cycle_summary(record, agent.logbook)
    return EXIT_CYCLE_FAILED if record.outcome is Outcome.FAILED else EXIT_OK


def print_cycle_summary(record: CycleRecord, logbook: Logbook) -> None:
    print(f"cycle {record.cycle}: {record.outcome.value}, {record.summary}")
    if record.error:
        print(f"error:   {record.error}")
    print(f"model:   {record.model.get('name')} ({record.model.get('backend')})")
    print(f"journal: {logbook.path} (commit {logbook.repo.head.commit.hexsha[:12]})")
    print(f"page:    {logbook.cycle_page_path(record.cycle)}")


def command_status(args: argparse.Namespace) -> int:
    config = _config(args)
    home = Home(config.home)
    if home.root.exists() and not home.root.is_dir():
        raise HomeError(
            f"home folder {home.root} is a file, not a folder; choose another "
            "folder with --home or A3X_HOME"
        )
    status: dict[str, Any] = {
        "home": str(home.root),
        "config": str(config.source) if config.source else None,
        "model": {
            "path": str(config.model.path or default_model_path()),
            "default": config.model.path is None,
            "backend": config.model.backend,
        },
        "schedule_interval_minutes": config.schedule.interval_minutes,
    }
    book = load_books(config.tasks.books)
    status["tasks"] = len(book.tasks)
    status["domains"] = sorted(book.domains)
    status["cycles"] = 0
    status["last_cycle"] = None
    if home.state_path.exists():
        state = StateStore(home.state_path)
        try:
            status["cycles"] = state.cycle_count()
            last = state.last_cycle()
            status["last_cycle"] = last.__dict__ if last else None
        finally:
            state.close()
    if args.json:
        print(json.dumps(status, indent=2))
        return EXIT_OK
    print(f"home:     {status['home']}")
    print(f"config:   {status['config'] or 'none (defaults)'}")
    default = " (default: Gemma 3 270M Q4_K_M)" if status["model"]["default"] else ""
    print(f"model:    {status['model']['path']}{default} via {status['model']['backend']}")
    print(f"schedule: every {config.schedule.interval_minutes:g} min")
    print(
        f"tasks:    {status['tasks']} in {len(status['domains'])} domains "
        f"({', '.join(status['domains'])})"
    )
    last = status["last_cycle"]
    if last:
        print(
            f"cycles:   {status['cycles']}; last: {last['id']} {last['outcome']} at "
            f"{last['started_at']}: {last['summary']}"
        )
    else:
        print("cycles:   none yet; run `a3x cycle`")
    return EXIT_OK


def command_journal(args: argparse.Namespace) -> int:
    config = _config(args)
    home = Home(config.home)
    if not (home.journal_path / ".git").exists():
        raise JournalError(f"no journal at {home.journal_path} yet; run `a3x cycle` first")
    logbook = Logbook(home.journal_path)
    entries = list(logbook.entries(last=args.last))
    if args.json:
        print(json.dumps([entry.__dict__ for entry in entries], indent=2, ensure_ascii=False))
        return EXIT_OK
    for entry in entries:
        print(f"{entry.commit[:12]}  {entry.date}  {entry.subject}")
    if not entries:
        print("the journal has no cycles yet")
    return EXIT_OK


def command_scores(args: argparse.Namespace) -> int:
    config = _config(args)
    home = Home(config.home)
    if not home.state_path.exists():
        raise StateError(f"no scores in {home.root} yet; run `a3x cycle` first")
    state = StateStore(home.state_path)
    try:
        rows = state.score_series(args.evaluator, args.domain or "", last_cycles=args.last)
    finally:
        state.close()
    series: dict[str, dict[int, float]] = {}
    units: dict[str, str] = {}
    for row in rows:
        key = f"{row['evaluator']}.{row['name']}"
        series.setdefault(key, {})[row["cycle_id"]] = row["value"]
        units[key] = row["unit"]
    if args.json:
        data = [
            {
                "score": key,
                "unit": units[key],
                "domain": args.domain,
                "values": [{"cycle": c, "value": v} for c, v in sorted(values.items())],
            }
            for key, values in series.items()
        ]
        print(json.dumps(data, indent=2))
        return EXIT_OK
    if not series:
        scope = f"domain {args.domain}" if args.domain else "the whole cycle"
        print(f"no scores for {scope} yet")
        return EXIT_OK
    cycles = sorted({row["cycle_id"] for row in rows})
    width = max(len(key) for key in series)
    print(f"{'score':{width}}  " + "  ".join(f"{c:>9}" for c in cycles) + "  unit")
    for key, values in series.items():
        cells = "  ".join(f"{values[c]:>9.4g}" if c in values else " " * 9 for c in cycles)
        print(f"{key:{width}}  {cells}  {units[key]}")
    return EXIT_OK


def command_tasks_validate(args: argparse.Namespace) -> int:
    failed = False
    for path in args.files:
        try:
            book = load_book(path)
        except TaskBookError as error:
            print(error, file=sys.stderr)
            failed = True
            continue
        domains = sorted({task.domain for task in book.tasks})
        print(
            f"{path}: ok, {len(book.tasks)} tasks in {len(domains)} domains ({', '.join(domains)})"
        )
    return EXIT_USAGE if failed else EXIT_OK


def command_tasks_list(args: argparse.Namespace) -> int:
    book = load_books(_config(args).tasks.books)
    if args.json:
        rows = [
            {
                "id": t.id,
                "domain": t.domain,
                "language": t.language,
                "every": t.every,
                "weight": t.weight,
                "source": str(t.source),
            }
            for t in book.tasks
        ]
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for task in book.tasks:
        print(f"{task.id:40} {task.domain:12} {task.language:6} every {task.every} cycle(s)")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
