"""`a3x lora ...`: the GGUF+LoRA toolkit's command line.

Each command lives in its own module, which provides `add_arguments(parser)`
and `command(args) -> int` (the exit code). A module is imported only when
its action runs.
"""

from __future__ import annotations

import argparse
import importlib

# (command, module, help)
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("export", "lora.export", "convert a PEFT LoRA folder to a GGUF adapter for llama.cpp"),
    ("import", "lora.importer", "convert a GGUF LoRA adapter to a PEFT folder"),
    ("info", "lora.info", "show and validate an adapter's A3X metadata"),
    ("profile", "lora.profile", "memory per layer: weights, LoRA tensors and activations"),
    ("check", "lora.check", "check that an adapter fits a base and matches its PEFT original"),
    ("merge", "lora.merge", "merge LoRA adapters into a GGUF base model"),
    (
        "quant-error",
        "lora.quant_error",
        "per-layer error between merged weights and their quantized form",
    ),
)


def add_commands(parser: argparse.ArgumentParser) -> None:
    """Register `a3x lora ACTION ...`. The action's module, which imports numpy, torch
    or gguf, is loaded only when that action runs, so other commands start fast."""
    listing = "\n".join(f"  {name:<12} {text}" for name, _, text in COMMANDS)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = f"actions:\n{listing}\n\nRun `a3x lora ACTION --help` for its options."
    parser.add_argument("action", choices=[name for name, _, _ in COMMANDS], metavar="ACTION")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="the action's arguments")
    parser.set_defaults(handler=run_action)


def run_action(args: argparse.Namespace) -> int:
    name, module_name, help_text = next(c for c in COMMANDS if c[0] == args.action)
    module = importlib.import_module(module_name)
    action = argparse.ArgumentParser(prog=f"a3x lora {name}", description=help_text)
    module.add_arguments(action)
    parsed = action.parse_args(args.arguments)
    for key, value in vars(args).items():  # --home, --config and --log-level
        if key not in ("action", "arguments", "handler") and not hasattr(parsed, key):
            setattr(parsed, key, value)
    return int(module.command(parsed))
