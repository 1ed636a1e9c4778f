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
from typing import Any, Literal

from ..atomic import atomic_write
from ..enumerate import rank_summary
from ..errors import DivergenceError, NonFiniteError, TensadaptError
from ..spec import AdapterSpec
from .encode import Prepared
from .options import BOUNDS, TrainOptions
from .outdir import RUN_FILES, SWEEP_FILES, OutputDirError, check_output_dir, claim_output_dir
from .plots import plot_pareto
from .trainer import FAILED_FILE, METRICS_FILE, train
from .tuning import (
    JOURNAL_FILE,
    Best,
    ConfigStudy,
    TuneError,
    TuneOptions,
    metric_name,
    open_storage,
    require_optuna,
    run_trial,
    setup_of,
    validation_split,
    with_scale,
    write_tuning_csv,
)

RESULTS_FILE = "results.csv"
PARETO_FILE = "pareto.png"
RESULT_COLUMNS = (
    "spec",
    "factorization",
    "modes",
    "rank",
    "params",
    "lr",
    "scale",
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
    tune: TuneOptions | None = None,
) -> SweepResult:
    """Train every spec with every seed; resumable; writes ``results.csv`` and ``pareto.png``.

    With ``tune``, each configuration's learning rate (and scale) is first tuned by an Optuna
    study on a validation part of the training data (:mod:`tensadapt.train.tuning`); its runs
    then train on the whole training data at the best values, evaluated on ``prepared.eval``.
    Several processes may run the same sweep at once (same arguments, same ``out``): they share
    the studies' trials and the runs (each run directory is claimed), and none is done twice.
    A worker with nothing left to do waits for other workers' running trials (it needs their
    result), not for their runs.

    Args:
        specs: ``(name, spec)`` pairs; names must be unique (they name the run directories).
        prepared: from :func:`~tensadapt.train.encode.prepare`.
        out: the sweep directory (new, empty, or an earlier sweep's).
        seeds: seeds of every spec.
        opts: training options (``seed`` is replaced per run, ``lr`` when tuned).
        log: progress messages (``None``: silent).
        plot: write ``pareto.png``.
        tune: tune each configuration first (``None``: train at ``opts.lr``).
    Raises:
        SweepError: see :class:`SweepError`; OutputDirError: ``out`` cannot hold a sweep;
        TuneError: tuning options that cannot work (a storage that cannot be opened, a study
        tuned with another setup, too little data to hold a validation part out);
        MissingDependencyError: ``tune`` without optuna.
    """
    say = log or (lambda _s: None)
    seeds = list(seeds)
    _check(specs, seeds)
    root = check_output_dir(out, SWEEP_FILES)
    opts = opts or TrainOptions()
    tuner = _Tuner.open(specs, prepared, root, opts, tune, say) if tune is not None else None
    root.mkdir(parents=True, exist_ok=True)
    runs = [SweepRun(n, s, seed) for n, s in specs for seed in seeds]
    book = _Book(len(runs), say)
    pending = [n for n, _ in specs]
    while pending:
        acted = waiting = False
        for name in list(pending):
            best = None
            if tuner is not None:
                state = tuner.step(name)
                if state == "ran":
                    acted = True
                    break
                if state == "busy":
                    waiting = True
                    continue
                best = tuner.best(name)
                if best is None:
                    book.config_failed(name, [r for r in runs if r.name == name], tuner)
                    pending.remove(name)
                    continue
            todo = [r for r in runs if r.name == name and book.unseen(r)]
            for run in todo:
                if _final_run(run, root, prepared, opts, best, book):
                    acted = True
                    break
            else:
                pending.remove(name)
            if acted:
                break
        if not acted and waiting:
            time.sleep(tune.poll_s if tune is not None else 1.0)
    if tuner is not None:
        tuner.write_csv()
    rows = collect_results(root, [r.name for r in runs])
    summary = summarize(rows)
    png = None
    if plot and rows:
        png = plot_pareto(summary, root / PARETO_FILE)
    tail = f", {len(book.failed)} failed" if book.failed else ""
    say(f"sweep: {book.trained} trained, {book.skipped} skipped{tail}; {root / RESULTS_FILE}")
    return SweepResult(
        rows, book.trained, book.skipped, root / RESULTS_FILE, png, summary, book.failed
    )


class _Book:
    """What happened to each run of this sweep process (each run is looked at once)."""

    def __init__(self, n: int, say: Callable[[str], None]) -> None:
        self.n, self.say = n, say
        self.seen: set[tuple[str, int]] = set()
        self.trained = self.skipped = 0
        self.failed: list[tuple[str, str]] = []
        self.t0 = time.perf_counter()

    def unseen(self, run: SweepRun) -> bool:
        return (run.name, run.seed) not in self.seen

    def tag(self, run: SweepRun) -> str:
        self.seen.add((run.name, run.seed))
        return f"[{len(self.seen)}/{self.n}] {run.name} seed {run.seed}"

    def config_failed(self, name: str, runs: Sequence[SweepRun], tuner: _Tuner) -> None:
        why = f"every one of its {tuner.tune.trials} tuning trials diverged"
        for run in runs:
            if self.unseen(run):
                self.say(f"{self.tag(run)}: FAILED: {why}")
                self.failed.append((f"{run.name}/seed{run.seed}", why))


