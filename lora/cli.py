"""`a3x lora ...`: the GGUF+LoRA toolkit's command line.

Each command lives in its own module, which provides `add_arguments(parser)`
and `command(args) -> int` (the exit code). Modules import heavy libraries
inside their functions, so building the parser stays fast.
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
    actions = parser.add_subparsers(dest="lora_command", metavar="ACTION", required=True)
    for name, module_name, help_text in COMMANDS:
        module = importlib.import_module(module_name)
        sub = actions.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.command)
