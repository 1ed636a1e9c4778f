"""The ``tensadapt`` command line.

Every command exits 0 on success, 2 on a user mistake (with a message naming the flag, the field,
the file or the mismatch, never a traceback), 1 on an error of the environment (a full disk: one
line) or an unexpected internal error (a traceback), 141 when its output pipe is closed early
(``tensadapt plan ... | head``: quietly, as Unix tools do), 130 when interrupted.

The commands are one table, :data:`COMMANDS`: each :class:`Command` has a name, a function adding
its arguments, a function running it, and whether it needs torch. The functions live in
``spec_commands`` (validate, schema, plan, plugins), ``adapter_commands`` (enumerate, export) and
``train_commands`` (train, sweep, demo); to add a command, write its two functions there and add
one row to the table. Heavy modules are imported inside the run functions, so ``--help``, ``validate`` and ``schema`` import neither torch nor transformers.
Numeric flags are parsed by ``type=`` functions built from
:data:`tensadapt.train.options.BOUNDS`: an out-of-range value is refused by name before any file
is read or any model built.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import SpecError, TensadaptError
from .adapter_commands import (
    add_enumerate,
    add_export,
    add_import,
    run_enumerate,
    run_export,
    run_import,
)
from .base import UsageError
from .spec_commands import (
    add_plan,
    add_plugins,
    add_schema,
    add_validate,
    run_plan,
    run_plugins,
    run_schema,
    run_validate,
)
from .train_commands import add_demo, add_sweep, add_train, run_demo, run_sweep, run_train

EPILOG = """\
examples:
  tensadapt validate specs/*.yaml
  tensadapt plan specs/lorta.yaml --model roberta-base
  tensadapt plan specs/tenslora-qkv-depth.yaml --model llama3-8b --json
  tensadapt schema > tensadapt.schema.json

Models (--model): a bundled preset (tensadapt plan --list-models) or a local model/config
directory. Planning reads only the config: no weights are loaded.
"""

#: exit status when stdout is a pipe closed by its reader (128 + SIGPIPE, like a Unix tool)
EXIT_BROKEN_PIPE = 141


@dataclass(frozen=True)
class Command:
    """One ``tensadapt`` command.

    Attributes:
        name: the subcommand.
        add_arguments: adds its arguments to its parser.
        run: runs it; returns the exit status.
        help: one line for ``tensadapt --help``.
        description: its own ``--help`` text.
        epilog: examples, shown verbatim.
        needs_torch: whether running it imports torch (``validate`` and ``schema`` do not).
    """

    name: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    help: str
    description: str
    epilog: str = ""
    needs_torch: bool = True


COMMANDS: tuple[Command, ...] = (
    Command(
        "validate",
        add_validate,
        run_validate,
        help="check spec files; exit 0 when all are valid, 2 otherwise",
        description="Check one or more spec YAML files and print every problem with its path "
        "(e.g. 'rank.qkv: must be >= 1'). Exit 0 when all are valid, 2 otherwise.",
        needs_torch=False,
    ),
    Command(
        "schema",
        add_schema,
        run_schema,
        help="print the spec's JSON Schema (for editor completion)",
        description="Print the JSON Schema of adapter specs; point your editor's YAML language "
        "server at it for completion and inline docs.",
        needs_torch=False,
    ),
    Command(
        "plan",
        add_plan,
        run_plan,
        help="compile a spec against a model's architecture and print the plan",
        description="Compile SPEC against a model's architecture (config only, no weights) and "
        "print every tensor's axes and factor shapes, the parameter count, its ratio to LoRA and "
        "the adapter FLOPs per token.",
    ),
    Command(
        "plugins",
        add_plugins,
        run_plugins,
        help="list registered factorizations, architectures and initialisers",
        description="List every registered factorization, architecture (model family) and "
        "initialiser with the distribution and version that provided it, then any plugin that "
        "was disabled or left out because it failed (and why).",
    ),
    Command(
        "export",
        add_export,
        run_export,
        help="export a saved adapter as a PEFT LoRA adapter or as merged full weights",
        description="Rebuild the base model, load the adapter from ADAPTER_DIR and write it as a "
        "standard PEFT LoRA adapter (--to peft-lora; exact for lora/cp/tucker/tt, a truncated "
        "SVD at --rank with the error reported for mpo) or as merged full weights "
        "(--to merged; safetensors, loadable with from_pretrained). The base model must be the "
        "one the adapter was trained on: the same local weights, or the same preset and --seed.",
    ),
    Command(
        "enumerate",
        add_enumerate,
        run_enumerate,
        help="list every TensLoRA configuration (mode subset x factorization) with its cost",
        description="Every subset of the stacking modes {heads, qkv, depth} (none = per-matrix) "
        "x every factorization, with ranks by one policy: isorank (--rank R, optionally "
        "--cap-ranks) or isoparameters (--budget-of lora:R or --params N; per-axis ranks by the "
        "level-then-fill rule of tensadapt.enumerate, never above an axis size, always within "
        "the budget). Columns: modes, factorization, ranks, trainable parameters, %% of the "
        "model, ratio to LoRA, adapter FLOPs per token. Reads the config only: no weights.",
        epilog="examples:\n"
        "  tensadapt enumerate --model roberta-base --rank 8\n"
        "  tensadapt enumerate --model roberta-base --rank 8 --targets q,k,v,o --json\n"
        "  tensadapt enumerate --model llama3-8b --budget-of lora:8 --factorizations cp,tucker\n"
        "  tensadapt enumerate --model minilm --params 20000 --out specs/sweep/",
    ),
    Command(
        "import",
        add_import,
        run_import,
        help="convert a checkpoint of the papers' released code into a tensadapt adapter",
        description="Convert an adapter saved by another project's code into a tensadapt adapter "
        "directory (adapter_config.json + adapter.safetensors) that computes the same function. "
        "lorta-peft: the LoRTA authors' PEFT fork (adapter_config.json with peft_type LORTA, "
        "adapter_model.safetensors with lora_A, lora_B, lora_C_h, lora_C_m, lora_C_l and the "
        "classifier): the CP factors become a tensadapt cp spec over heads, qkv and depth with "
        "orientation lorta, the classifier is kept. A foreign or malformed checkpoint, or one "
        "made for another base model, stops with exit 2 and a message naming the file.",
        epilog="examples:\n"
        "  tensadapt import lorta-peft runs/lorta-sst2/ --model path/to/roberta-base \\\n"
        "      --out adapters/lorta-sst2\n"
        "  tensadapt export adapters/lorta-sst2 --model path/to/roberta-base --to merged -o merged/",
    ),
    Command(
        "train",
        add_train,
        run_train,
        help="fine-tune one adapter (sequence classification or causal LM) and evaluate it",
        description="Put SPEC's adapter on the model (TensadaptModel), train it with the "
        "transformers Trainer (progress bar with loss and tokens/s) and evaluate accuracy and "
        "loss on --eval. The spec's training: section is the recipe; each training flag given "
        "overrides one key. --save-steps keeps checkpoints, --resume continues from one. --model "
        "is a local model directory (its own weights and tokenizer) or a preset (random weights "
        "from the config, with a WordPiece/BPE tokenizer trained on the training texts). Flags, "
        "--out and the data are checked before anything is built: a missing file or column, a "
        "malformed row, a label that is not an integer stops with a message naming the file, "
        "line and column. A loss that turns non-finite or explodes (10x its start) stops the run "
        "by name and saves no adapter (see tensadapt.numerics.DivergenceCallback).",
        epilog="examples:\n"
        "  tensadapt train specs/tenslora-qkv-depth.yaml --model minilm \\\n"
        "      --data ../shared/data/sst2/train.tsv --eval ../shared/data/sst2/dev.tsv \\\n"
        "      --max-train 2000 --max-steps 100 --out runs/qkv-depth\n"
        "  tensadapt train specs/lorta.yaml --model path/to/local/model --data corpus.txt\n"
        "\n"
        "  # checkpoints every 500 steps (adapter-sized), then continue after a crash:\n"
        "  tensadapt train specs/papers/lorta-glue-roberta-base-sst2.yaml --model path/to/roberta-base \\\n"
        "      --data train.tsv --eval dev.tsv --save-steps 500 --out runs/lorta\n"
        "  tensadapt train specs/papers/lorta-glue-roberta-base-sst2.yaml --model path/to/roberta-base \\\n"
        "      --data train.tsv --eval dev.tsv --save-steps 500 --out runs/lorta --resume\n"
        "\n"
        "  # the spec's training: recipe, with one key overridden:\n"
        "  tensadapt train specs/papers/tenslora-qkv-depth.yaml --model minilm \\\n"
        "      --data train.tsv --lr 5e-4",
    ),
    Command(
        "sweep",
        add_sweep,
        run_sweep,
        help="train many configurations x seeds: results.csv and a Pareto plot (resumable)",
        description="Train every enumerated configuration (enumerate options) or every spec in "
        "--specs DIR, with --seeds seeds each, into OUT/runs/<spec>/seed<k>/. A run whose "
        "metrics.json exists is skipped, so re-running an interrupted sweep resumes it; a run "
        "that diverged is reported (failed.json), left out of the results and not retried. "
        "Writes OUT/results.csv (spec, params, lr, scale, seed, metric, time, ...) and "
        "OUT/pareto.png (metric vs trainable parameters, log x, Pareto front marked, LoRA "
        "highlighted, each point labelled with its learning rate). With --tune-lr each "
        "configuration's learning rate is tuned first (see the tuning options; every trial in "
        "OUT/tuning.csv). Exit 2 when a run failed.",
        epilog="examples:\n"
        "  tensadapt sweep --model minilm --data ../shared/data/sst2/train.tsv \\\n"
        "      --eval ../shared/data/sst2/dev.tsv --max-train 2000 --max-steps 100 \\\n"
        "      --rank 8 --factorizations lora,cp,tucker --seeds 3 --out sweeps/minilm\n"
        "\n"
        "  # tune each configuration's learning rate (12 trials on 10 %% of the training data),\n"
        "  # then 3 seeds at the tuned rate; start the same command in more terminals to help:\n"
        "  tensadapt sweep --specs specs/sweep/ --model path/to/minilm \\\n"
        "      --data ../shared/data/sst2/train.tsv --eval ../shared/data/sst2/dev.tsv \\\n"
        "      --epochs 2 --tune-lr --trials 12 --seeds 3 --out sweeps/tuned\n"
        "\n"
        "  # many machines: one database for the studies, --out on a shared file system\n"
        "  tensadapt sweep ... --tune-lr --tune-scale --storage postgresql://me@db/optuna \\\n"
        "      --out /nfs/sweeps/tuned",
    ),
    Command(
        "demo",
        add_demo,
        run_demo,
        help="the main job: plan, enumerate and a short training run (no downloads, ~1 min)",
        description="Print a plan table (Tucker over [qkv, depth] on the minilm preset), a short "
        "enumerate table, then train that adapter for a few tens of steps on a minilm-shaped "
        "BERT built from its config (random weights) with a WordPiece tokenizer trained on the "
        "fly, on SST-2 from ../shared/data/sst2 when present (else a small built-in synthetic "
        "sentiment set), printing the loss and the dev accuracy. No downloads.",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tensadapt",
        description="Tensor-factorized parameter-efficient fine-tuning: write a YAML spec, plan it "
        "against a model, inject, train, merge.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
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
    for c in COMMANDS:
        p = sub.add_parser(
            c.name,
            allow_abbrev=False,  # `sweep --seed 0` must not mean `--seeds 0`
            help=c.help,
            description=c.description,
            epilog=c.epilog or None,
            formatter_class=argparse.RawDescriptionHelpFormatter
            if c.epilog
            else argparse.HelpFormatter,
        )
        c.add_arguments(p)
        p.set_defaults(command=c)
    return parser


def _quiet_stdout() -> None:
    """Point stdout at /dev/null after its reader went away, so the exit flush cannot fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # stdout replaced (tests) or already closed
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``tensadapt`` command; return its exit status (see the module docstring)."""
    try:
        code = _run(argv)
        sys.stdout.flush()  # a closed pipe is found here, not in the interpreter's exit flush
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a refused flag (2, argparse printed which)
        return e.code if isinstance(e.code, int) else 2
    command: Command | None = getattr(args, "command", None)
    if command is None:
        parser.print_help()
        return 2
    try:
        if args.disable_plugin:
            from ..plugins import disable

            disable(args.disable_plugin)
        return int(command.run(args) or 0)
    except SpecError as e:
        print(str(e), file=sys.stderr)
        return 2
    except TensadaptError as e:
        print(f"tensadapt: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        print(f"tensadapt: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise  # handled by main
    except OSError as e:  # a full disk, a read-only file system: the environment, not a bug
        where = f": {e.filename}" if e.filename else ""
        print(f"tensadapt: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


__all__ = ["COMMANDS", "EXIT_BROKEN_PIPE", "Command", "UsageError", "build_parser", "main"]
