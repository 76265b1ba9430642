"""`a3x adapters ...`: list, inspect and steer the adapters of a home.

Names are `domain/vN`. `activate` and `deactivate` are the owner's overrides
of the gate's choice and are stored, with who and when, in the version's
record.json (see lora/registry.py). The daemon reads the registry when it
plans a cycle, so a change takes effect from the next cycle.
"""

from __future__ import annotations

import argparse
import json

from lora import LoraError
from lora.metadata import BaseModelRef
from lora.registry import (
    Adapter,
    AdapterRegistry,
    base_mismatch,
    configured_base,
    current_user,
)

ACTIONS = ("activate", "deactivate", "pin", "unpin", "remove")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="adapters_command", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="every adapter version with its status")
    listing.add_argument("--json", action="store_true", help="print the list as JSON")
    listing.set_defaults(handler=command_list)

    show = actions.add_parser("show", help="one version: record, metadata and gate evidence")
    show.add_argument("name", metavar="NAME", help="the version, as domain/vN")
    show.add_argument("--json", action="store_true", help="print the version as JSON")
    show.set_defaults(handler=command_show)

    helps = {
        "activate": "make this version serve its domain, whatever the gate decided",
        "deactivate": "stop this version serving; where the gate chose it, the base answers",
        "pin": "mark this version pinned, so that remove rejects it",
        "unpin": "undo pin",
        "remove": "delete this version's folder (not a pinned or serving one without --force)",
    }
    for action in ACTIONS:
        sub = actions.add_parser(action, help=helps[action], description=helps[action])
        sub.add_argument("name", metavar="NAME", help="the version, as domain/vN")
        sub.add_argument("--json", action="store_true", help="print the changed version as JSON")
        if action == "remove":
            sub.add_argument(
                "--force", action="store_true", help="also remove a pinned or serving version"
            )
        sub.set_defaults(handler=command_change, adapters_action=action)

    layers = actions.add_parser(
        "layers",
        help="show, set or clear a version's per-layer scales",
        description=(
            "Per-layer scales multiply the adapter's update per block and per module, "
            "wherever the version is used, from the next cycle. SCALES is a JSON object: "
            '{"default": 1.0, "layers": {"0-5": 0.5, "12": 0}, "modules": {"attn_v": 2.0}} '
            "(docs/routing.md)."
        ),
    )
    layers.add_argument("name", metavar="NAME", help="the version, as domain/vN")
    layers.add_argument("scales", metavar="SCALES", nargs="?", help="the scales as JSON")
    layers.add_argument("--clear", action="store_true", help="remove the version's scales")
    layers.add_argument("--json", action="store_true", help="print the result as JSON")
    layers.set_defaults(handler=command_layers)


# Reading


