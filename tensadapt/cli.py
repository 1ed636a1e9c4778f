"""The ``tensadapt`` command line.

Every command exits 0 on success, 2 on a user mistake (with a message naming the field, the file or
the mismatch, never a traceback), 1 on an unexpected internal error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import SpecError, TensadaptError

EPILOG = """\
examples:
  tensadapt validate specs/*.yaml
  tensadapt plan specs/lorta.yaml --model roberta-base
  tensadapt plan specs/tenslora-qkv-depth.yaml --model llama3-8b --json
  tensadapt schema > tensadapt.schema.json

Models (--model): a bundled preset (tensadapt plan --list-models) or a local model/config
directory. Planning reads only the config: no weights are loaded.
"""


class UsageError(TensadaptError):
    """A command-line mistake (exit 2)."""


def _existing_file(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{path}: no such file")
    if p.is_dir():
        raise UsageError(f"{path}: is a directory, expected a file")
    return p


# -- validate ------------------------------------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    from .spec import validate_files

    results = validate_files(args.specs)
    bad = 0
    for path, problems in results.items():
        if problems:
            bad += 1
            print(f"{path}: {len(problems)} problem(s)")
            for p in problems:
                print(f"  - {p}")
        elif not args.quiet:
            print(f"{path}: ok")
    return 2 if bad else 0


def add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate",
        help="check spec files; exit 0 when all are valid, 2 otherwise",
        description="Check one or more spec YAML files and print every problem with its path "
        "(e.g. 'rank.qkv: must be >= 1'). Exit 0 when all are valid, 2 otherwise.",
    )
    p.add_argument("specs", nargs="+", metavar="SPEC", help="spec YAML file(s)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only problems")
    p.set_defaults(func=cmd_validate)


# -- schema --------------------------------------------------------------------------------
def cmd_schema(args: argparse.Namespace) -> int:
    from .spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def add_schema(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "schema",
        help="print the spec's JSON Schema (for editor completion)",
        description="Print the JSON Schema of adapter specs; point your editor's YAML language "
        "server at it for completion and inline docs.",
    )
    p.set_defaults(func=cmd_schema)


# -- plan ----------------------------------------------------------------------------------
def cmd_plan(args: argparse.Namespace) -> int:
    from .arch import PRESETS, load_config
    from .planner import plan

    if args.list_models:
        for name in PRESETS:
            print(name)
        return 0
    if not args.spec:
        raise UsageError("plan: give a SPEC file (or --list-models)")
    spec_path = _existing_file(args.spec)
    p = plan(spec_path, load_config(args.model))
    print(p.to_json() if args.json else str(p))
    return 0


def add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="compile a spec against a model's architecture and print the plan",
        description="Compile SPEC against a model's architecture (config only, no weights) and "
        "print every tensor's axes and factor shapes, the parameter count, its ratio to LoRA and "
        "the adapter FLOPs per token.",
    )
    p.add_argument("spec", nargs="?", metavar="SPEC", help="spec YAML file")
    p.add_argument(
        "--model",
        "-m",
        default="roberta-base",
        help="preset name or local model/config path (default: roberta-base)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--list-models", action="store_true", help="list the bundled model presets")
    p.set_defaults(func=cmd_plan)


#: subcommand registrars, in --help order. Each adds one subparser with ``set_defaults(func=...)``.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_validate, add_schema, add_plan]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tensadapt",
        description="Tensor-factorized parameter-efficient fine-tuning: write a YAML spec, plan it "
        "against a model, inject, train, merge.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SpecError as e:
        print(str(e), file=sys.stderr)
        return 2
    except TensadaptError as e:
        print(f"tensadapt: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        print(f"tensadapt: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
