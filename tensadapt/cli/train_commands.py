"""Training commands: ``train``, ``sweep``, ``demo`` (data and training flags shared)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from ..train.options import arg_type
from .adapter_commands import add_enumerate_options, enumeration
from .base import UsageError, encoding, existing_file

if TYPE_CHECKING:
    from ..train.data import DataOptions
    from ..train.options import TrainOptions
    from ..train.tuning import TuneOptions


def _add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        required=True,
        metavar="TRAIN",
        help="training data: .tsv/.csv/.jsonl with a text and an integer label column "
        "(classification), a .txt file (causal LM), or hf:NAME[:CONFIG][@SPLIT] (needs the "
        "[hf] extra and the hub)",
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
        "--encoding",
        type=encoding,
        default="utf-8",
        help="text encoding of the data files (default utf-8; a byte-order mark is skipped)",
    )
    g.add_argument(
        "--max-length",
        type=arg_type("max_length"),
        default=None,
        help="tokens per example/block (default: the spec's training: max_length, else 128)",
    )
    g.add_argument(
        "--max-train",
        type=arg_type("max_train"),
        default=None,
        help="use the first N training rows",
    )
    g.add_argument(
        "--max-eval",
        type=arg_type("max_eval"),
        default=None,
        help="use the first N evaluation rows",
    )


def _add_train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "training (transformers Trainer)",
        "A spec's training: section (lr, head_lr, schedule, warmup_ratio, epochs, batch_size, "
        "weight_decay, max_length) is the recipe of its runs; each flag given overrides one key "
        "of it, and a key neither gives takes the default shown. metrics.json records the "
        "effective recipe and where each value came from.",
    )
    g.add_argument(
        "--epochs",
        type=arg_type("epochs"),
        default=None,
        help="passes over the data (default 1)",
    )
    g.add_argument(
        "--max-steps",
        type=arg_type("max_steps"),
        default=None,
        help="optimizer steps; overrides --epochs",
    )
    g.add_argument(
        "--batch-size",
        type=arg_type("batch_size"),
        default=None,
        help="examples per step (default 16)",
    )
    g.add_argument(
        "--grad-accum", type=arg_type("grad_accum"), default=1, help="gradient accumulation steps"
    )
    g.add_argument(
        "--lr",
        type=arg_type("lr"),
        default=None,
        help="peak learning rate of the adapter (default 1e-3, at most 1)",
    )
    g.add_argument(
        "--head-lr",
        type=arg_type("head_lr"),
        default=None,
        help="peak learning rate of the modules trained in full: a new classification head, "
        "modules_to_save (default: --lr)",
    )
    g.add_argument(
        "--schedule",
        choices=("linear", "cosine", "constant"),
        default=None,
        help="learning-rate decay after the warm-up (default linear)",
    )
    g.add_argument(
        "--warmup-ratio",
        type=arg_type("warmup_ratio"),
        default=None,
        help="share of the steps spent warming up (default 0.06)",
    )
    g.add_argument(
        "--weight-decay",
        type=arg_type("weight_decay"),
        default=None,
        help="AdamW weight decay of the adapter (default 0)",
    )
    g.add_argument(
        "--head-weight-decay",
        type=arg_type("head_weight_decay"),
        default=None,
        help="AdamW weight decay of the modules trained in full (default: --weight-decay)",
    )
    g.add_argument(
        "--mixed-precision", choices=("no", "bf16", "fp16"), default="no", help="(fp16: GPU only)"
    )
    g.add_argument("--threads", type=arg_type("threads"), default=None, help="torch CPU threads")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _data_options(args: argparse.Namespace, max_length: int | None = None) -> DataOptions:
    """The data options; examples are tokenised at ``--max-length``, else ``max_length`` (a
    spec's), else 128."""
    from ..train.data import DataOptions

    return DataOptions(
        text_column=args.text_column,
        label_column=args.label_column,
        task=args.task,
        max_length=args.max_length or max_length or 128,
        max_train=args.max_train,
        max_eval=args.max_eval,
        encoding=args.encoding,
    )


def _train_options(args: argparse.Namespace, seed: int = 0) -> TrainOptions:
    from ..train.options import TrainOptions

    return TrainOptions(  # None: not given (the spec's training: value or the default)
        save_steps=getattr(args, "save_steps", None),
        save_total_limit=getattr(args, "save_total_limit", None),
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        head_lr=args.head_lr,
        schedule=args.schedule,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        head_weight_decay=args.head_weight_decay,
        max_length=args.max_length,
        seed=seed,
        mixed_precision=args.mixed_precision,
        threads=args.threads,
        progress=not args.no_progress,
    )


def add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="SPEC", help="spec YAML file")
    p.add_argument(
        "--model", "-m", required=True, help="preset name or local model directory (no downloads)"
    )
    _add_data_options(p)
    _add_train_options(p)
    p.add_argument(
        "--seed", type=arg_type("seed"), default=0, help="seed of weights, adapter init, data order"
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="write the adapter, spec and metrics.json here (new, empty, or an earlier run's)",
    )
    g = p.add_argument_group("checkpoints")
    g.add_argument(
        "--save-steps",
        type=arg_type("save_steps"),
        default=None,
        metavar="N",
        help="every N optimizer steps write OUT/checkpoints/checkpoint-<step>: the adapter, "
        "optimizer, scheduler and RNG states (adapter-sized; needs --out)",
    )
    g.add_argument(
        "--save-total-limit",
        type=arg_type("save_total_limit"),
        default=None,
        metavar="K",
        help="keep only the last K checkpoints",
    )
    g.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="DIR",
        help="continue a stopped run: from the latest complete checkpoint in OUT/checkpoints, or "
        "from checkpoint DIR; give the same spec, data, seed and flags. The result equals an "
        "uninterrupted run's",
    )
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")


