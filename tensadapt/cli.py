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


# -- plugins -------------------------------------------------------------------------------
def cmd_plugins(args: argparse.Namespace) -> int:
    from . import plugins

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


def add_plugins(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plugins",
        help="list registered factorizations, architectures and initialisers",
        description="List every registered factorization, architecture (model family) and "
        "initialiser with the distribution and version that provided it, then any plugin that "
        "was disabled or left out because it failed (and why).",
    )
    p.add_argument(
        "--json", action="store_true", help="print entries, plugins and failures as JSON"
    )
    p.set_defaults(func=cmd_plugins)


COMMANDS.append(add_plugins)


# -- export --------------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_merged, export_peft_lora, load_base_model
    from .io import load_adapter, read_plan_file

    src = Path(args.adapter)
    if not src.exists():
        raise UsageError(f"{args.adapter}: no such adapter directory")
    if not src.is_dir():
        raise UsageError(f"{args.adapter}: is a file, expected an adapter directory")
    saved = read_plan_file(src)  # default to the head the adapter was trained with
    model_class = args.model_class or saved.get("model_class")
    num_labels = saved.get("num_labels") if model_class == saved.get("model_class") else None
    model = load_base_model(
        args.model, seed=args.seed, model_class=model_class, num_labels=num_labels
    )
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


# -- enumerate / train / sweep / demo (tensadapt.enumerate, tensadapt.train) ---------------
def _csv_list(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _enumeration(args: argparse.Namespace) -> object:
    from .enumerate import enumerate_configs

    return enumerate_configs(
        args.model,
        rank=args.rank,
        cap_ranks=args.cap_ranks,
        budget=args.params,
        budget_of=args.budget_of,
        targets=_csv_list(args.targets) or ("q", "k", "v"),
        factorizations=_csv_list(args.factorizations),
    )


def cmd_enumerate(args: argparse.Namespace) -> int:
    from .enumerate import Enumeration

    e = _enumeration(args)
    assert isinstance(e, Enumeration)
    print(e.to_json() if args.json else str(e))
    if args.out:
        paths = e.write_specs(args.out)
        print(f"wrote {len(paths)} spec(s) to {args.out}", file=sys.stderr if args.json else None)
    return 0


def _add_enumerate_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("which configurations (as tensadapt enumerate)")
    g.add_argument(
        "--rank",
        type=int,
        default=None,
        metavar="R",
        help="isorank: R on every axis, as TensLoRA counts it (default policy, R = 8)",
    )
    g.add_argument(
        "--cap-ranks",
        action="store_true",
        help="isorank: cap each per-axis rank at its axis size (qkv = 3, ...)",
    )
    g.add_argument(
        "--budget-of",
        metavar="lora:R",
        default=None,
        help="isoparameters: largest ranks within the parameter count of LoRA at rank R",
    )
    g.add_argument(
        "--params",
        type=int,
        default=None,
        metavar="N",
        help="isoparameters: largest ranks within N trainable parameters",
    )
    g.add_argument(
        "--targets",
        default="q,k,v",
        metavar="LIST",
        help="projections to adapt, comma-separated (default q,k,v; e.g. q,k,v,o)",
    )
    g.add_argument(
        "--factorizations",
        default=None,
        metavar="LIST",
        help="factorizations to enumerate, comma-separated (default: every registered one, "
        "plugins included; see tensadapt plugins)",
    )


def add_enumerate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "enumerate",
        help="list every TensLoRA configuration (mode subset x factorization) with its cost",
        description="Every subset of the stacking modes {heads, qkv, depth} (none = per-matrix) x "
        "every factorization, with ranks by one policy: isorank (--rank R, optionally "
        "--cap-ranks) or isoparameters (--budget-of lora:R or --params N; per-axis ranks by the "
        "level-then-fill rule of tensadapt.enumerate, never above an axis size, always within "
        "the budget). Columns: modes, factorization, ranks, trainable parameters, %% of the "
        "model, ratio to LoRA, adapter FLOPs per token. Reads the config only: no weights.",
        epilog="examples:\n"
        "  tensadapt enumerate --model roberta-base --rank 8\n"
        "  tensadapt enumerate --model roberta-base --rank 8 --targets q,k,v,o --json\n"
        "  tensadapt enumerate --model llama3-8b --budget-of lora:8 --factorizations cp,tucker\n"
        "  tensadapt enumerate --model minilm --params 20000 --out specs/sweep/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        "-m",
        default="roberta-base",
        help="preset name or local model/config path (default: roberta-base)",
    )
    _add_enumerate_options(p)
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="write one spec YAML per row to DIR (tensadapt validate accepts each)",
    )
    p.set_defaults(func=cmd_enumerate)


