"""Per-configuration tuning of the learning rate (and update scale) for ``sweep --tune-lr``.

A fair comparison of adapters tunes each one: the learning rate that suits LoRA does not suit a
60×59×3×6 Tucker core. For every configuration of a sweep an Optuna study searches the learning
rate (log-uniform) and, with ``tune_scale``, the update scale ``alpha / rank`` (log-uniform),
each trial training on the training data minus a validation part carved from it
(:func:`validation_split`, stratified by label) and scored on that part. The sweep's ``--eval``
set is never seen while tuning; the final runs train on the whole training data at the best
trial's values and are evaluated on ``--eval`` (see :func:`tensadapt.train.sweeps.sweep`).

Optuna is called directly (not through ``Trainer.hyperparameter_search``, which wraps the same
library) because the sweep needs what that wrapper hides: ask/tell, so that several worker
processes share one study with trial numbers handed out by the storage; the choice of storage;
and telling a diverged trial apart (it is *pruned*: the sampler ranks it below every finished
trial, as a learning rate that must not be proposed again).

Storage (:func:`open_storage`): by default a journal file in the sweep directory
(:data:`JOURNAL_FILE`, Optuna's ``JournalFileBackend`` with its ``O_EXCL`` lock file). It is an
append-only log each worker replays, written under a lock that also works on NFS (v3 or later),
which SQLite does not promise: SQLite's ``fcntl`` locks are unreliable on network file systems
and concurrent writers get "database is locked". ``storage="postgresql://..."`` (any SQLAlchemy
URL Optuna accepts) shares the studies between machines.

How workers share a study without running a trial twice: a trial is created by ``study.ask()``,
whose number the storage assigns under its lock; a trial whose number finds ``trials`` live or
finished trials before it is surplus and is closed at once (state ``FAIL``, user attribute
``surplus``), never trained. A running trial records its worker (``host:pid``) and a heartbeat;
a trial whose worker died (its pid gone on this host, or no heartbeat for
``stale_after_s`` on another) is failed by the next worker that looks, and a new trial replaces
it. Each trial's sampler is seeded from ``tune_seed`` and the trial's number, so what a trial
proposes depends on the study's history, not on which worker asked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..atomic import atomic_write
from ..deps import require
from ..errors import DivergenceError, NonFiniteError, TensadaptError
from ..spec import AdapterSpec, load_spec
from .data import DataError, Split, TaskData
from .encode import Prepared, encode
from .options import TrainOptions, check

if TYPE_CHECKING:
    import optuna

#: the default storage, in the sweep directory (and its lock file, JOURNAL_FILE + ".lock")
JOURNAL_FILE = "tuning.journal"
#: every trial of every study of the sweep, one row each
TUNING_CSV = "tuning.csv"
TUNING_COLUMNS = (
    "config",
    "trial",
    "state",
    "lr",
    "scale",
    "metric",
    "value",
    "val_loss",
    "time_s",
    "worker",
    "note",
)
METRICS = ("auto", "accuracy", "loss")
_WORKER = "worker"
_HEARTBEAT = "heartbeat"
_SURPLUS = "surplus"


class TuneError(TensadaptError, ValueError):
    """Tuning that cannot run as asked (an option out of range, an unusable storage, a study
    created with another setup); the message names the flag."""


@dataclass(frozen=True)
class TuneOptions:
    """How ``sweep --tune-lr`` tunes each configuration (ranges are checked when built).

    Attributes:
        trials: finished trials per configuration (a diverged trial counts: it was tried).
        lr_min, lr_max: the learning-rate range, searched log-uniformly.
        tune_scale: also search the update scale ``alpha / rank`` (the spec's ``alpha`` becomes
            ``scale · its largest rank``).
        scale_min, scale_max: the scale range, searched log-uniformly.
        val_fraction: share of the training examples held out to score trials (per class).
        tune_seed: seeds the validation split, the trials' training and the sampler.
        metric: ``accuracy`` (maximised), ``loss`` (validation loss, minimised), or ``auto``
            (accuracy for classification, loss for causal LM).
        storage: an Optuna storage URL (``postgresql://...``, ``sqlite:///...``) or a journal file
            path; ``None``: :data:`JOURNAL_FILE` in the sweep directory.
        study_prefix: prefixed to each configuration's name to name its study.
        poll_s: how often a worker with nothing to do checks other workers' trials.
        heartbeat_s: how often a running trial records that its worker is alive.
        stale_after_s: a running trial of another host with no heartbeat for this long is failed.

    Raises:
        TuneError: a value out of range (named with its flag).
    """

    trials: int = 12
    lr_min: float = 1e-5
    lr_max: float = 1e-1
    tune_scale: bool = False
    scale_min: float = 0.1
    scale_max: float = 10.0
    val_fraction: float = 0.1
    tune_seed: int = 0
    metric: str = "auto"
    storage: str | None = None
    study_prefix: str = ""
    poll_s: float = 2.0
    heartbeat_s: float = 30.0
    stale_after_s: float = 600.0

    def __post_init__(self) -> None:
        check(self, TuneError)
        if self.lr_min >= self.lr_max:
            raise TuneError(f"--lr-min {self.lr_min:g} must be below --lr-max {self.lr_max:g}")
        if self.scale_min >= self.scale_max:
            raise TuneError(
                f"--scale-min {self.scale_min:g} must be below --scale-max {self.scale_max:g}"
            )
        if self.metric not in METRICS:
            raise TuneError(f"--tune-metric must be one of {', '.join(METRICS)}: {self.metric!r}")
        if not self.poll_s > 0 or not self.heartbeat_s > 0 or not self.stale_after_s > 0:
            raise TuneError("poll_s, heartbeat_s and stale_after_s must be > 0")


def require_optuna() -> None:
    """:class:`~tensadapt.errors.MissingDependencyError` (with the pip line) without optuna."""
    require("optuna", "sweep --tune-lr")


# -- data and spec ---------------------------------------------------------------------------
def validation_split(prepared: Prepared, fraction: float, seed: int) -> Prepared:
    """``prepared`` with its training data split in two: trials train on the first part and are
    scored on the second (``eval``); the split is of the texts (``data``), so the parts can be
    tokenised at another length too.

    Classification: each class gives ``round(fraction · n_c)`` texts (at least one when it has
    two or more), chosen by a generator seeded with ``seed``; causal LM: that share of the lines.
    The order of the training part is kept.

    Raises:
        TuneError: too few examples to hold any out, or nothing left to train on.
    """
    rng = random.Random(seed)
    td = prepared.data
    texts, labels = td.train.texts, td.train.labels
    n = len(texts)
    if labels is None:
        k = round(fraction * n)
        held = set(rng.sample(range(n), k)) if 0 < k < n else set()
    else:
        by: dict[int, list[int]] = {}
        for i, label in enumerate(labels):
            by.setdefault(label, []).append(i)
        held = set()
        for label in sorted(by):
            idx = by[label]
            k = max(1, round(fraction * len(idx))) if len(idx) >= 2 else 0
            held.update(rng.sample(idx, k))
    if not held or len(held) >= n:
        raise TuneError(
            f"--val-fraction {fraction:g}: {n} training examples leave no validation part to tune "
            "on (or nothing to train on); use more data or another fraction"
        )

    def part(keep: bool, source: str) -> Split:
        idx = [i for i in range(n) if (i in held) != keep]
        return Split(
            source,
            [texts[i] for i in idx],
            [labels[i] for i in idx] if labels is not None else None,
        )

    src = td.train.source
    sub = TaskData(td.task, part(True, src), part(False, f"{src} (held out)"), td.num_labels)
    try:
        train, val = encode(sub, prepared.tokenizer, prepared.config, prepared.max_length)
    except DataError as e:
        raise TuneError(f"--val-fraction {fraction:g}: {e}") from None
    return replace(prepared, train=train, eval=val, data=sub, variants={})


def with_scale(spec: AdapterSpec, scale: float) -> AdapterSpec:
    """``spec`` with update scale ``scale``: ``alpha = scale · (its largest rank)``."""
    top = spec.rank if isinstance(spec.rank, int) else max(spec.rank.values())
    return load_spec({**spec.to_dict(), "alpha": float(scale * top)})


def data_fingerprint(prepared: Prepared) -> str:
    """A short hash of the training examples (ids and labels): a study belongs to one data set."""
    h = hashlib.sha256()
    for ex in prepared.train:
        h.update(json.dumps([ex["input_ids"], ex["labels"]], separators=(",", ":")).encode())
    return h.hexdigest()[:16]


# -- storage and studies ---------------------------------------------------------------------
def open_storage(storage: str | None, root: Path) -> optuna.storages.BaseStorage:
    """The studies' storage: ``storage`` as a URL (``scheme://...``) or journal-file path, or
    :data:`JOURNAL_FILE` in ``root``.

    Raises:
        TuneError: the URL or file cannot be opened (a missing database driver, a bad URL).
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    try:
        if storage is not None and "://" in storage:
            return optuna.storages.RDBStorage(storage)
        path = str(Path(storage) if storage is not None else root / JOURNAL_FILE)
        # O_EXCL lock file: atomic on local file systems and NFSv3+ (see the module docstring)
        return optuna.storages.JournalStorage(
            JournalFileBackend(path, lock_obj=JournalFileOpenLock(path))
        )
    except (ImportError, OSError, ValueError) as e:
        raise TuneError(f"--storage {storage or path}: cannot open it ({e})") from None
    except Exception as e:  # SQLAlchemy's errors (bad URL, refused connection) share no base here
        raise TuneError(f"--storage {storage}: cannot open it ({type(e).__name__}: {e})") from None


def worker_id() -> str:
    """This process as a worker: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(worker: str) -> bool | None:
    """Whether a worker of this host is alive; ``None`` for another host (cannot tell)."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Best:
    """The tuned values of one configuration."""

    lr: float
    scale: float | None
    value: float
    trial: int
    finished: int
    diverged: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ConfigStudy:
    """The Optuna study of one sweep configuration, shared by every worker.

    Args:
        storage: from :func:`open_storage`.
        name: the configuration's name (the study is ``study_prefix + name``).
        setup: what the study's results depend on (spec, data, training options, ranges);
            recorded on creation, and a study created with another setup is refused.
        opts: the tuning options.
        direction: ``maximize`` or ``minimize``.
    Raises:
        TuneError: the study exists with another setup.
    """

    def __init__(
        self,
        storage: optuna.storages.BaseStorage,
        name: str,
        setup: Mapping[str, Any],
        opts: TuneOptions,
        direction: Literal["maximize", "minimize"],
    ) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own lines
        self.name = name
        self.opts = opts
        self.study = optuna.create_study(
            study_name=opts.study_prefix + name,
            storage=storage,
            direction=direction,
            load_if_exists=True,
        )
        want = json.loads(json.dumps(setup, sort_keys=True, default=str))
        have = self.study.user_attrs.get("setup")
        if have is None:
            self.study.set_user_attr("setup", want)
        elif have != want:
            keys = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            raise TuneError(
                f"study {self.study.study_name!r} was tuned with another setup (differs in "
                f"{', '.join(keys)}); use a new --out, or --study-prefix for new studies"
            )

    # -- state ---------------------------------------------------------------------------------
    def trials(self) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False)

    def counts(self) -> tuple[int, int]:
        """``(finished, live)``: trials that count (complete or diverged), and those plus the
        running ones."""
        from optuna.trial import TrialState

        done = live = 0
        for t in self.trials():
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
                done += 1
                live += 1
            elif t.state == TrialState.RUNNING:
                live += 1
        return done, live

    def tuned(self) -> bool:
        return self.counts()[0] >= self.opts.trials

    def best(self) -> Best | None:
        """The best finished trial's values (``None``: every trial diverged)."""
        from optuna.trial import TrialState

        trials = self.trials()
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        pruned = sum(t.state == TrialState.PRUNED for t in trials)
        if not done:
            return None
        sign = 1 if self.study.direction.name == "MAXIMIZE" else -1
        # ties (accuracy on a small validation part often ties): the lower validation loss,
        # then the earlier trial
        top = max(
            done,
            key=lambda t: (
                sign * float(t.value or 0.0),
                -float(t.user_attrs.get("val_loss", 0.0)),
                -t.number,
            ),
        )
        return Best(
            lr=float(top.params["lr"]),
            scale=float(top.params["scale"]) if "scale" in top.params else None,
            value=float(top.value or 0.0),
            trial=top.number,
            finished=len(done) + pruned,
            diverged=pruned,
        )

    def fail_stale(self) -> list[int]:
        """Fail running trials whose worker is gone; return their numbers."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        now, stale = time.time(), []
        for t in self.trials():
            if t.state != TrialState.RUNNING:
                continue
            worker = str(t.user_attrs.get(_WORKER, ""))
            alive = _alive(worker) if worker else None
            beat = float(t.user_attrs.get(_HEARTBEAT, 0) or 0) or (
                t.datetime_start.timestamp() if t.datetime_start else now
            )
            if alive is False or (alive is None and now - beat > self.opts.stale_after_s):
                try:
                    self.study.tell(t.number, state=TrialState.FAIL)
                    stale.append(t.number)
                except UpdateFinishedTrialError:
                    pass  # finished or failed meanwhile by its worker or another
        return stale

    def ask(self) -> optuna.Trial | None:
        """A new trial for this worker, or ``None`` when the study has enough live trials (a
        surplus trial a race produced is closed unrun)."""
        from optuna.samplers import TPESampler
        from optuna.trial import TrialState

        if self.counts()[1] >= self.opts.trials:
            return None
        trial = self.study.ask()
        trial.set_user_attr(_WORKER, worker_id())
        trial.set_user_attr(_HEARTBEAT, time.time())
        before = [
            t
            for t in self.trials()
            if t.number < trial.number
            and t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        ]
        if len(before) >= self.opts.trials:
            trial.set_user_attr(_SURPLUS, True)
            self.study.tell(trial, state=TrialState.FAIL)
            return None
        # the proposal depends on the history and the trial number only, not on the worker;
        # startup trials (random) are about a third of the budget, TPE after them
        self.study.sampler = TPESampler(
            seed=(self.opts.tune_seed * 1_000_003 + trial.number) % 2**32,
            n_startup_trials=max(2, min(10, self.opts.trials // 3)),
            constant_liar=True,
        )
        return trial


class Heartbeat:
    """A thread recording, every ``interval`` seconds, that a running trial's worker is alive."""

    def __init__(self, trial: optuna.Trial, interval: float) -> None:
        self.stop_event = threading.Event()
        self.trial = trial
        self.interval = interval
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.stop_event.wait(self.interval):
            # finished meanwhile, or the storage is briefly unreachable: the next beat tries again
            with contextlib.suppress(Exception):
                self.trial.set_user_attr(_HEARTBEAT, time.time())

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join()