def run_train(args: argparse.Namespace) -> int:
    from ..spec import load_spec
    from ..train.checkpoints import resume_checkpoint
    from ..train.encode import prepare
    from ..train.outdir import RUN_FILES, check_output_dir
    from ..train.recipe import resolve_recipe
    from ..train.trainer import check_device, check_spec_dependencies, train

    spec = load_spec(existing_file(args.spec))
    check_spec_dependencies(spec)
    opts = _train_options(args, args.seed)
    data_opts = _data_options(args, spec.training.max_length if spec.training else None)
    check_device(opts)
    resolve_recipe(opts, spec)  # a spec value the options refuse (weight_decay: 5) stops here
    out = None
    if args.out is not None:
        out = check_output_dir(args.out, RUN_FILES)  # before reading data; claimed before building
    if opts.save_steps and out is None:
        raise UsageError("--save-steps needs --out (where the checkpoints go)")
    checkpoint = resume_checkpoint(args.resume, out) if args.resume is not None else None
    # a resumed run tokenises as the first did: a preset's tokenizer is kept in its checkpoints
    prepared = prepare(args.model, args.data, args.eval, data_opts, tokenizer_from=checkpoint)
    print(f"tokenizer: {prepared.tokenizer_source}")
    metrics = train(spec, prepared, opts, out=args.out, resume=checkpoint)
    if args.out:
        print(f"wrote the adapter, resolved spec and metrics.json to {args.out}")
    if args.json:
        print(json.dumps(metrics, indent=2))
    return 0


def add_sweep(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", "-m", required=True, help="preset name or local model directory (no downloads)"
    )
    _add_data_options(p)
    add_enumerate_options(p)
    p.add_argument("--specs", metavar="DIR", default=None, help="train the *.yaml specs in DIR")
    p.add_argument(
        "--seeds", type=arg_type("seeds"), default=3, help="seeds per configuration (0..N-1)"
    )
    _add_train_options(p)
    _add_tune_options(p)
    p.add_argument(
        "--out", metavar="DIR", required=True, help="sweep directory (new, empty, or a sweep's)"
    )


def _add_tune_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "tuning (--tune-lr; needs optuna: pip install 'tensadapt[tune]')",
        "Each configuration's learning rate (and with --tune-scale its update scale alpha/rank) "
        "is searched by an Optuna study on a validation part carved from the TRAINING data "
        "(never --eval); then every seed trains on the whole training data at the best values "
        "and is evaluated on --eval. Run the same command in several processes (or machines "
        "sharing --out and --storage) to share the work: no trial and no run is done twice.",
    )
    g.add_argument(
        "--tune-lr", action="store_true", help="tune the learning rate of every configuration"
    )
    g.add_argument(
        "--tune-scale",
        action="store_true",
        help="also tune the update scale (the spec's alpha becomes scale x its largest rank)",
    )
    g.add_argument(
        "--trials",
        type=arg_type("trials"),
        default=None,
        help="finished trials per configuration (default 12; a diverged trial counts)",
    )
    g.add_argument(
        "--lr-min", type=arg_type("lr_min"), default=None, help="lowest learning rate (1e-5)"
    )
    g.add_argument(
        "--lr-max", type=arg_type("lr_max"), default=None, help="highest learning rate (1e-1)"
    )
    g.add_argument(
        "--scale-min", type=arg_type("scale_min"), default=None, help="lowest scale (0.1)"
    )
    g.add_argument(
        "--scale-max", type=arg_type("scale_max"), default=None, help="highest scale (10)"
    )
    g.add_argument(
        "--val-fraction",
        type=arg_type("val_fraction"),
        default=None,
        help="share of the training examples held out to score trials, per class (0.1)",
    )
    g.add_argument(
        "--tune-seed",
        type=arg_type("tune_seed"),
        default=None,
        help="seed of the validation split, the trials' training and the sampler (0)",
    )
    g.add_argument(
        "--tune-metric",
        choices=("auto", "accuracy", "loss"),
        default=None,
        help="trial objective: validation accuracy (maximised) or loss (minimised); auto "
        "(default): accuracy for classification, loss for causal LM",
    )
    g.add_argument(
        "--storage",
        metavar="URL",
        default=None,
        help="Optuna storage shared by workers on several machines: a database URL "
        "(postgresql://user@host/db, mysql://..., sqlite:///file.db) or a journal file path; "
        "default: OUT/tuning.journal (several processes on one machine or NFS)",
    )
    g.add_argument(
        "--study-prefix",
        default=None,
        metavar="TEXT",
        help="prefix of the studies' names (each is named after its configuration)",
    )


