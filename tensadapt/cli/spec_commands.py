"""Commands on specs and plans: ``validate``, ``schema`` (neither imports torch), ``plan``,
``plugins``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from .base import UsageError, existing_file


def add_validate(p: argparse.ArgumentParser) -> None:
    p.add_argument("specs", nargs="+", metavar="SPEC", help="spec YAML file(s)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only problems")


def run_validate(args: argparse.Namespace) -> int:
    from ..spec import validate_files

    # a FIFO or a device is refused by load_spec without being opened (it would block)
    results: dict[str, Sequence[object]] = dict(validate_files(args.specs))
    bad = 0
    for path in dict.fromkeys(args.specs):
        problems = results[path]
        if problems:
            bad += 1
            print(f"{path}: {len(problems)} problem(s)")
            for p in problems:
                print(f"  - {p}")
        elif not args.quiet:
            print(f"{path}: ok")
    return 2 if bad else 0


def add_schema(p: argparse.ArgumentParser) -> None:
    pass


def run_schema(args: argparse.Namespace) -> int:
    from ..spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def add_plan(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", nargs="?", metavar="SPEC", help="spec YAML file")
    p.add_argument(
        "--model",
        "-m",
        default="roberta-base",
        help="preset name or local model/config path (default: roberta-base)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--list-models", action="store_true", help="list the bundled model presets")


def run_plan(args: argparse.Namespace) -> int:
    from ..arch import PRESETS, load_config
    from ..planner import plan

    if args.list_models:
        for name in PRESETS:
            print(name)
        return 0
    if not args.spec:
        raise UsageError("plan: give a SPEC file (or --list-models)")
    spec_path = existing_file(args.spec)
    p = plan(spec_path, load_config(args.model))
    print(p.to_json() if args.json else str(p))
    return 0


def add_plugins(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--json", action="store_true", help="print entries, plugins and failures as JSON"
    )


def run_plugins(args: argparse.Namespace) -> int:
    from .. import plugins

    report = plugins.report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    cols = ("kind", "name", "distribution", "version", "description")
    table = [cols, *[tuple(r[c] for c in cols) for r in report["entries"]]]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols) - 1)]
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)) + "  " + row[-1])
    off = [p for p in report["plugins"] if p["status"] == "disabled"]
    if off:
        print("\ndisabled: " + ", ".join(f"{p['name']} ({p['distribution']})" for p in off))
    if report["failures"]:
        print(f"\n{len(report['failures'])} plugin problem(s), left out:")
        for f in report["failures"]:
            print(f"  - {f['message']}")
    return 0