def setup_of(
    spec: AdapterSpec, prepared: Prepared, opts: TrainOptions, tune: TuneOptions
) -> dict[str, Any]:
    """What a configuration's tuning results depend on (a study is reused only for the same)."""
    train = {
        k: v for k, v in asdict(opts).items() if k not in ("lr", "seed", "progress", "threads")
    }
    return {
        "spec": spec.to_dict(),
        "model": prepared.model,
        "data": data_fingerprint(prepared),
        "n_train": len(prepared.train),
        "train": train,
        "lr_range": [tune.lr_min, tune.lr_max],
        "scale_range": [tune.scale_min, tune.scale_max] if tune.tune_scale else None,
        "val_fraction": tune.val_fraction,
        "tune_seed": tune.tune_seed,
        "metric": metric_name(tune, prepared.task),
    }


def metric_name(opts: TuneOptions, task: str) -> str:
    """The trials' objective: ``accuracy`` or ``loss`` (``auto`` by task)."""
    if opts.metric != "auto":
        return opts.metric
    return "accuracy" if task == "classification" else "loss"


def run_trial(
    cs: ConfigStudy,
    trial: optuna.Trial,
    spec: AdapterSpec,
    tuning_data: Prepared,
    opts: TrainOptions,
    train_fn: Callable[..., dict[str, Any]],
    say: Callable[[str], None],
) -> None:
    """Train one trial on ``tuning_data`` (train part, scored on its validation part) and tell
    the study: the validation metric, or *pruned* when the run diverged.

    Any other error fails the trial (``FAIL``: another trial replaces it) and is raised.
    """
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    t = cs.opts
    lr = trial.suggest_float("lr", t.lr_min, t.lr_max, log=True)
    scale = (
        trial.suggest_float("scale", t.scale_min, t.scale_max, log=True) if t.tune_scale else None
    )
    one = with_scale(spec, scale) if scale is not None else spec
    metric = metric_name(t, tuning_data.task)
    shown = f"lr {lr:.3g}" + (f", scale {scale:.3g}" if scale is not None else "")
    t0 = time.perf_counter()
    try:
        with Heartbeat(trial, t.heartbeat_s):
            m = train_fn(
                one,
                tuning_data,
                replace(opts, lr=lr, seed=t.tune_seed, progress=False),
                out=None,
                log=None,
            )
    except (DivergenceError, NonFiniteError) as e:
        trial.set_user_attr("time_s", time.perf_counter() - t0)
        trial.set_user_attr("diverged", str(e)[:300])
        _tell(cs, trial, None, TrialState.PRUNED, UpdateFinishedTrialError, say)
        say(f"{cs.name} trial {trial.number}: {shown}: diverged (ranked last)")
        return
    except BaseException:
        _tell(cs, trial, None, TrialState.FAIL, UpdateFinishedTrialError, say)
        raise
    key = "eval_accuracy" if metric == "accuracy" else "eval_loss"
    value = float(m[key])
    trial.set_user_attr("time_s", time.perf_counter() - t0)
    trial.set_user_attr("steps", int(m["steps"]))
    trial.set_user_attr("val_loss", float(m["eval_loss"]))
    _tell(cs, trial, value, TrialState.COMPLETE, UpdateFinishedTrialError, say)
    say(
        f"{cs.name} trial {trial.number}: {shown}: validation {metric} {value:.4f} "
        f"({time.perf_counter() - t0:.1f} s)"
    )