#: dest of each tuning flag -> the TuneOptions field it sets
_TUNE_FLAGS = {
    "tune_scale": "tune_scale",
    "trials": "trials",
    "lr_min": "lr_min",
    "lr_max": "lr_max",
    "scale_min": "scale_min",
    "scale_max": "scale_max",
    "val_fraction": "val_fraction",
    "tune_seed": "tune_seed",
    "tune_metric": "metric",
    "storage": "storage",
    "study_prefix": "study_prefix",
}


def _tune_options(args: argparse.Namespace) -> TuneOptions | None:
    """The TuneOptions of ``--tune-lr`` (``None`` without it); tuning flags without it are refused."""
    given = {
        f: getattr(args, d) for d, f in _TUNE_FLAGS.items() if getattr(args, d) not in (None, False)
    }
    if not args.tune_lr:
        if given:
            flags = ", ".join(
                "--" + d.replace("_", "-") for d, f in _TUNE_FLAGS.items() if f in given
            )
            raise UsageError(f"sweep: {flags} tune(s) the learning rate: add --tune-lr")
        return None
    from ..deps import require
    from ..train.tuning import TuneOptions

    require("optuna", "sweep --tune-lr")
    return TuneOptions(**given)


def run_sweep(args: argparse.Namespace) -> int:
    from ..enumerate import load_rows_from_dir
    from ..train.encode import prepare
    from ..train.outdir import SWEEP_FILES, check_output_dir
    from ..train.recipe import resolve_recipe
    from ..train.sweeps import sweep
    from ..train.trainer import check_device, check_spec_dependencies

    if args.specs:
        if args.rank or args.budget_of or args.params or args.cap_ranks or args.factorizations:
            raise UsageError("sweep: give either --specs DIR or enumerate options, not both")
        specs = load_rows_from_dir(args.specs)
    else:
        specs = [(r.name, r.spec) for r in enumeration(args).rows]
    tune = _tune_options(args)
    opts, data_opts = _train_options(args), _data_options(args)
    for _, one in specs:
        check_spec_dependencies(one)
        resolve_recipe(opts, one)  # a spec value the options refuse stops here, by name
    check_device(opts)
    root = check_output_dir(args.out, SWEEP_FILES)
    # a preset's tokenizer is trained once and kept: the sweep's workers and resumes share it
    prepared = prepare(
        args.model, args.data, args.eval, data_opts, tokenizer_dir=root / "tokenizer"
    )
    print(
        f"sweep: {len(specs)} configuration(s) x {args.seeds} seed(s) on {args.model}; "
        f"tokenizer: {prepared.tokenizer_source}"
    )
    res = sweep(specs, prepared, args.out, seeds=range(args.seeds), opts=opts, tune=tune)
    for s in res.summary:
        lr = f"  lr {float(s['lr']):.3g}" if s.get("lr") not in (None, "") else ""
        scale = f" scale {float(s['scale']):.3g}" if tune and tune.tune_scale else ""
        print(
            f"  {s['spec']:<28} {s['params']:>10,}  {s['metric']} {s['mean']:.4f} "
            f"± {s['std']:.4f} (n={s['n']}){lr}{scale}"
        )
    if res.pareto_png:
        print(f"plot: {res.pareto_png}")
    if res.failed:
        print(f"tensadapt: {len(res.failed)} run(s) failed:", file=sys.stderr)
        for run, why in res.failed:
            print(f"  - {run}: {why}", file=sys.stderr)
        return 2
    return 0


def add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--steps", type=arg_type("steps"), default=60, help="training steps (default 60)"
    )
    p.add_argument("--seed", type=arg_type("seed"), default=0, help="seed (default 0)")
    p.add_argument("--threads", type=arg_type("threads"), default=None, help="torch CPU threads")


def run_demo(args: argparse.Namespace) -> int:
    from ..train.demo import run_demo as demo

    demo(steps=args.steps, seed=args.seed, threads=args.threads)
    return 0


#: every command, in ``--help`` order: the one table the parser is built from
