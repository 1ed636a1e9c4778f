"""Adapters on a model in place: put them on (:func:`attach`, :func:`inject`), find them
(:func:`hub_of`, :func:`get_adapter`, :func:`adapted_modules`), merge and unmerge them, take them off
(:func:`merge_and_unload`), and the guard that makes the HF ``save_pretrained`` of an adapted model
refuse instead of losing the adapter.

This is the layer :class:`tensadapt.model.TensadaptModel` is built on, and the first API of
tensadapt: a model changed by these functions computes the same outputs as the object, without the
object's per-forward sharing of ``x·P_in`` (the object opens the executor's frame).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from .errors import PlanError, TensadaptError
from .experts import AdaptedExperts
from .heads import with_new_modules
from .nn import Adapted, AdaptedLinear, AdapterHub, SavedModule, TensorAdapter
from .planner import Plan, TargetPlan, plan
from .spec import AdapterSpec, load_spec

#: attribute under which the :class:`AdapterHub` lives on the base model
HUB_ATTR = "tensadapt_adapters"
#: the adapter name used when none is given
DEFAULT_ADAPTER = "default"

SpecLike = AdapterSpec | Plan | Mapping[str, Any] | str | os.PathLike[str]


# -- in place ------------------------------------------------------------------------------------
def hub_of(model: nn.Module) -> AdapterHub | None:
    """The model's :class:`AdapterHub`, or ``None``."""
    hub = getattr(model, HUB_ATTR, None)
    return hub if isinstance(hub, AdapterHub) else None


def unwrapped(model: nn.Module) -> nn.Module:
    """The base model of a :class:`~tensadapt.model.TensadaptModel`; any other model as it is."""
    from .model import TensadaptModel  # the object is built on this module, not the reverse

    return model.base_model if isinstance(model, TensadaptModel) else model


def get_adapter(model: nn.Module, name: str | None = None) -> TensorAdapter:
    """A :class:`TensorAdapter` of the model (default: the active one)."""
    model = unwrapped(model)
    hub = hub_of(model)
    if hub is None or not hub.adapters:
        raise PlanError(f"{type(model).__name__} has no tensadapt adapter (inject() it first)")
    return hub.adapter(name)


def adapted_modules(model: nn.Module) -> list[tuple[str, Adapted]]:
    """``(path, wrapper)`` of every adapted module (linear or experts)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Adapted)]


def saved_modules(model: nn.Module) -> list[tuple[str, SavedModule]]:
    """``(path, SavedModule)`` of every ``modules_to_save`` wrapper."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SavedModule)]


def attach(
    model: nn.Module,
    spec: SpecLike,
    name: str = DEFAULT_ADAPTER,
    *,
    seed: int | None = None,
    detect_new_modules: bool = True,
) -> TensorAdapter:
    """Add adapter ``name`` to ``model`` in place: wrap its targets, keep its factors in the
    model's :class:`AdapterHub`, copy its ``modules_to_save``. The first adapter becomes active.

    Args:
        model: a Hugging Face (or any supported) transformer.
        spec: a spec (anything :func:`~tensadapt.load_spec` takes) or a compiled plan.
        name: the adapter's name.
        seed: seed of the factors' initialisation (``None``: torch's global RNG).
        detect_new_modules: add modules ``from_pretrained`` initialised fresh (a new head) to
            ``modules_to_save`` (see :func:`tensadapt.heads.new_modules`).
    Returns:
        the new :class:`TensorAdapter`.
    Raises:
        PlanError: the name is taken, the spec does not fit the model, or a pretrained init
            (which rewrites the base weights into a residual) is combined with another adapter.
    """
    from . import arch as arch_mod

    hub = hub_of(model)
    if hub is not None and name in hub.adapters:
        raise PlanError(f"adapter {name!r} already exists; adapters: {', '.join(hub.adapters)}")
    p = spec if isinstance(spec, Plan) else plan(_spec(spec), model)
    arch = arch_mod.from_model(model)
    paths = arch_mod.resolve_modules(model, arch)
    if detect_new_modules:
        targeted = {paths[(t.layer, t.proj)] for t in p.targets}
        s2 = with_new_modules(p.spec, model, targeted)
        if s2 is not p.spec:
            p = plan(s2, model)
    rewrites = p.spec.init != "zeros" and _is_pretrained_init(p.spec.init)
    if hub is not None and hub.adapters and (rewrites or p.spec.base != "fp"):
        raise PlanError(
            f"adapter {name!r}: init {p.spec.init!r} / base {p.spec.base!r} rewrites the base "
            "weights, so it cannot share a model with other adapters; use a fresh base model"
        )
    if hub is not None and any(
        a.plan.spec.init != "zeros"
        and _is_pretrained_init(a.plan.spec.init)
        or a.plan.spec.base != "fp"
        for a in hub.adapters.values()
        if isinstance(a, TensorAdapter)
    ):
        raise PlanError(
            f"adapter {name!r}: the model's adapter rewrote the base weights (pretrained init "
            "or NF4 base); another adapter cannot share them"
        )
    if (rewrites or p.spec.base != "fp") and any(t.experts is not None for t in p.targets):
        raise PlanError(
            f"init {p.spec.init!r} / base {p.spec.base!r}: pretrained inits and NF4 bases are not "
            "supported on expert targets (expert_gate, expert_up, expert_down) yet"
        )
    ref = next((prm for prm in model.parameters() if prm.is_floating_point()), None)
    device = ref.device if ref is not None else None
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    adapter = TensorAdapter(p, device=device, generator=gen)

    if hub is None:
        hub = AdapterHub()
        setattr(model, HUB_ATTR, hub)
        for prm in model.parameters():
            prm.requires_grad_(False)
        _guard_hf_save(model)
    hub.adapters[name] = adapter
    by_module: dict[str, list[TargetPlan]] = {}
    for t in p.targets:
        by_module.setdefault(paths[(t.layer, t.proj)], []).append(t)
    for path, ts in by_module.items():
        mod = model.get_submodule(path)
        if not isinstance(mod, Adapted):
            kind = AdaptedExperts if ts[0].experts is not None else AdaptedLinear
            mod = kind(mod, hub)
            _set_module(model, path, mod)
        mod.set_targets(name, ts)
    for want in p.spec.modules_to_save:
        hits = _saved_paths(model, want)
        if not hits:
            _remove(model, hub, name)
            raise PlanError(f"modules_to_save: no module named {want!r} in {type(model).__name__}")
        for path in hits:
            mod = model.get_submodule(path)
            if not isinstance(mod, SavedModule):
                mod = SavedModule(mod, hub)
                _set_module(model, path, mod)
            mod.add(name)
    if hub.active is None:
        hub.active = name
    _set_trainable(model, hub)
    if rewrites or p.spec.base != "fp":
        from .init import initialize

        linear = [(n, m) for n, m in adapted_modules(model) if isinstance(m, AdaptedLinear)]
        initialize(linear, adapter, seed=seed)
    return adapter