def _add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        required=True,
        metavar="TRAIN",
        help="training data: .tsv/.csv/.jsonl with a text and an integer label column "
        "(classification), a .txt file (causal LM), or hf:NAME[:CONFIG][@SPLIT] (needs the hub)",
    )
    g.add_argument("--eval", metavar="DEV", default=None, help="evaluation data, same format")
    g.add_argument("--text-column", default="sentence", help="text column (default: sentence)")
    g.add_argument("--label-column", default="label", help="label column (default: label)")
    g.add_argument(
        "--task",
        choices=("auto", "classification", "causal-lm"),
        default="auto",
        help="auto (default): a .txt file is causal LM, anything else classification",
    )
    g.add_argument(
        "--max-length", type=int, default=128, help="tokens per example/block (default 128)"
    )
    g.add_argument("--max-train", type=int, default=None, help="use the first N training rows")
    g.add_argument("--max-eval", type=int, default=None, help="use the first N evaluation rows")


def _add_train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (transformers Trainer)")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default 1)")
    g.add_argument(
        "--max-steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0"
    )
    g.add_argument("--batch-size", type=int, default=16, help="examples per step (default 16)")
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument(
        "--mixed-precision", choices=("no", "bf16", "fp16"), default="no", help="(fp16: GPU only)"
    )
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _data_options(args: argparse.Namespace) -> object:
    from .train import DataOptions

    return DataOptions(
        text_column=args.text_column,
        label_column=args.label_column,
        task=args.task,
        max_length=args.max_length,
        max_train=args.max_train,
        max_eval=args.max_eval,
    )


def _train_options(args: argparse.Namespace, seed: int = 0) -> object:
    from .train import TrainOptions

    return TrainOptions(
        epochs=args.epochs,
        max_steps=args.max_steps if args.max_steps > 0 else None,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=seed,
        mixed_precision=args.mixed_precision,
        threads=args.threads,
        progress=not args.no_progress,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from .spec import load_spec
    from .train import prepare, train

    spec = load_spec(_existing_file(args.spec))
    prepared = prepare(args.model, args.data, args.eval, _data_options(args))  # type: ignore[arg-type]
    print(f"tokenizer: {prepared.tokenizer_source}")
    metrics = train(spec, prepared, _train_options(args, args.seed), out=args.out)  # type: ignore[arg-type]
    if args.out:
        print(f"wrote the adapter, resolved spec and metrics.json to {args.out}")
    if args.json:
        print(json.dumps(metrics, indent=2))
    return 0


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune one adapter (sequence classification or causal LM) and evaluate it",
        description="Inject SPEC into the model, train it with the transformers Trainer (progress "
        "bar with loss and tokens/s) and evaluate accuracy and loss on --eval. --model is a "
        "local model directory (its own weights and tokenizer) or a preset (random weights from "
        "the config, with a WordPiece/BPE tokenizer trained on the training texts). The data is "
        "checked before anything is built: a missing file or column, an empty file or a label "
        "that is not an integer stops with a message naming the file, line and column.",
        epilog="examples:\n"
        "  tensadapt train specs/tenslora-qkv-depth.yaml --model minilm \\\n"
        "      --data ../shared/data/sst2/train.tsv --eval ../shared/data/sst2/dev.tsv \\\n"
        "      --max-train 2000 --max-steps 100 --out runs/qkv-depth\n"
        "  tensadapt train specs/lorta.yaml --model path/to/local/model --data corpus.txt",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", metavar="SPEC", help="spec YAML file")
    p.add_argument(
        "--model", "-m", required=True, help="preset name or local model directory (no downloads)"
    )
    _add_data_options(p)
    _add_train_options(p)
    p.add_argument("--seed", type=int, default=0, help="seed of weights, adapter init, data order")
    p.add_argument(
        "--out", metavar="DIR", default=None, help="write the adapter, spec and metrics.json here"
    )
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=cmd_train)