def _tell(
    cs: ConfigStudy,
    trial: optuna.Trial,
    value: float | None,
    state: Any,
    finished_error: type[Exception],
    say: Callable[[str], None],
) -> None:
    try:
        cs.study.tell(trial, value, state=state)
    except finished_error:  # another worker judged it stale and failed it: the result is dropped
        say(f"{cs.name} trial {trial.number}: was failed as stale by another worker; dropped")


def write_tuning_csv(root: Path, studies: Mapping[str, ConfigStudy]) -> Path:
    """``tuning.csv`` in ``root``: every trial of every study (surplus trials left out)."""
    import csv

    rows = []
    for name, cs in studies.items():
        metric = "accuracy" if cs.study.direction.name == "MAXIMIZE" else "loss"
        for t in cs.trials():
            if t.user_attrs.get(_SURPLUS):
                continue
            note = str(t.user_attrs.get("diverged", ""))
            rows.append(
                {
                    "config": name,
                    "trial": t.number,
                    "state": t.state.name.lower() if not note else "diverged",
                    "lr": t.params.get("lr", ""),
                    "scale": t.params.get("scale", ""),
                    "metric": f"val_{metric}",
                    "value": "" if t.value is None else t.value,
                    "val_loss": t.user_attrs.get("val_loss", ""),
                    "time_s": round(float(t.user_attrs.get("time_s", 0.0)), 2),
                    "worker": t.user_attrs.get(_WORKER, ""),
                    "note": note,
                }
            )

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=TUNING_COLUMNS)
            w.writeheader()
            w.writerows(rows)

    path = root / TUNING_CSV
    atomic_write(path, write)
    return path