def _is_pretrained_init(init: str) -> bool:
    if init == "zeros":
        return False
    from .init import is_pretrained
    from .plugins import initializer_registry

    reg = initializer_registry()
    return is_pretrained(reg.get(init)) if init in reg else True


def _spec(spec: SpecLike) -> AdapterSpec:
    if isinstance(spec, AdapterSpec):
        return spec
    if isinstance(spec, os.PathLike):
        return load_spec(Path(spec))
    return load_spec(spec)  # type: ignore[arg-type]


def _saved_paths(model: nn.Module, want: str) -> list[str]:
    """Paths of the modules a ``modules_to_save`` entry names (a SavedModule counts as its
    original's path; nothing inside a SavedModule or the hub matches)."""
    out = []
    for n, m in model.named_modules():
        if not n or f"{HUB_ATTR}." in f"{n}." or ".copies." in f"{n}." or ".original" in n:
            continue
        if (n == want or n.endswith("." + want)) and not isinstance(m, Adapted):
            out.append(n)
    return out


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _set_trainable(model: nn.Module, hub: AdapterHub) -> None:
    """Only the active adapter's factors and its ``modules_to_save`` copies train."""
    for n, ad in hub.adapters.items():
        for prm in ad.parameters():
            prm.requires_grad_(n == hub.active)
    for _, sm in saved_modules(model):
        for n, dup in sm.copies.items():
            for prm in dup.parameters():
                prm.requires_grad_(n == hub.active)


def _remove(model: nn.Module, hub: AdapterHub, name: str) -> None:
    """Take adapter ``name`` off: its targets, its saved copies, its factors."""
    for path, m in adapted_modules(model):
        if m.merged_adapter == name:
            m.unmerge()
        m.adapter_targets.pop(name, None)
        if not m.adapter_targets:
            _set_module(model, path, _dense(m.base))
    for path, sm in saved_modules(model):
        if name in sm.copies:
            del sm.copies[name]
        if not len(sm.copies):
            _set_module(model, path, sm.original)
    if name in hub.adapters:
        del hub.adapters[name]
    if hub.active == name:
        hub.active = next(iter(hub.adapters), None)


def _dense(base: nn.Module) -> nn.Module:
    to_dense = getattr(base, "to_dense_module", None)  # NF4 base -> plain dense module
    return to_dense() if to_dense is not None else base


def _refuse_hf_save(*args: object, **kwargs: object) -> NoReturn:
    raise TensadaptError(
        "this model carries a tensadapt adapter: transformers' save_pretrained would write the "
        "wrapped weights under names from_pretrained does not know and drop the adapter. Save "
        "the adapter with TensadaptModel.save_pretrained(dir) (or tensadapt.save_adapter(model, "
        "dir)), or call merge_and_unload() first and save the merged model"
    )


