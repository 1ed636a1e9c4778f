"""How to train (:class:`TrainOptions`) and the range of every numeric option, checked in one place.

:data:`BOUNDS` is the single table of ranges: :class:`TrainOptions` and
:class:`~tensadapt.train.data.DataOptions` check themselves against it when built (from Python,
from the command line, or merged with a spec's ``training:`` section by
:func:`~tensadapt.train.recipe.resolve_recipe`), and the command line's
parser uses it for its ``type=`` functions, so ``--grad-accum 0`` is refused by name before
anything is read or built. This module imports nothing heavy (the CLI's ``--help`` loads it).
"""

from __future__ import annotations

import argparse
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from ..errors import TensadaptError

#: the largest seed every library in the loop accepts (numpy's legacy seeding: < 2**32)
MAX_SEED = 2**32 - 1
MIXED_PRECISION: tuple[str, ...] = ("no", "bf16", "fp16")


class OptionError(TensadaptError, ValueError):
    """A training option out of range; the message names the option and its flag."""


@dataclass(frozen=True)
class Bound:
    """The range of one numeric option.

    Attributes:
        kind: ``int`` or ``float``.
        lo: smallest value (excluded when ``lo_open``).
        hi: largest value.
        why: said when ``hi`` is exceeded (why larger values are refused).
    """

    kind: type
    lo: float
    hi: float
    lo_open: bool = False
    why: str = ""

    def describe(self) -> str:
        lo = f"> {self.lo:g}" if self.lo_open else f">= {self.lo:g}"
        return f"{'an integer' if self.kind is int else 'a number'} {lo} and <= {self.hi:g}"

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` (``None`` when it is in range)."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"must be {self.describe()}, got {value!r}"
        if self.kind is int and not isinstance(value, numbers.Integral):
            return f"must be {self.describe()}, got {value!r}"
        try:
            x = float(value)
        except OverflowError:  # an integer beyond any float
            return f"must be {self.describe()}, got an integer of more than 300 digits"
        if not math.isfinite(x):
            return f"must be a finite number, got {value!r}"
        low = x <= self.lo if self.lo_open else x < self.lo
        if low or x > self.hi:
            why = f" ({self.why})" if x > self.hi and self.why else ""
            return f"must be {self.describe()}, got {x:g}{why}"
        return None


#: option name (a field of TrainOptions or DataOptions) -> its range
BOUNDS: dict[str, Bound] = {
    "epochs": Bound(float, 0, 10_000, lo_open=True),
    "max_steps": Bound(int, 1, 10**9),
    "batch_size": Bound(int, 1, 1 << 20),
    "eval_batch_size": Bound(int, 1, 1 << 20),
    "grad_accum": Bound(int, 1, 1 << 16),
    "lr": Bound(
        float, 0, 1.0, lo_open=True, why="a learning rate above 1 only diverges with AdamW"
    ),
    "head_lr": Bound(
        float, 0, 1.0, lo_open=True, why="a learning rate above 1 only diverges with AdamW"
    ),
    "weight_decay": Bound(float, 0, 1.0),
    "head_weight_decay": Bound(float, 0, 1.0),
    "warmup_ratio": Bound(float, 0, 0.99),
    "seed": Bound(int, 0, MAX_SEED),
    "save_steps": Bound(int, 1, 10**9),
    "save_total_limit": Bound(int, 1, 10**6),
    "threads": Bound(int, 1, 4096),
    "max_length": Bound(int, 1, 1 << 20),
    "max_train": Bound(int, 1, 10**12),
    "max_eval": Bound(int, 1, 10**12),
    "seeds": Bound(int, 1, 1000),
    "steps": Bound(int, 1, 10**9),
    "rank": Bound(int, 1, 1 << 20),
    "params": Bound(int, 1, 10**13),
    # sweep --tune-lr (tensadapt.train.tuning.TuneOptions)
    "trials": Bound(int, 1, 100_000),
    "lr_min": Bound(float, 0, 1.0, lo_open=True),
    "lr_max": Bound(float, 0, 1.0, lo_open=True),
    "scale": Bound(float, 0, 1e4, lo_open=True),
    "scale_min": Bound(float, 0, 1e4, lo_open=True),
    "scale_max": Bound(float, 0, 1e4, lo_open=True),
    "val_fraction": Bound(float, 0, 0.5, lo_open=True, why="the trials must train on most data"),
    "tune_seed": Bound(int, 0, MAX_SEED),
}


def flag(name: str) -> str:
    """The command-line flag of an option: ``grad_accum`` -> ``--grad-accum``."""
    return "--" + name.replace("_", "-")


def check(obj: Any, error: type[TensadaptError]) -> None:
    """Check every bounded, non-``None`` field of a dataclass; raise ``error`` naming each problem."""
    problems = []
    for f in fields(obj):
        bound = BOUNDS.get(f.name)
        value = getattr(obj, f.name)
        if bound is not None and value is not None:
            p = bound.problem(value)
            if p:
                problems.append(f"{f.name} ({flag(f.name)}) {p}")
    if problems:
        raise error("; ".join(problems))


def arg_type(name: str) -> Callable[[str], int | float]:
    """An argparse ``type=`` function parsing and range-checking option ``name`` (see BOUNDS).

    A refused value exits 2 with ``argument --NAME: must be ..., got ...``: argparse names the flag.
    """
    bound = BOUNDS[name]

    def parse(text: str) -> int | float:
        try:
            value: int | float = bound.kind(text.strip())
        except ValueError:  # also integers of more than 4,300 digits
            shown = text if len(text) <= 40 else text[:37] + "..."
            raise argparse.ArgumentTypeError(f"must be {bound.describe()}, got {shown!r}") from None
        problem = bound.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = name  # argparse shows it in "invalid <name> value" messages
    return parse


#: learning-rate schedules (after a linear warm-up)
SCHEDULE_NAMES: tuple[str, ...] = ("linear", "cosine", "constant")


@dataclass(frozen=True)
class TrainOptions:
    """How to train (every field is range-checked against :data:`BOUNDS` when built).

    The recipe keys (``lr``, ``head_lr``, ``schedule``, ``warmup_ratio``, ``epochs``,
    ``batch_size``, ``weight_decay``, ``head_weight_decay``, ``max_length``) default to ``None``:
    not given. A run takes each from here when set, else from the spec's ``training:`` section,
    else from :data:`tensadapt.train.recipe.RECIPE_DEFAULTS` (see
    :func:`~tensadapt.train.recipe.resolve_recipe`).

    Attributes:
        epochs: passes over the training data (ignored when ``max_steps`` is set); default 1.
        max_steps: optimizer steps; overrides ``epochs`` (``None``: train ``epochs``).
        batch_size: examples per device step; ``grad_accum`` steps make one optimizer step;
            default 16.
        eval_batch_size: examples per evaluation step.
        lr: peak learning rate of the adapter's factors (warm-up over ``warmup_ratio`` of the
            steps, then ``schedule``); default 1e-3.
        head_lr: peak learning rate of the modules trained in full (``modules_to_save``, a new
            classification head); default: ``lr``.
        schedule: ``linear`` (default), ``cosine`` or ``constant`` decay after the warm-up.
        weight_decay: AdamW weight decay of the adapter's factors; default 0.
        head_weight_decay: AdamW weight decay of the modules trained in full; default:
            ``weight_decay``. Biases and norms never decay.
        warmup_ratio: fraction of the steps spent warming the learning rate up; default 0.06.
        max_length: tokens per example; default: what the data was tokenised with.
        grad_accum: batches accumulated into one optimizer step.
        seed: seeds the base model's random weights / new head, the adapter init and data order.
        save_steps: write a checkpoint (adapter, optimizer, scheduler, RNG) every N optimizer
            steps into the output directory's ``checkpoints/`` (``None``: none).
        save_total_limit: keep only the last N checkpoints (``None``: all).
        mixed_precision: ``no``, ``bf16`` or ``fp16`` (fp16 needs a GPU).
        threads: torch CPU threads (``None``: leave as is).
        progress: show the progress bar.
        divergence_factor: stop with :class:`~tensadapt.errors.DivergenceError` when a step's
            loss exceeds this many times its reference (see
            :class:`~tensadapt.numerics.DivergenceCallback`); ``None`` disables the check.

    Raises:
        OptionError: a value out of range (every problem named, with its flag).
    """

    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    eval_batch_size: int = 64
    lr: float | None = None
    head_lr: float | None = None
    schedule: str | None = None
    weight_decay: float | None = None
    head_weight_decay: float | None = None
    warmup_ratio: float | None = None
    max_length: int | None = None
    grad_accum: int = 1
    seed: int = 0
    save_steps: int | None = None
    save_total_limit: int | None = None
    mixed_precision: str = "no"
    threads: int | None = None
    progress: bool = True
    divergence_factor: float | None = 10.0

    def __post_init__(self) -> None:
        check(self, OptionError)
        if self.mixed_precision not in MIXED_PRECISION:
            raise OptionError(
                f"mixed_precision (--mixed-precision) must be one of {', '.join(MIXED_PRECISION)}, "
                f"got {self.mixed_precision!r}"
            )
        if self.schedule is not None and self.schedule not in SCHEDULE_NAMES:
            raise OptionError(
                f"schedule (--schedule) must be one of {', '.join(SCHEDULE_NAMES)}, "
                f"got {self.schedule!r}"
            )
        if self.divergence_factor is not None and not self.divergence_factor > 1:
            raise OptionError(f"divergence_factor must be > 1, got {self.divergence_factor!r}")