def command_list(args: argparse.Namespace) -> int:
    registry, base, note = _open(args)
    rows = [describe(registry, adapter, base) for adapter in registry.all()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if note:
        print(f"note: {note}")
    if not rows:
        print(f"no adapters in {registry.root}; a retraining round makes the first one")
        return 0
    print(f"{'NAME':20} {'STATUS':9} {'SERVING':8} {'PINNED':6} {'CYCLE':>5}  GATE")
    for row in rows:
        print(
            f"{row['name']:20} {row['status']:9} {row['serving'] or '-':8} "
            f"{'yes' if row['pinned'] else '-':6} {row['cycle'] or '-':>5}  {row['gate']}"
        )
        if row["base_mismatch"]:
            print(f"{'':20} other base: {row['base_mismatch']}")
    return 0


def command_show(args: argparse.Namespace) -> int:
    registry, base, note = _open(args)
    adapter = registry.get(args.name)
    row = describe(registry, adapter, base)
    from lora.specialize import specializations

    row["specialization"] = [verdict.to_json() for verdict in specializations(registry, adapter)]
    if args.json:
        print(json.dumps({**row, "record": adapter.record}, indent=2))
        return 0
    print(f"{adapter.name}: {row['status']}, serving: {row['serving'] or 'no'}")
    print(f"  folder: {adapter.folder}")
    print(f"  reason: {adapter.record.get('reason') or '-'} (cycle {row['cycle'] or '-'})")
    print(f"  gate: {row['gate']}")
    for evidence in (adapter.record.get("gate") or {}).get("evidence", []):
        print(
            f"    {evidence['domain']} ({evidence['role']}) {evidence['metric']}: "
            f"{evidence['incumbent']:.4g} -> {evidence['candidate']:.4g} ({evidence['verdict']})"
        )
    for verdict in row["specialization"]:
        mark = "beats the base" if verdict["beats_base"] else "base answers"
        print(f"  routing on {verdict['domain']}: {mark}: {verdict['reason']}")
    if row["pinned"]:
        pin = adapter.record["pinned"]
        print(f"  pinned by {pin['by']} at {pin['at']}")
    if adapter.owner_serving is not None:
        owner = adapter.record["owner"]
        what = "activated" if owner["serving"] else "deactivated"
        print(f"  {what} by {owner['by']} at {owner['at']}")
    layer_entry = adapter.record.get("layer_scales")
    if isinstance(layer_entry, dict):
        print(
            f"  per-layer scales {json.dumps(layer_entry.get('scales'))}, set by "
            f"{layer_entry.get('by')} at {layer_entry.get('at')}"
        )
    if row["base_mismatch"]:
        print(f"  other base: {row['base_mismatch']}")
    if note:
        print(f"  note: {note}")
    if adapter.gguf_path.exists():
        from lora.info import describe_adapter, format_summary

        print(format_summary(describe_adapter(adapter.gguf_path)))
    return 0


def describe(registry: AdapterRegistry, adapter: Adapter, base: BaseModelRef | None) -> dict:
    """Return the list row of a version, as JSON-ready values."""
    serving = registry.serving(adapter.domain)
    served_by = None  # "owner": activated by the owner; "gate": the newest accepted version
    if serving is not None and serving.version == adapter.version:
        served_by = "owner" if adapter.owner_serving else "gate"
    gate = adapter.record.get("gate") or {}
    return {
        "name": adapter.name,
        "domain": adapter.domain,
        "version": adapter.version,
        "status": str(adapter.status),
        "serving": served_by,
        "owner": adapter.record.get("owner"),
        "pinned": adapter.pinned,
        "cycle": adapter.record.get("cycle"),
        "gate": gate.get("reason") or adapter.record.get("error") or "not gated",
        "base_mismatch": base_mismatch(adapter, base) if base is not None else None,
        "profile": (adapter.folder / "profile.npy").exists(),
        "folder": str(adapter.folder),
    }


# Changing


def command_change(args: argparse.Namespace) -> int:
    action = args.adapters_action
    registry, base, note = _open(args, need_base=action == "activate")
    adapter = registry.get(args.name)
    by = current_user()
    if action == "activate":
        problem = base_mismatch(adapter, base) if base is not None else None
        if problem:
            raise LoraError(f"not activated: {problem}")
        changed: Adapter | None = registry.activate(adapter, by)
    elif action == "deactivate":
        changed = registry.deactivate(adapter, by)
    elif action == "pin":
        changed = registry.pin(adapter, by)
    elif action == "unpin":
        changed = registry.unpin(adapter, by)
    else:
        registry.remove(adapter, force=args.force)
        changed = None
    serving = registry.serving(adapter.domain)
    now = serving.name if serving else "the base model"
    if args.json:
        print(
            json.dumps(
                {
                    "action": action,
                    "adapter": adapter.name,
                    "removed": changed is None,
                    "record": changed.record if changed else None,
                    "domain_served_by": serving.name if serving else None,
                },
                indent=2,
            )
        )
        return 0
    print(f"{adapter.name}: {_done(action)} by {by}; {adapter.domain} is served by {now}")
    if note and action == "activate":
        print(f"note: {note}")
    return 0


def command_layers(args: argparse.Namespace) -> int:
    from lora.layers import LayerScales

    if args.scales is not None and args.clear:
        raise LoraError("give SCALES or --clear, not both")
    registry, _, _ = _open(args)
    adapter = registry.get(args.name)
    if args.clear:
        adapter = registry.set_layer_scales(adapter, None, current_user())
    elif args.scales is not None:
        adapter = registry.set_layer_scales(adapter, LayerScales.parse(args.scales), current_user())
    scales = adapter.layer_scales
    spec = scales.to_json() if scales is not None else None
    if args.json:
        print(json.dumps({"adapter": adapter.name, "layer_scales": spec}, indent=2))
        return 0
    if spec is None:
        print(f"{adapter.name}: no per-layer scales; every layer at the adapter's scale")
    else:
        print(f"{adapter.name}: per-layer scales {json.dumps(spec)}")
    return 0


def _done(action: str) -> str:
    return {
        "activate": "activated",
        "deactivate": "deactivated",
        "pin": "pinned",
        "unpin": "unpinned",
        "remove": "removed",
    }[action]


def _open(
    args: argparse.Namespace, need_base: bool = False
) -> tuple[AdapterRegistry, BaseModelRef | None, str]:
    """Return the home's registry, the configured base and a note when the base is unknown.

    With `need_base`, a model that cannot be read is an error instead of a note.
    """
    from daemon.config import load_config
    from daemon.home import Home
    from runtime.gguf_file import ModelFileError
    from runtime.loader import describe_model

    config = load_config(args.config, home=args.home)
    registry = AdapterRegistry(Home(config.home).adapters_path)
    try:
        base = configured_base(describe_model(config.model))
    except ModelFileError as error:
        if need_base:
            raise
        return registry, None, f"bases not checked: {error}"
    if base is None:
        return (
            registry,
            None,
            "bases not checked: the configured model is a folder, not a GGUF file",
        )
    return registry, base, ""
