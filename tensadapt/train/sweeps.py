"""Sweeps: many specs × seeds into ``runs/<spec>/seed<k>/``, then ``results.csv`` and a plot.

Resumable: a run whose ``metrics.json`` exists is finished and skipped; a run that failed
(``failed.json``: it diverged or turned non-finite) is reported and skipped too (delete the file
to retry it); a run directory claimed by another live process is left to it. ``results.csv`` is
rewritten atomically after every finished run, from the ``metrics.json`` files alone.
"""

from __future__ import annotations

import csv
import json
import os
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..enumerate import rank_summary
from ..errors import DivergenceError, NonFiniteError, TensadaptError
from ..io import atomic_write
from ..spec import AdapterSpec
from .encode import Prepared
from .options import BOUNDS, TrainOptions
from .outdir import SWEEP_FILES, OutputDirError, check_output_dir
from .plots import plot_pareto
from .trainer import FAILED_FILE, METRICS_FILE, train

RESULTS_FILE = "results.csv"
PARETO_FILE = "pareto.png"
RESULT_COLUMNS = (
    "spec",
    "factorization",
    "modes",
    "rank",
    "params",
    "seed",
    "metric",
    "value",
    "eval_loss",
    "train_loss",
    "steps",
    "time_s",
)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


class SweepError(TensadaptError, ValueError):
    """A sweep that cannot run as asked (repeated or unsafe names, bad seeds, unreadable results)."""


@dataclass
class SweepRun:
    """One (spec, seed) of a sweep."""

    name: str
    spec: AdapterSpec
    seed: int

    def directory(self, root: Path) -> Path:
        return root / "runs" / self.name / f"seed{self.seed}"