def _final_run(
    run: SweepRun,
    root: Path,
    prepared: Prepared,
    opts: TrainOptions,
    best: Best | None,
    book: _Book,
) -> bool:
    """Train one run unless it is finished, failed before, or claimed by another process;
    return whether it was trained (or failed) now."""
    d = run.directory(root)
    tag = book.tag(run)
    say = book.say
    if _finished(d, run, tag, best, book):
        return False
    try:
        claim = claim_output_dir(d, RUN_FILES)
    except OutputDirError as e:
        book.skipped += 1
        busy = "in use by process" in str(e)
        say(
            f"{tag}: "
            + ("being trained by another process, left to it" if busy else f"skipped: {e}")
        )
        return False
    try:
        if _finished(d, run, tag, best, book):  # finished by another worker just before the claim
            return False
        spec, one = run.spec, replace(opts, seed=run.seed)
        record: dict[str, Any] = {}
        if best is not None:
            spec = with_scale(spec, best.scale) if best.scale is not None else spec
            one = replace(one, lr=best.lr)
            record["tuning"] = best.as_dict()
        say(f"{tag}: training ({time.perf_counter() - book.t0:.0f} s elapsed)")
        try:
            m = train(spec, prepared, one, out=claim, log=None, record=record)
        except (DivergenceError, NonFiniteError) as e:
            book.failed.append((f"{run.name}/seed{run.seed}", str(e)))
            say(f"{tag}: FAILED: {e}")
            return True
    finally:
        claim.release()
    book.trained += 1
    metric, value = metric_of(m)
    say(f"{tag}: {metric} {value:.4f}, {m['adapter_params']:,} params, {m['time_s']:.1f} s")
    collect_results(root)
    return True


def _finished(d: Path, run: SweepRun, tag: str, best: Best | None, book: _Book) -> bool:
    """Whether the run is done or failed before (reported); else ``False``."""
    if (d / METRICS_FILE).exists():
        book.skipped += 1
        note = ""
        if best is not None:
            try:
                lr = json.loads((d / METRICS_FILE).read_text()).get("lr")
            except (OSError, ValueError):
                lr = None
            if lr is not None and lr != best.lr:
                note = (
                    f" (trained at lr {lr:.3g}; the study's best is now {best.lr:.3g}: delete "
                    f"{d} to train it again)"
                )
        book.say(f"{tag}: done already, skipped{note}")
        return True
    if (d / FAILED_FILE).exists():
        why = _failure_of(d)
        book.failed.append((f"{run.name}/seed{run.seed}", why))
        book.say(f"{tag}: failed before ({why}); skipped, delete {d / FAILED_FILE} to retry")
        return True
    return False


class _Tuner:
    """The studies of a tuned sweep (see :mod:`tensadapt.train.tuning`)."""

    def __init__(
        self,
        root: Path,
        studies: dict[str, ConfigStudy],
        specs: Mapping[str, AdapterSpec],
        data: Prepared,
        opts: TrainOptions,
        tune: TuneOptions,
        say: Callable[[str], None],
    ) -> None:
        self.root, self.studies, self.specs = root, studies, specs
        self.data, self.opts, self.tune, self.say = data, opts, tune, say

    @classmethod
    def open(
        cls,
        specs: Sequence[tuple[str, AdapterSpec]],
        prepared: Prepared,
        root: Path,
        opts: TrainOptions,
        tune: TuneOptions,
        say: Callable[[str], None],
    ) -> _Tuner:
        require_optuna()
        metric = metric_name(tune, prepared.task)
        if metric == "accuracy" and prepared.task != "classification":
            raise TuneError("--tune-metric accuracy needs a classification task; use loss")
        data = validation_split(prepared, tune.val_fraction, tune.tune_seed)
        root.mkdir(parents=True, exist_ok=True)
        storage = open_storage(tune.storage, root)
        direction: Literal["maximize", "minimize"] = (
            "maximize" if metric == "accuracy" else "minimize"
        )
        studies = {
            name: ConfigStudy(storage, name, setup_of(spec, prepared, opts, tune), tune, direction)
            for name, spec in specs
        }
        assert data.eval is not None
        say(
            f"tuning: {tune.trials} trial(s) per configuration on {len(data.train):,} training "
            f"examples, scored by validation {metric} on {len(data.eval):,} held out "
            f"(--val-fraction {tune.val_fraction:g}); storage "
            f"{tune.storage or root / JOURNAL_FILE}"
        )
        return cls(root, studies, dict(specs), data, opts, tune, say)

    def step(self, name: str) -> str:
        """``tuned``, ``ran`` (this worker ran one trial) or ``busy`` (others' trials run)."""
        cs = self.studies[name]
        for n in cs.fail_stale():
            self.say(f"{name} trial {n}: its worker is gone; failed, another trial replaces it")
        if cs.tuned():
            return "tuned"
        trial = cs.ask()
        if trial is None:
            return "busy"
        run_trial(cs, trial, self.specs[name], self.data, self.opts, train, self.say)
        return "ran"

    def best(self, name: str) -> Best | None:
        return self.studies[name].best()

    def write_csv(self) -> None:
        write_tuning_csv(self.root, self.studies)


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
        "lr": m.get("lr", ""),
        "scale": m.get("scale", ""),
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
                "lr": rs[0].get("lr", ""),
                "scale": rs[0].get("scale", ""),
                "metric": rs[0]["metric"],
                "n": len(vals),
                "mean": statistics.fmean(vals),
                "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "min": min(vals),
                "max": max(vals),
            }
        )
    return out