def cmd_sweep(args: argparse.Namespace) -> int:
    from .enumerate import Enumeration, load_rows_from_dir
    from .train import prepare, sweep

    if args.specs:
        if args.rank or args.budget_of or args.params or args.cap_ranks or args.factorizations:
            raise UsageError("sweep: give either --specs DIR or enumerate options, not both")
        specs = load_rows_from_dir(args.specs)
    else:
        e = _enumeration(args)
        assert isinstance(e, Enumeration)
        specs = [(r.name, r.spec) for r in e.rows]
    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    prepared = prepare(args.model, args.data, args.eval, _data_options(args))  # type: ignore[arg-type]
    print(
        f"sweep: {len(specs)} configuration(s) x {args.seeds} seed(s) on {args.model}; "
        f"tokenizer: {prepared.tokenizer_source}"
    )
    res = sweep(
        specs,
        prepared,
        args.out,
        seeds=range(args.seeds),
        opts=_train_options(args),  # type: ignore[arg-type]
    )
    for s in res.summary:
        print(
            f"  {s['spec']:<28} {s['params']:>10,}  {s['metric']} {s['mean']:.4f} "
            f"± {s['std']:.4f} (n={s['n']})"
        )
    if res.pareto_png:
        print(f"plot: {res.pareto_png}")
    return 0


def add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="train many configurations x seeds: results.csv and a Pareto plot (resumable)",
        description="Train every enumerated configuration (enumerate options) or every spec in "
        "--specs DIR, with --seeds seeds each, into OUT/runs/<spec>/seed<k>/. A run whose "
        "metrics.json exists is skipped, so re-running an interrupted sweep resumes it. Writes "
        "OUT/results.csv (spec, params, seed, metric, time, ...) and OUT/pareto.png (metric vs "
        "trainable parameters, log x, Pareto front marked, LoRA highlighted).",
        epilog="example:\n"
        "  tensadapt sweep --model minilm --data ../shared/data/sst2/train.tsv \\\n"
        "      --eval ../shared/data/sst2/dev.tsv --max-train 2000 --max-steps 100 \\\n"
        "      --rank 8 --factorizations lora,cp,tucker --seeds 3 --out sweeps/minilm",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", "-m", required=True, help="preset name or local model directory (no downloads)"
    )
    _add_data_options(p)
    _add_enumerate_options(p)
    p.add_argument("--specs", metavar="DIR", default=None, help="train the *.yaml specs in DIR")
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration (0..N-1)")
    _add_train_options(p)
    p.add_argument("--out", metavar="DIR", required=True, help="sweep directory")
    p.set_defaults(func=cmd_sweep)


def cmd_demo(args: argparse.Namespace) -> int:
    from .train import run_demo

    run_demo(steps=args.steps, seed=args.seed, threads=args.threads)
    return 0


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: plan, enumerate and a short training run (no downloads, ~1 min)",
        description="Print a plan table (Tucker over [qkv, depth] on the minilm preset), a short "
        "enumerate table, then train that adapter for a few tens of steps on a minilm-shaped "
        "BERT built from its config (random weights) with a WordPiece tokenizer trained on the "
        "fly, on SST-2 from ../shared/data/sst2 when present (else a small built-in synthetic "
        "sentiment set), printing the loss and the dev accuracy. No downloads.",
    )
    p.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=cmd_demo)


COMMANDS.extend([add_enumerate, add_train, add_sweep, add_demo])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tensadapt",
        description="Tensor-factorized parameter-efficient fine-tuning: write a YAML spec, plan it "
        "against a model, inject, train, merge.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--disable-plugin",
        action="append",
        default=[],
        metavar="NAME",
        help="leave out a plugin (entry-point or distribution name); repeatable; also "
        "TENSADAPT_DISABLE_PLUGINS=a,b",
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
    if getattr(args, "disable_plugin", None):
        from .plugins import disable

        disable(args.disable_plugin)
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
