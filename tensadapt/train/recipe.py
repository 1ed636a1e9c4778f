"""The training recipe of a run: the options given, else the spec's ``training:`` section, else the
defaults (:func:`resolve_recipe`); and the optimizer's parameter groups (:func:`param_groups`).

A paper's spec carries the recipe it was published with (``specs/papers/``); a command-line flag
(or a :class:`~tensadapt.train.options.TrainOptions` field that is not ``None``) overrides one key
of it and leaves the others in force. The effective recipe, and where each value came from, is
recorded in ``metrics.json``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .options import TrainOptions

if TYPE_CHECKING:
    import torch

    from ..spec import AdapterSpec

#: the recipe's keys (fields of both TrainOptions and the spec's TrainingSpec) and their defaults;
#: ``head_lr``/``head_weight_decay`` ``None``: the adapter's; ``max_length`` ``None``: what the
#: data was tokenised with (``--max-length``, default 128)
RECIPE_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "head_lr": None,
    "schedule": "linear",
    "warmup_ratio": 0.06,
    "epochs": 1.0,
    "batch_size": 16,
    "weight_decay": 0.0,
    "head_weight_decay": None,
    "max_length": None,
}
#: spec schedule -> the ``transformers`` scheduler (each after a linear warm-up)
SCHEDULES: dict[str, str] = {
    "linear": "linear",
    "cosine": "cosine",
    "constant": "constant_with_warmup",
}


@dataclass(frozen=True)
class Recipe:
    """The effective recipe of one run.

    Attributes:
        opts: the options with every recipe key set (``head_lr``/``head_weight_decay`` concrete:
            the adapter's when neither was given; ``max_length`` the tokens per example).
        source: recipe key -> ``"given"`` (a flag / an option), ``"spec"`` or ``"default"``.
    """

    opts: TrainOptions
    source: Mapping[str, str]

    def as_dict(self) -> dict[str, Any]:
        """``{key: value}`` of the recipe plus ``source`` (what ``metrics.json`` records)."""
        out: dict[str, Any] = {k: getattr(self.opts, k) for k in RECIPE_DEFAULTS}
        out["source"] = dict(self.source)
        return out


def resolve_recipe(
    opts: TrainOptions, spec: AdapterSpec | None, tokenised_at: int | None = None
) -> Recipe:
    """Each recipe key from ``opts`` when set, else the spec's ``training:``, else the default.

    Args:
        opts: the options given (``None`` fields: not given).
        spec: the adapter's spec (its ``training`` section may be ``None``).
        tokenised_at: ``max_length`` of the prepared data, the default of ``max_length``.
    Raises:
        OptionError: a value from the spec outside :data:`~tensadapt.train.options.BOUNDS`
            (e.g. ``weight_decay: 5``; the spec allows any non-negative decay).
    """
    training = spec.training if spec is not None else None
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    for key, default in RECIPE_DEFAULTS.items():
        given = getattr(opts, key)
        from_spec = getattr(training, key, None) if training is not None else None
        if given is not None:
            values[key], source[key] = given, "given"
        elif from_spec is not None:
            values[key], source[key] = from_spec, "spec"
        else:
            values[key], source[key] = default, "default"
    if values["max_length"] is None:
        values["max_length"] = tokenised_at
    if values["head_lr"] is None:
        values["head_lr"] = values["lr"]
    if values["head_weight_decay"] is None:
        values["head_weight_decay"] = values["weight_decay"]
    if isinstance(values["epochs"], int):
        values["epochs"] = float(values["epochs"])
    return Recipe(replace(opts, **values), source)


def param_groups(
    model: torch.nn.Module, adapter: Iterable[torch.nn.Parameter], opts: TrainOptions,
    decay_names: Iterable[str],
) -> list[dict[str, Any]]:  # fmt: skip
    """AdamW parameter groups: the adapter's factors at ``opts.lr`` and ``opts.weight_decay``, every
    other trainable parameter (``modules_to_save``, a new head) at ``opts.head_lr`` and
    ``opts.head_weight_decay``; in each, the parameters outside ``decay_names`` (biases, norms:
    the ``Trainer``'s rule) without decay. Empty groups are left out; each group has a ``name``.

    Args:
        model: the model being trained.
        adapter: the adapter's factors.
        opts: a resolved recipe's options (:attr:`Recipe.opts`).
        decay_names: names of the parameters weight decay applies to.
    """
    ids = {id(p) for p in adapter}
    decay = set(decay_names)
    lr, head_lr = opts.lr, opts.head_lr if opts.head_lr is not None else opts.lr
    wd = opts.weight_decay if opts.weight_decay is not None else 0.0
    head_wd = opts.head_weight_decay if opts.head_weight_decay is not None else wd
    groups: dict[str, dict[str, Any]] = {
        "adapter": {"params": [], "lr": lr, "weight_decay": wd},
        "adapter_no_decay": {"params": [], "lr": lr, "weight_decay": 0.0},
        "head": {"params": [], "lr": head_lr, "weight_decay": head_wd},
        "head_no_decay": {"params": [], "lr": head_lr, "weight_decay": 0.0},
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = "adapter" if id(p) in ids else "head"
        groups[key if name in decay else f"{key}_no_decay"]["params"].append(p)
    return [{"name": k, **g} for k, g in groups.items() if g["params"]]
