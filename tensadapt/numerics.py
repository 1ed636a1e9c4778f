"""Numerical health of an adapter during training: find NaN/inf in factors (and their gradients)
and say which tensor, at which step.

Use it from any loop::

    for step, batch in enumerate(loader):
        loss = model(**batch).loss
        loss.backward()
        check_finite(model, step, grads=True)   # before the optimizer turns a bad grad into bad factors
        opt.step(); opt.zero_grad()

or with the Hugging Face ``Trainer``: ``Trainer(..., callbacks=[FiniteCheckCallback()])``.
:class:`DivergenceCallback` stops a run whose loss explodes while staying finite (its docstring
defines "explodes"); ``tensadapt train`` adds both callbacks to every run.

Documented tolerances of reduced-precision forwards (checked by ``tests/test_numerics.py``): the
adapter update computed with factors and inputs in bfloat16 stays within :data:`TOLERANCES`
``["bfloat16"]`` relative Frobenius error of the float32 result, float16 within
``["float16"]``; these are a few units of each format's rounding (2⁻⁸ and 2⁻¹¹), amplified by the
length of the contraction.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .errors import DivergenceError, NonFiniteError

#: relative Frobenius error of a reduced-precision adapter update against float32
TOLERANCES: dict[str, float] = {"bfloat16": 3e-2, "float16": 5e-3}


def _named_factors(model_or_adapter: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``("tensor.factor", parameter)`` for every factor, plus ``modules_to_save`` parameters."""
    from .nn import AdapterHub, TensorAdapter, factor_items

    # the adapter itself, or the active one of a model (inside a wrapper: DDP/FSDP, the Trainer's)
    ad: TensorAdapter | None = (
        model_or_adapter if isinstance(model_or_adapter, TensorAdapter) else None
    )
    if ad is None:
        hub = next((m for m in model_or_adapter.modules() if isinstance(m, AdapterHub)), None)
        ad = hub.adapter() if hub is not None and hub.active is not None else None
    if ad is None:
        # no tensadapt adapter: check every trainable parameter
        for n, p in model_or_adapter.named_parameters():
            if p.requires_grad:
                yield n, p
        return
    seen: set[int] = set()
    for t, f, p in factor_items(ad):
        seen.add(id(p))
        yield f"{t}.{f}", p
    if ad is not model_or_adapter:
        for n, p in model_or_adapter.named_parameters():
            if p.requires_grad and id(p) not in seen:
                yield n, p


def _describe(x: torch.Tensor) -> str:
    n_nan = int(torch.isnan(x).sum())
    n_inf = int(torch.isinf(x).sum())
    parts = [f"{n_nan} NaN"] if n_nan else []
    parts += [f"{n_inf} inf"] if n_inf else []
    return f"{' and '.join(parts)} of {x.numel()} values"


def find_nonfinite(model: nn.Module, grads: bool = False) -> list[tuple[str, str]]:
    """Every factor (and, with ``grads``, gradient) holding NaN or inf.

    Args:
        model: a model carrying a tensadapt adapter (possibly wrapped by DDP), the
            :class:`~tensadapt.nn.TensorAdapter` itself, or any module (then every trainable
            parameter is checked).
        grads: check ``.grad`` too (those that exist).
    Returns:
        ``(name, description)`` pairs, e.g. ``("q_k_v_o.U_in", "3 NaN of 256 values")``; a
        gradient's name ends in ``.grad``. Empty when everything is finite.
    """
    bad: list[tuple[str, str]] = []
    with torch.no_grad():
        for name, p in _named_factors(model):
            if not bool(torch.isfinite(p).all()):
                bad.append((name, _describe(p)))
            g = p.grad
            if grads and g is not None and not bool(torch.isfinite(g).all()):
                bad.append((f"{name}.grad", _describe(g)))
    return bad