@dataclass
class SweepResult:
    """What :func:`sweep` did: result rows, runs trained / skipped / failed, files.

    Attributes:
        failed: ``(run, message)`` of every run that diverged or turned non-finite (now or before).
    """

    rows: list[dict[str, Any]]
    trained: int
    skipped: int
    results_csv: Path
    pareto_png: Path | None
    summary: list[dict[str, Any]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def _check(specs: Sequence[tuple[str, AdapterSpec]], seeds: Sequence[int]) -> None:
    names = [n for n, _ in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SweepError(f"sweep: spec names must be unique, repeated: {', '.join(dupes)}")
    unsafe = [n for n in names if not _NAME.fullmatch(n)]
    if unsafe:
        raise SweepError(
            f"sweep: spec names name directories; use letters, digits, '.', '_', '+' and '-' "
            f"only: {', '.join(map(repr, unsafe))}"
        )
    if not seeds or len(set(seeds)) != len(seeds):
        raise SweepError(f"sweep: seeds must be distinct and at least one, got {list(seeds)}")
    bad = [s for s in seeds if BOUNDS["seed"].problem(s)]
    if bad:
        raise SweepError(f"sweep: seed {bad[0]!r} {BOUNDS['seed'].problem(bad[0])}")


def sweep(
    specs: Sequence[tuple[str, AdapterSpec]],
    prepared: Prepared,
    out: str | os.PathLike[str],
    seeds: Sequence[int] = (0, 1, 2),
    opts: TrainOptions | None = None,
    log: Callable[[str], None] | None = print,
    plot: bool = True,
) -> SweepResult:
    """Train every spec with every seed; resumable; writes ``results.csv`` and ``pareto.png``.

    Args:
        specs: ``(name, spec)`` pairs; names must be unique (they name the run directories).
        prepared: from :func:`~tensadapt.train.encode.prepare`.
        out: the sweep directory (new, empty, or an earlier sweep's).
        seeds: seeds of every spec.
        opts: training options (``seed`` is replaced per run).
        log: progress messages (``None``: silent).
        plot: write ``pareto.png``.
    Raises:
        SweepError: see :class:`SweepError`; OutputDirError: ``out`` cannot hold a sweep.
    """
    say = log or (lambda _s: None)
    seeds = list(seeds)
    _check(specs, seeds)
    root = check_output_dir(out, SWEEP_FILES)
    root.mkdir(parents=True, exist_ok=True)
    opts = opts or TrainOptions()
    runs = [SweepRun(n, s, seed) for n, s in specs for seed in seeds]
    trained = skipped = 0
    failed: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    for i, run in enumerate(runs, start=1):
        d = run.directory(root)
        tag = f"[{i}/{len(runs)}] {run.name} seed {run.seed}"
        if (d / METRICS_FILE).exists():
            skipped += 1
            say(f"{tag}: done already, skipped")
            continue
        if (d / FAILED_FILE).exists():
            why = _failure_of(d)
            failed.append((f"{run.name}/seed{run.seed}", why))
            say(f"{tag}: failed before ({why}); skipped, delete {d / FAILED_FILE} to retry")
            continue
        say(f"{tag}: training ({time.perf_counter() - t0:.0f} s elapsed)")
        try:
            m = train(run.spec, prepared, replace(opts, seed=run.seed), out=d, log=None)
        except OutputDirError as e:
            skipped += 1
            say(f"{tag}: skipped: {e}")
            continue
        except (DivergenceError, NonFiniteError) as e:
            failed.append((f"{run.name}/seed{run.seed}", str(e)))
            say(f"{tag}: FAILED: {e}")
            continue
        trained += 1
        metric, value = metric_of(m)
        say(f"{tag}: {metric} {value:.4f}, {m['adapter_params']:,} params, {m['time_s']:.1f} s")
        collect_results(root)
    rows = collect_results(root, [r.name for r in runs])
    summary = summarize(rows)
    png = None
    if plot and rows:
        png = plot_pareto(summary, root / PARETO_FILE)
    tail = f", {len(failed)} failed" if failed else ""
    say(f"sweep: {trained} trained, {skipped} skipped{tail}; {root / RESULTS_FILE}")
    return SweepResult(rows, trained, skipped, root / RESULTS_FILE, png, summary, failed)


def _failure_of(d: Path) -> str:
    try:
        return str(json.loads((d / FAILED_FILE).read_text()).get("message", "unknown error"))
    except (OSError, ValueError, AttributeError):
        return f"unreadable {FAILED_FILE}"


def metric_of(m: Mapping[str, Any]) -> tuple[str, float]:
    """The metric a run is ranked by: eval accuracy, else eval loss, else train loss."""
    if "eval_accuracy" in m:
        return "eval_accuracy", float(m["eval_accuracy"])
    if "eval_loss" in m:
        return "eval_loss", float(m["eval_loss"])
    return "train_loss", float(m["train_loss"])


def collect_results(root: Path, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Rows of ``results.csv`` from every finished run under ``root/runs`` (rewritten atomically).

    Args:
        root: the sweep directory.
        names: keep only these spec names (in this order); ``None``: every run found.
    """
    rows = []
    for f in sorted((root / "runs").glob(f"*/seed*/{METRICS_FILE}")):
        name = f.parent.parent.name
        if names is not None and name not in names:
            continue
        try:
            m = json.loads(f.read_text())
            metric, value = metric_of(m)
            rows.append(_row(name, m, metric, value))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SweepError(
                f"{f}: not the metrics.json of a finished run ({type(e).__name__}: {e}); "
                "delete it to train that run again"
            ) from None
    if names is not None:
        order = {n: i for i, n in enumerate(names)}
        rows.sort(key=lambda r: (order[r["spec"]], r["seed"]))

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=RESULT_COLUMNS)
            w.writeheader()
            w.writerows(rows)

    atomic_write(root / RESULTS_FILE, write)
    return rows


def _row(name: str, m: Mapping[str, Any], metric: str, value: float) -> dict[str, Any]:
    return {
        "spec": name,
        "factorization": m["factorization"],
        "modes": "+".join(m["modes"]) or "none",
        "rank": rank_summary(m["rank"]),
        "params": m["adapter_params"],
        "seed": m["seed"],
        "metric": metric,
        "value": value,
        "eval_loss": m.get("eval_loss", ""),
        "train_loss": m["train_loss"],
        "steps": m["steps"],
        "time_s": round(float(m["time_s"]), 2),
    }


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean, standard deviation, min and max of the metric per spec, with params, in row order."""
    by: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        by.setdefault(str(r["spec"]), []).append(r)
    out = []
    for name, rs in by.items():
        vals = [float(r["value"]) for r in rs]
        out.append(
            {
                "spec": name,
                "factorization": rs[0]["factorization"],
                "modes": rs[0]["modes"],
                "rank": rs[0]["rank"],
                "params": int(rs[0]["params"]),
                "metric": rs[0]["metric"],
                "n": len(vals),
                "mean": statistics.fmean(vals),
                "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "min": min(vals),
                "max": max(vals),
            }
        )
    return out
