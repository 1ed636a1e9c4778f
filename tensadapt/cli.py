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


# -- export --------------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_merged, export_peft_lora, load_base_model
    from .io import load_adapter

    src = Path(args.adapter)
    if not src.exists():
        raise UsageError(f"{args.adapter}: no such adapter directory")
    if not src.is_dir():
        raise UsageError(f"{args.adapter}: is a file, expected an adapter directory")
    model = load_base_model(args.model, seed=args.seed, model_class=args.model_class)
    load_adapter(model, src)
    if args.to == "merged":
        out = export_merged(model, args.out, inplace=True)
        print(f"wrote merged weights to {out} (load with {type(model).__name__}.from_pretrained)")
    else:
        print(export_peft_lora(model, args.out, rank=args.rank))
    return 0


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a saved adapter as a PEFT LoRA adapter or as merged full weights",
        description="Rebuild the base model, load the adapter from ADAPTER_DIR and write it as a "
        "standard PEFT LoRA adapter (--to peft-lora; exact for lora/cp/tucker/tt, a truncated "
        "SVD at --rank with the error reported for mpo) or as merged full weights "
        "(--to merged; safetensors, loadable with from_pretrained). The base model must be the "
        "one the adapter was trained on: the same local weights, or the same preset and --seed.",
    )
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="directory written by save_adapter")
    p.add_argument("--to", choices=("peft-lora", "merged"), required=True, help="export format")
    p.add_argument("--out", "-o", required=True, help="output directory")
    p.add_argument(
        "--model",
        "-m",
        required=True,
        help="the base model: a local model directory, or a preset built from its config",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of a preset's random weights (0)")
    p.add_argument(
        "--model-class",
        default=None,
        help="transformers class, e.g. AutoModelForSequenceClassification (default: the "
        "config's architectures[0], AutoModel for presets)",
    )
    p.add_argument(
        "--rank",
        type=int,
        default=None,
        help="peft-lora: cap every LoRA at this rank (truncated SVD where needed, error reported)",
    )
    p.set_defaults(func=cmd_export)


COMMANDS.append(add_export)


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