def check_finite(model: nn.Module, step: int | None = None, *, grads: bool = False) -> None:
    """Raise :class:`~tensadapt.errors.NonFiniteError` when a factor holds NaN or inf.

    Args:
        model: see :func:`find_nonfinite`.
        step: the training step, named in the message (``None``: not named).
        grads: check the gradients too.
    Raises:
        NonFiniteError: the message names every bad tensor and the step; ``.names`` and ``.step``
            carry them.
    """
    bad = find_nonfinite(model, grads=grads)
    if not bad:
        return
    where = f" at step {step}" if step is not None else ""
    listing = "; ".join(f"{n}: {d}" for n, d in bad[:8])
    more = f" (and {len(bad) - 8} more)" if len(bad) > 8 else ""
    raise NonFiniteError(
        f"non-finite values in adapter factors{where}: {listing}{more}. Lower the learning "
        "rate, use gradient clipping, or train the factors in float32",
        step=step,
        names=tuple(n for n, _ in bad),
    )


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``‖got − want‖_F / ‖want‖_F`` computed in float64 (0 when both are zero)."""
    g, w = got.detach().double(), want.detach().double()
    den = float(w.norm())
    num = float((g - w).norm())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


class FiniteCheckCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that stops training with a clear error on NaN/inf.

    After every ``every``-th optimizer step (``on_step_end``) it checks the adapter's factors and
    raises :class:`~tensadapt.errors.NonFiniteError` naming each bad factor and
    ``state.global_step``. With ``grads=True`` it also checks the gradients just before the
    optimizer step (``on_pre_optimizer_step``), so the report names the gradient that would have
    poisoned the factors.

    Args:
        every: check every this many steps (1 = every step).
        grads: also check gradients before each optimizer step.
    """

    def __init__(self, every: int = 1, grads: bool = False) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.grads = grads

    def on_pre_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: object,
    ) -> TrainerControl:
        model = kwargs.get("model")
        assert model is None or isinstance(model, nn.Module)
        if self.grads and model is not None:
            step = int(getattr(state, "global_step", 0)) + 1
            if step % self.every == 0:
                check_finite(model, step, grads=True)
        return control

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: object,
    ) -> TrainerControl:
        model = kwargs.get("model")
        assert model is None or isinstance(model, nn.Module)
        step = int(getattr(state, "global_step", 0))
        if model is not None and step % self.every == 0:
            check_finite(model, step)
        return control


class DivergenceCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that stops training when the loss explodes.

    NaN and inf are not the only way a run fails: with too high a learning rate the loss can
    climb to 1e6 and stay finite. "Explodes" is defined relative to where the run started:

    - the *reference* is the larger of the first logged training loss and ``chance_loss`` (the
      loss of a uniform guess: ``ln(num_labels)`` for classification, ``ln(vocab_size)`` for
      causal LM), so a run that starts unusually well is not held to a tiny bound;
    - a logged loss above ``factor × reference`` (default 10: for a 2-class task, a mean loss
      above 6.9, i.e. the right class given about 0.1 % probability) raises
      :class:`~tensadapt.errors.DivergenceError` naming the step, the loss and the limit;
    - a NaN or inf logged loss raises :class:`~tensadapt.errors.NonFiniteError`.

    The check runs on every log (``logging_steps=1`` in ``tensadapt train``: every optimizer
    step), before anything is saved, so a diverged run leaves no ``metrics.json``.

    Args:
        factor: how many times the reference a loss may reach (> 1).
        chance_loss: the uniform-guess loss of the task (``None``: the first loss alone).
    """

    def __init__(self, factor: float = 10.0, chance_loss: float | None = None) -> None:
        if not factor > 1:
            raise ValueError(f"factor must be > 1, got {factor}")
        self.factor = factor
        self.chance_loss = chance_loss
        self.reference: float | None = None

    @property
    def limit(self) -> float | None:
        """The loss above which training stops (``None`` before the first logged loss)."""
        return None if self.reference is None else self.factor * self.reference

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: object,
    ) -> TrainerControl:
        self.reference = None
        return control

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: object,
    ) -> TrainerControl:
        if not logs or "loss" not in logs:
            return control
        loss = float(logs["loss"])
        step = int(getattr(state, "global_step", 0))
        if not math.isfinite(loss):
            raise NonFiniteError(
                f"the training loss is {loss} at step {step}. Lower the learning rate, use "
                "gradient clipping, or train in float32",
                step=step,
                names=("loss",),
            )
        if self.reference is None:
            self.reference = max(loss, self.chance_loss or 0.0)
            return control
        limit = self.factor * self.reference
        if loss > limit:
            raise DivergenceError(
                f"training diverged at step {step}: loss {loss:.4g} is above {limit:.4g} "
                f"({self.factor:g} x the reference loss {self.reference:.4g}). Lower the "
                "learning rate (--lr) or warm up longer",
                step=step,
                loss=loss,
                limit=limit,
            )
        return control


__all__ = [
    "TOLERANCES",
    "DivergenceCallback",
    "FiniteCheckCallback",
    "check_finite",
    "find_nonfinite",
    "relative_error",
]
