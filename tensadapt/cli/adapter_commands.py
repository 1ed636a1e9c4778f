"""Commands on adapter configurations and saved adapters: ``enumerate``, ``export``."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..train.options import arg_type
from .base import UsageError, not_a_file

if TYPE_CHECKING:
    from ..enumerate import Enumeration


def csv_list(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def enumeration(args: argparse.Namespace) -> Enumeration:
    from ..enumerate import enumerate_configs

    return enumerate_configs(
        args.model,
        rank=args.rank,
        cap_ranks=args.cap_ranks,
        budget=args.params,
        budget_of=args.budget_of,
        targets=csv_list(args.targets) or ("q", "k", "v"),
        factorizations=csv_list(args.factorizations),
        scale=args.scale,
    )


def add_enumerate_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("which configurations (as tensadapt enumerate)")
    g.add_argument(
        "--rank",
        type=arg_type("rank"),
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
        type=arg_type("params"),
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
        "--scale",
        type=arg_type("scale"),
        default=2.0,
        metavar="S",
        help="update scale of every spec: alpha = S x its largest rank (default 2, LoRA's usual "
        "alpha = 2r; 1 = the TensLoRA authors' plain multiplier of 1.0)",
    )
    g.add_argument(
        "--factorizations",
        default=None,
        metavar="LIST",
        help="factorizations to enumerate, comma-separated (default: every registered one, "
        "plugins included; see tensadapt plugins)",
    )


def add_enumerate(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        "-m",
        default="roberta-base",
        help="preset name or local model/config path (default: roberta-base)",
    )
    add_enumerate_options(p)
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="write one spec YAML per row to DIR (tensadapt validate accepts each)",
    )


def run_enumerate(args: argparse.Namespace) -> int:
    not_a_file(args.out, "--out")
    e = enumeration(args)
    print(e.to_json() if args.json else str(e))
    if args.out:
        paths = e.write_specs(args.out)
        print(f"wrote {len(paths)} spec(s) to {args.out}", file=sys.stderr if args.json else None)
    return 0


def add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="directory written by save_adapter")
    p.add_argument("--to", choices=("peft-lora", "merged"), required=True, help="export format")
    p.add_argument("--out", "-o", required=True, help="output directory")
    p.add_argument(
        "--model",
        "-m",
        required=True,
        help="the base model: a local model directory, or a preset built from its config",
    )
    p.add_argument(
        "--seed", type=arg_type("seed"), default=0, help="seed of a preset's random weights (0)"
    )
    p.add_argument(
        "--model-class",
        default=None,
        help="transformers class, e.g. AutoModelForSequenceClassification (default: the "
        "config's architectures[0], AutoModel for presets)",
    )
    p.add_argument(
        "--rank",
        type=arg_type("rank"),
        default=None,
        help="peft-lora: cap every LoRA at this rank (truncated SVD where needed, error reported)",
    )


_CLASS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _trained_head(saved: dict[str, Any], src: Path) -> tuple[str | None, int | None]:
    """``(model_class, num_labels)`` recorded at save, each checked (a tampered config must not
    pick an arbitrary class or size a head of a billion labels)."""
    from ..errors import AdapterMismatchError
    from ..train.data import MAX_LABELS

    cls, n = saved.get("model_class"), saved.get("num_labels")
    if cls is not None and not (isinstance(cls, str) and _CLASS_NAME.fullmatch(cls)):
        raise AdapterMismatchError(
            f"{src}: adapter config: model_class {cls!r} is not a class name"
        )
    if n is not None and (
        isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_LABELS
    ):
        raise AdapterMismatchError(
            f"{src}: adapter config: num_labels {n!r} is not an integer in 1..{MAX_LABELS}"
        )
    return cls, n


def _check_family(saved: dict[str, Any], src: Path, model: str) -> None:
    """Refuse a base model of another family than the one the adapter was trained on."""
    from ..arch import load_config

    arch = saved.get("architecture")
    trained_on = arch.get("model_type") if isinstance(arch, dict) else None
    kind = getattr(load_config(model), "model_type", None)
    if isinstance(trained_on, str) and kind != trained_on:
        raise UsageError(
            f"--model {model} is a {kind!r} model, but the adapter in {src} was trained on a "
            f"{trained_on!r} model; give that base model"
        )


def run_export(args: argparse.Namespace) -> int:
    src = Path(args.adapter)
    if not src.exists():
        raise UsageError(f"{args.adapter}: no such adapter directory")
    if not src.is_dir():
        raise UsageError(f"{args.adapter}: is a file, expected an adapter directory")
    not_a_file(args.out, "--out")
    from ..adapterfile import read_config
    from ..export import export_merged, export_peft_lora
    from ..io import load_adapter, load_base_model

    saved = read_config(src)
    recorded = saved.get("spec")
    if isinstance(recorded, dict) and "nf4" in (recorded.get("base"), recorded.get("residual")):
        from ..deps import require

        require("bitsandbytes", f"{src} (an adapter with NF4 weights)")
    trained = _trained_head(saved, src)  # default to the head the adapter was trained with
    _check_family(saved, src, args.model)
    model_class = args.model_class or trained[0]
    num_labels = trained[1] if model_class == trained[0] else None
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


#: checkpoint formats ``tensadapt import`` converts (name -> what it reads)
IMPORT_FORMATS = {"lorta-peft": "the LoRTA authors' PEFT tuner (peft_type LORTA)"}


def add_import(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "format",
        choices=tuple(IMPORT_FORMATS),
        metavar="FORMAT",
        help="the checkpoint's format: "
        + "; ".join(f"{k} -- {v}" for k, v in IMPORT_FORMATS.items()),
    )
    p.add_argument(
        "adapter",
        metavar="ADAPTER_DIR",
        help="the directory the authors' save_pretrained wrote (adapter_config.json, "
        "adapter_model.safetensors)",
    )
    p.add_argument(
        "--model",
        "-m",
        required=True,
        help="the base model the adapter was trained on: a local model directory (or a preset, "
        "for tests); a sequence-classification adapter gets a head of its label count",
    )
    p.add_argument(
        "--out",
        "-o",
        required=True,
        metavar="DIR",
        help="the tensadapt adapter directory to write (new or empty); load it with "
        "TensadaptModel.from_pretrained(model, DIR) or tensadapt export",
    )


def run_import(args: argparse.Namespace) -> int:
    src = Path(args.adapter)
    if not src.exists():
        raise UsageError(f"{args.adapter}: no such adapter directory")
    if not src.is_dir():
        raise UsageError(f"{args.adapter}: is a file, expected an adapter directory")
    out = Path(args.out)
    not_a_file(args.out, "--out")
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--out {args.out}: is not empty; give a new or empty directory")
    from ..adapterfile import read_config
    from ..importers.lorta_peft import import_checkpoint

    written = import_checkpoint(src, args.model, out)
    spec = read_config(written).get("spec", {})
    print(
        f"converted {src} ({IMPORT_FORMATS[args.format]}) to {written}: "
        f"{spec.get('factorization')} over {spec.get('modes')}, rank {spec.get('rank')}, "
        f"orientation {spec.get('orientation')}"
    )
    return 0