def _guard_hf_save(model: nn.Module) -> None:
    if callable(getattr(type(model), "save_pretrained", None)):
        object.__setattr__(model, "save_pretrained", _refuse_hf_save)


def _unguard_hf_save(model: nn.Module) -> None:
    if model.__dict__.get("save_pretrained") is _refuse_hf_save:
        del model.__dict__["save_pretrained"]


def inject(model: nn.Module, spec: SpecLike, *, seed: int | None = None) -> nn.Module:
    """Wrap every target of ``spec`` in ``model`` (in place) and return the model.

    The factors live in the model's :class:`AdapterHub`; every other parameter is frozen except the
    ``modules_to_save`` copies. Prefer :class:`TensadaptModel`, whose forward also shares the
    per-forward work (``x·P_in`` for q, k and v); the outputs are the same.

    Args:
        model: a Hugging Face (or any supported) transformer.
        spec: a spec (anything :func:`~tensadapt.load_spec` takes) or an already compiled plan.
        seed: seed of the factors' default init (``None``: torch's global RNG).
    Returns:
        the same model, adapted.
    """
    if hub_of(model) is not None:
        raise PlanError("model already has a tensadapt adapter; merge_and_unload() it first")
    attach(model, spec, DEFAULT_ADAPTER, seed=seed)
    return model


class MergePrecisionWarning(UserWarning):
    """Merging into low-precision weights lost a measurable part of the update."""


#: the fraction of ``ΔW`` a merge may lose to rounding before it warns
MERGE_LOSS_WARN = 0.01


def merge(model: nn.Module) -> nn.Module:
    """Add the active adapter's updates into the base weights (inference then costs exactly the
    base model). Into 16-bit weights the sum is formed in float32 and rounded once; when the
    rounding loses more than :data:`MERGE_LOSS_WARN` of an update (bfloat16 keeps ~3 significant
    digits of ``W``, so an update 1000 times smaller than ``W`` is mostly rounded away), a
    :class:`MergePrecisionWarning` says how much and where."""
    base = unwrapped(model)
    hub = hub_of(base)
    worst: tuple[float, str, str] = (0.0, "", "")
    for name, m in adapted_modules(base):
        m.merge(hub.active if hub is not None else None)
        dtype = next((p.dtype for p in m.base.parameters()), torch.float32)
        worst = max(worst, (m.merge_loss, name, str(dtype).removeprefix("torch.")))
    if worst[0] > MERGE_LOSS_WARN:
        warnings.warn(
            f"merging into {worst[2]} weights lost up to "
            f"{100 * worst[0]:.1f}% of the update (module {worst[1]}): the weights' precision "
            "cannot hold it. Keep the adapter unmerged, or merge into float32 weights",
            MergePrecisionWarning,
            stacklevel=2,
        )
    return model


def merge_loss(model: nn.Module) -> float:
    """The largest fraction of a merged update that rounding lost, over the merged modules."""
    base = unwrapped(model)
    return max((m.merge_loss for _, m in adapted_modules(base) if m.merged), default=0.0)


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`: subtract the updates, restoring the base weights."""
    base = unwrapped(model)
    for _, m in adapted_modules(base):
        m.unmerge()
    return model


def merge_and_unload(
    model: nn.Module, *, merge_weights: bool = True, keep_trained_copies: bool | None = None
) -> nn.Module:
    """Merge the active adapter (unless ``merge_weights=False``), then replace every wrapper by its
    base module (an NF4 base by a dense one) and every ``modules_to_save`` wrapper by the active
    adapter's trained copy (or the original, with ``keep_trained_copies=False``; by default the
    copies are kept when merging), and drop the adapters. Returns the plain base model."""
    keep = merge_weights if keep_trained_copies is None else keep_trained_copies
    base = unwrapped(model)
    hub = hub_of(base)
    if merge_weights:
        merge(base)  # warns when low-precision weights cannot hold the update
    active = hub.active if hub is not None else None
    for name, m in adapted_modules(base):
        if merge_weights:
            m.merge(active)
        elif m.merged:
            m.unmerge()
        _set_module(base, name, _dense(m.base))
    for name, sm in saved_modules(base):
        use_copy = keep and active is not None and active in sm.copies
        _set_module(base, name, sm.copies[active] if use_copy and active else sm.original)
    if hub is not None:
        delattr(base, HUB_ATTR)
    _unguard_hf_save(base)
    return base


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad`` (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _checkpointing(model: nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on (transformers' newer name first)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if isinstance(getattr(type(model), name, None), property):
            return bool(getattr(model, name))
    return False


__all__ = [
    "DEFAULT_ADAPTER",
    "HUB_ATTR",
    "MERGE_LOSS_WARN",
    "MergePrecisionWarning",
    "adapted_modules",
    "attach",
    "get_adapter",
    "hub_of",
    "inject",
    "merge",
    "merge_and_unload",
    "merge_loss",
    "saved_modules",
    "trainable_parameters",
    "unmerge",
]
