"""Put adapters on a model and take them off: ``inject``, ``merge``, ``unmerge``,
``merge_and_unload``, ``trainable_parameters``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import PlanError
from .nn import AdaptedLinear, TensorAdapter
from .planner import Plan, TargetPlan, plan
from .spec import AdapterSpec

#: attribute under which the shared :class:`TensorAdapter` lives on the model
ADAPTER_ATTR = "tensadapt_adapter"


def inject(
    model: nn.Module,
    spec: AdapterSpec | Plan | Mapping[str, Any] | str,
    *,
    seed: int | None = None,
) -> nn.Module:
    """Wrap every target of ``spec`` in ``model`` with an :class:`AdaptedLinear`.

    The shared factors are kept once, as ``model.tensadapt_adapter``; every other parameter is
    frozen except those of ``modules_to_save``. The model is changed in place and returned.

    Args:
        model: a Hugging Face (or any supported) transformer.
        spec: a spec (anything :func:`~tensadapt.load_spec` takes) or an already compiled plan.
        seed: seed of the factors' default init (``None``: torch's global RNG).
    Returns:
        the same model, adapted.
    """
    if hasattr(model, ADAPTER_ATTR):
        raise PlanError("model already has a tensadapt adapter; merge_and_unload() it first")
    p = spec if isinstance(spec, Plan) else plan(spec, model)
    from . import arch as arch_mod

    arch = arch_mod.from_model(model)
    paths = arch_mod.resolve_modules(model, arch)
    ref = next((prm for prm in model.parameters() if prm.is_floating_point()), None)
    device = ref.device if ref is not None else None
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    adapter = TensorAdapter(p, device=device, generator=gen)

    for prm in model.parameters():
        prm.requires_grad_(False)
    by_module: dict[str, list[TargetPlan]] = {}
    for t in p.targets:
        by_module.setdefault(paths[(t.layer, t.proj)], []).append(t)
    for name, ts in by_module.items():
        base = model.get_submodule(name)
        _set_module(model, name, AdaptedLinear(base, ts, adapter))
    setattr(model, ADAPTER_ATTR, adapter)
    if p.spec.init != "zeros" or p.spec.base != "fp":
        from .init import initialize

        initialize(adapted_modules(model), adapter, seed=seed)
    _unfreeze_modules_to_save(model, p.spec.modules_to_save)
    adapter._hook = adapter.attach(model)  # per-forward cache scope (shared x·P_in, masks)
    return model


def _clear_cache_hook(module: nn.Module, args: Any) -> None:
    ad = getattr(module, ADAPTER_ATTR, None)
    if ad is not None:
        ad.clear_cache()


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _unfreeze_modules_to_save(model: nn.Module, names: tuple[str, ...] | list[str]) -> None:
    for want in names:
        hits = [n for n, _ in model.named_modules() if n == want or n.endswith("." + want)]
        if not hits:
            raise PlanError(f"modules_to_save: no module named {want!r} in {type(model).__name__}")
        for n in hits:
            for prm in model.get_submodule(n).parameters():
                prm.requires_grad_(True)


def get_adapter(model: nn.Module) -> TensorAdapter:
    """The model's :class:`TensorAdapter`; raises if the model has none."""
    ad = getattr(model, ADAPTER_ATTR, None)
    if not isinstance(ad, TensorAdapter):
        raise PlanError(f"{type(model).__name__} has no tensadapt adapter (inject() it first)")
    return ad


def adapted_modules(model: nn.Module) -> list[tuple[str, AdaptedLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdaptedLinear)]


def merge(model: nn.Module) -> nn.Module:
    """Add every update into its base weight (inference then costs exactly the base model)."""
    for _, m in adapted_modules(model):
        m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`: subtract the updates, restoring the base weights."""
    for _, m in adapted_modules(model):
        m.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then replace every wrapper by its base module and drop the adapter."""
    for name, m in adapted_modules(model):
        m.merge()
        to_dense = getattr(m.base, "to_dense_module", None)  # NF4 base -> plain dense module
        _set_module(model, name, to_dense() if to_dense is not None else m.base)
    ad = getattr(model, ADAPTER_ATTR, None)
    if ad is not None:
        if ad._hook is not None:
            ad._hook.remove()
        delattr(model, ADAPTER_ATTR)
    return model


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad`` (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
