"""The `a3x` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon.config import Config, ConfigError, load_config
from daemon.control import ControlClient, ControlError, socket_path
from daemon.home import CycleBusyError, Home, HomeError
from daemon.logs import configure_logging
from daemon.records import CycleRecord, Outcome, RecordVersionError
from daemon.state import StateError, StateStore
from daemon.taskbook import TaskBookError, load_book, load_books
from journal.logbook import JournalError, Logbook
from lora import LoraError
from runtime.default_model import default_model_path
from runtime.gguf_file import ModelFileError

# Errors that come from the user's input or environment: printed as one clear
# message with exit code 2, never as a traceback.
USER_ERRORS = (
    ControlError,
    ConfigError,
    TaskBookError,
    ModelFileError,
    HomeError,
    CycleBusyError,
    JournalError,
    StateError,
    RecordVersionError,
    LoraError,
)
EXIT_OK, EXIT_CYCLE_FAILED, EXIT_USAGE, EXIT_BUSY = 0, 1, 2, 3


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USAGE
    configure_logging(sys.stdout if args.command == "run" else sys.stderr, args.log_level)
    try:
        return int(args.handler(args))
    except CycleBusyError as error:
        print(f"a3x: error: {error}", file=sys.stderr)
        return EXIT_BUSY
    except USER_ERRORS as error:
        print(f"a3x: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyError as error:  # unknown task id or domain in a request
        print(f"a3x: error: {error.args[0]}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader of stdout went away, as in `a3x status | head -2`
        sys.stderr.close()
        return EXIT_OK


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
    cycle.add_argument(
        "--wait", action="store_true", help="with a running daemon, wait for the cycle's result"
    )
    cycle.set_defaults(handler=command_cycle, retrain=[])

    retrain = commands.add_parser(
        "retrain",
        help="run a cycle of one domain's tasks and retrain its LoRA adapter",
        description="Run the domain's tasks, then one retraining round: train a LoRA adapter "
        "on the domain's best past answers and corpus, gate it against the adapter that "
        "serves now, and record the decision in the journal. It takes minutes.",
    )
    retrain.add_argument("domain", help="the domain to retrain (see `a3x tasks list`)")
    retrain.add_argument("--json", action="store_true", help="print the cycle record as JSON")
    retrain.add_argument(
        "--wait", action="store_true", help="with a running daemon, wait for the result"
    )
    retrain.set_defaults(handler=command_retrain)

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

    for name, text in (
        ("pause", "pause the daemon's schedule"),
        ("resume", "resume the daemon's schedule"),
        ("reload", "make the daemon re-read its configuration and task books"),
    ):
        control = commands.add_parser(name, help=text)
        control.set_defaults(handler=command_control, control_command=name)

    failures = commands.add_parser(
        "failures", help="failed, aborted and degraded cycles and rejected adapters"
    )
    failures.add_argument(
        "--since",
        type=date_argument,
        metavar="DATE",
        help="only entries since this date (YYYY-MM-DD, UTC)",
    )
    failures.add_argument("--domain", help="only entries that name this domain")
    failures.add_argument("--json", action="store_true")
    failures.set_defaults(handler=command_failures)

    show = commands.add_parser("show", help="print one cycle's journal page")
    show.add_argument("cycle", type=positive_int, metavar="CYCLE")
    show.add_argument("--json", action="store_true", help="print the cycle record instead")
    show.set_defaults(handler=command_show)

    service = commands.add_parser("service", help="install A3X as a systemd service")
    service_commands = service.add_subparsers(
        dest="service_command", metavar="ACTION", required=True
    )
    install = service_commands.add_parser("install", help="write and enable the unit file")
    install.add_argument(
        "--user",
        action="store_true",
        help="a user unit in ~/.config/systemd/user (the default when not root)",
    )
    install.add_argument(
        "--output", type=Path, metavar="FILE", help="write the unit to FILE and enable nothing"
    )
    install.set_defaults(handler=command_service_install)

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

    from lora import cli as lora_cli

    lora = commands.add_parser("lora", help="GGUF+LoRA toolkit: export, import, merge, check")
    lora_cli.add_commands(lora)

    from lora import adapters_cli

    adapters = commands.add_parser(
        "adapters",
        help="list, show, activate, deactivate, pin or remove adapter versions",
        description="The adapter versions of the home, named domain/vN. Changes take effect "
        "from the next cycle.",
    )
    adapters_cli.add_arguments(adapters)

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
        "evaluators",
        help="validate the label-free scores on fixtures with known contradictions and trends",
    )
    validate_evaluators.add_arguments(validation)
    validation.set_defaults(handler=validate_evaluators.command)

    from bench import score_cost

    cost = bench_commands.add_parser(
        "score-cost", help="cycle time with every evaluator against execution metrics only"
    )
    score_cost.add_arguments(cost)
    cost.set_defaults(handler=score_cost.command)

    from bench import resilience

    kill = bench_commands.add_parser(
        "kill", help="SIGKILL a real daemon at random moments and check nothing is lost"
    )
    resilience.add_kill_arguments(kill)
    kill.set_defaults(handler=resilience.kill_command)
    soak = bench_commands.add_parser("soak", help="run many cycles and watch memory and files")
    resilience.add_soak_arguments(soak)
    soak.set_defaults(handler=resilience.soak_command)
    control_latency = bench_commands.add_parser(
        "control", help="time a cycle request to a running daemon"
    )
    resilience.add_control_arguments(control_latency)
    control_latency.set_defaults(handler=resilience.control_command)

    from bench import routing as bench_routing

    routing = bench_commands.add_parser(
        "routing",
        help="share of the shipped task prompts that routing sends to their own domain",
    )
    bench_routing.add_arguments(routing)
    routing.set_defaults(handler=bench_routing.command)

    from bench import retrain_proof

    proof = bench_commands.add_parser(
        "retrain-proof",
        help="teach the default model the almanac facts; poisoned rounds must be rejected",
    )
    retrain_proof.add_arguments(proof)
    proof.set_defaults(handler=retrain_proof.command)

    from bench import train_step

    training_step = bench_commands.add_parser(
        "train-step",
        help="time per optimizer step and peak RSS of the A3X trainer against "
        "transformers Trainer + PEFT",
    )
    train_step.add_arguments(training_step)
    training_step.set_defaults(handler=train_step.command)

    from bench import lean_memory

    lean_memory_parser = bench_commands.add_parser(
        "lean-memory",
        help="the lean trainer's memory planner against measured peaks, by batch and sequence",
    )
    lean_memory.add_arguments(lean_memory_parser)
    lean_memory_parser.set_defaults(handler=lean_memory.command)

    from bench import lean_compile

    lean_compile_parser = bench_commands.add_parser(
        "lean-compile", help="the lean trainer's step time, eager against torch.compile"
    )
    lean_compile.add_arguments(lean_compile_parser)
    lean_compile_parser.set_defaults(handler=lean_compile.command)

    from bench import train as bench_train

    training = bench_commands.add_parser(
        "train",
        help="plain PEFT fp32, PEFT bf16, NF4 QLoRA and A3X lean side by side: time per "
        "step, peak RSS and held-out perplexity",
    )
    bench_train.add_arguments(training)
    training.set_defaults(handler=bench_train.command)

    from bench import adapters as bench_adapters

    adapter_benchmark = bench_commands.add_parser(
        "adapters",
        help="latency of activating, loading, combining and routing LoRA adapters, and "
        "tokens/s with 0, 1 and 3 adapters active",
    )
    bench_adapters.add_arguments(adapter_benchmark)
    adapter_benchmark.set_defaults(handler=bench_adapters.command)
    return parser


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1; give 1 or more")
    return value


def date_argument(text: str) -> datetime:
    try:
        return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date like 2026-12-31") from None


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, home=args.home)


def command_run(args: argparse.Namespace) -> int:
    from daemon.cycle import Agent
    from daemon.service import Service

    agent = Agent(_config(args))
    return Service(agent).run()


def command_cycle(args: argparse.Namespace) -> int:
    if args.domain is not None and not args.domain.strip():
        raise KeyError("--domain is empty; give a domain name, see `a3x tasks list`")
    if args.domain and args.task:
        raise KeyError("give either --task or --domain, not both")
    config = _config(args)
    client = ControlClient(socket_path(config.home))
    if client.available():
        return cycle_through_daemon(client, args, Home(config.home))
    if args.wait:
        print("no daemon runs for this home; running the cycle here", file=sys.stderr)
    # Imported only here: the evaluators pull in scipy and faiss (about 0.6 s), which a
    # request to a running daemon does not need.
    from daemon.cycle import Agent, CycleRequest

    agent = Agent(config)
    try:
        request = CycleRequest(
            trigger="manual",
            task_ids=tuple(args.task),
            domain=args.domain,
            retrain=tuple(args.retrain),
        )
        record = agent.run_cycle(request)
    finally:
        agent.close()
    if args.json:
        print(json.dumps(record.to_json(), indent=2, ensure_ascii=False))
    else:
        print_cycle_summary(record, agent.logbook)
    return EXIT_CYCLE_FAILED if record.outcome is Outcome.FAILED else EXIT_OK


def command_retrain(args: argparse.Namespace) -> int:
    if not args.domain.strip():
        raise KeyError("the domain is empty; give a domain name, see `a3x tasks list`")
    args.retrain, args.task = [args.domain], []
    return command_cycle(args)


def cycle_through_daemon(client: ControlClient, args: argparse.Namespace, home: Home) -> int:
    """Ask the running daemon for a cycle; print its id, and its result with --wait."""
    message: dict[str, Any] = {"command": "cycle", "tasks": args.task, "wait": args.wait}
    if args.domain:
        message["domain"] = args.domain
    if args.retrain:
        message["retrain"] = args.retrain
    for reply in client.request(message, timeout=None if args.wait else 60.0):
        if not reply.get("ok"):
            raise CycleBusyError(f"the daemon did not run the cycle: {reply.get('error')}")
        if reply.get("state") == "started":
            print(f"cycle {reply['cycle']} started by the daemon")
            if not args.wait:
                return EXIT_OK
        elif reply.get("state") == "finished":
            print(f"cycle {reply['cycle']}: {reply['outcome']}, {reply['summary']}")
            page = home.journal_path / "cycles" / f"{reply['cycle']:06d}.md"
            print(f"page:    {page}")
            return EXIT_CYCLE_FAILED if reply["outcome"] == "failed" else EXIT_OK
    raise ControlError("the daemon closed the connection before the cycle finished")


def print_cycle_summary(record: CycleRecord, logbook: Logbook) -> None:
    print(f"cycle {record.cycle}: {record.outcome.value}, {record.summary}")
    if record.error:
        print(f"error:   {record.error}")
    print(f"model:   {record.model.get('name')} ({record.model.get('backend')})")
    print(f"journal: {logbook.path} (commit {logbook.repo.head.commit.hexsha[:12]})")
    print(f"page:    {logbook.cycle_page_path(record.cycle)}")
    for result in record.retrain.rounds if record.retrain else ():
        print(f"retrain: {result['domain']}: {result['outcome']}: {result['message']}")
        if result.get("adapter"):
            stem = result["adapter"].replace("/", "-")
            print(f"decision: {logbook.path / 'decisions' / (stem + '.md')}")


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
        "adapters": {
            "routing": config.routing.enabled,
            "budget_mb": config.model.adapter_budget_mb,
        },
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
    client = ControlClient(socket_path(home.root))
    status["daemon"] = next(client.request({"command": "status"})) if client.available() else None
    if args.json:
        print(json.dumps(status, indent=2))
        return EXIT_OK
    print(f"home:     {status['home']}")
    service = status["daemon"]
    if service:
        running = f", running cycle {service['running_cycle']}" if service["running_cycle"] else ""
        schedule = "paused" if service["paused"] else f"next cycle at {service['next_run']}"
        print(f"daemon:   running, {schedule}{running}")
    else:
        print("daemon:   not running")
    print(f"config:   {status['config'] or 'none (defaults)'}")
    default = " (default: Gemma 3 270M Q4_K_M)" if status["model"]["default"] else ""
    print(f"model:    {status['model']['path']}{default} via {status['model']['backend']}")
    print(f"schedule: every {config.schedule.interval_minutes:g} min")
    routing = "by prompt similarity" if config.routing.enabled else "each domain's serving version"
    print(f"adapters: {routing}; budget {config.model.adapter_budget_mb} MiB")
    print(
        f"tasks:    {status['tasks']} in {len(status['domains'])} domains "
        f"({', '.join(status['domains'])})"
    )
    last = status["last_cycle"]
    if last:
        summary = last["summary"] or "(in progress)"
        print(
            f"cycles:   {status['cycles']}; last: {last['id']} {last['outcome']} at "
            f"{last['started_at']}: {summary}"
        )
    else:
        print("cycles:   none yet; run `a3x cycle`")
    return EXIT_OK


def command_journal(args: argparse.Namespace) -> int:
    logbook = _existing_logbook(Home(_config(args).home))
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
        _check_score_filters(home, args)
        scope = f"domain {args.domain}" if args.domain else "the whole cycle"
        print(f"no scores for {scope} in the last {args.last} cycles")
        return EXIT_OK
    cycles = sorted({row["cycle_id"] for row in rows})
    width = max(len(key) for key in series)
    print(f"{'score':{width}}  " + "  ".join(f"{c:>9}" for c in cycles) + "  unit")
    for key, values in series.items():
        cells = "  ".join(f"{values[c]:>9.4g}" if c in values else " " * 9 for c in cycles)
        print(f"{key:{width}}  {cells}  {units[key]}")
    return EXIT_OK


def command_control(args: argparse.Namespace) -> int:
    config = _config(args)
    client = ControlClient(socket_path(config.home))
    if not client.available():
        raise ControlError(f"no a3x daemon runs for home {config.home}; start it with `a3x run`")
    reply = next(client.request({"command": args.control_command}))
    if not reply.get("ok"):
        raise ControlError(f"the daemon rejected {args.control_command}: {reply.get('error')}")
    print(f"{args.control_command}: done")
    return EXIT_OK


def command_failures(args: argparse.Namespace) -> int:
    from journal.history import failures

    config = _config(args)
    logbook = _existing_logbook(Home(config.home))
    found = failures(logbook, since=args.since, domain=args.domain)
    if args.domain and not found:
        # A domain no longer in the task book may still have failures in the journal.
        domains = sorted(load_books(config.tasks.books).domains)
        if args.domain not in domains:
            raise StateError(
                f"no domain '{args.domain}' in the task book or the failures; "
                f"known: {', '.join(domains)}"
            )
    if args.json:
        print(json.dumps([f.__dict__ for f in found], indent=2, ensure_ascii=False))
        return EXIT_OK
    for failure in found:
        cycle = f"cycle {failure.cycle}" if failure.cycle is not None else "-"
        print(
            f"{failure.commit[:12]}  {failure.date}  {cycle:11} {failure.kind:8} {failure.reason}"
        )
    if not found:
        print("no failures recorded")
    return EXIT_OK


def command_show(args: argparse.Namespace) -> int:
    logbook = _existing_logbook(Home(_config(args).home))
    record = logbook.read_cycle(args.cycle)
    if args.json:
        print(json.dumps(record.to_json(), indent=2, ensure_ascii=False))
    else:
        print(logbook.cycle_page_path(args.cycle).read_text(encoding="utf-8"), end="")
    return EXIT_OK


def _existing_logbook(home: Home) -> Logbook:
    if not (home.journal_path / ".git").exists():
        raise JournalError(f"no journal at {home.journal_path} yet; run `a3x cycle` first")
    return Logbook(home.journal_path)


def command_service_install(args: argparse.Namespace) -> int:
    from daemon.unit import install_unit

    config = _config(args)
    path = install_unit(config, user=args.user, output=args.output)
    print(f"unit written: {path}")
    return EXIT_OK


def _check_score_filters(home: Home, args: argparse.Namespace) -> None:
    """Raise a clear error when --evaluator or --domain names nothing ever scored."""
    state = StateStore(home.state_path)
    try:
        known = state.connection.execute("SELECT DISTINCT evaluator, domain FROM scores").fetchall()
    finally:
        state.close()
    evaluators = sorted({row[0] for row in known})
    domains = sorted({row[1] for row in known if row[1]})
    if args.evaluator and args.evaluator not in evaluators:
        raise StateError(
            f"no evaluator '{args.evaluator}' in the scores; known: {', '.join(evaluators)}"
        )
    if args.domain and args.domain not in domains:
        raise StateError(f"no domain '{args.domain}' in the scores; known: {', '.join(domains)}")


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
    if not failed and len(args.files) > 1:
        try:  # books used together must not share task ids
            load_books(args.files)
        except TaskBookError as error:
            print(error, file=sys.stderr)
            failed = True
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
