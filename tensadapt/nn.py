"""Modules: :class:`TensorAdapter` holds one adapter's factors; :class:`AdaptedLinear` wraps one
base module (a Linear, or a fused one such as GPT-2's ``Conv1D``) and adds the active adapter's
updates; :class:`SavedModule` keeps a trained copy of a ``modules_to_save`` module per adapter;
:class:`AdapterHub` holds every adapter of a model, which one is active, and the running frame.

The forward never rebuilds an update tensor: each target contracts its input with the factors
(see :mod:`tensadapt.executor`, which owns the per-forward work).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from . import fused
from .executor import Executor, Frame
from .factorizations.base import default_init
from .planner import Plan, TargetPlan


def initial_factors(
    plan: Plan, generator: torch.Generator | None
) -> dict[str, dict[str, torch.Tensor]]:
    """The factors every tensor starts from, before any pretrained initialiser runs.

    ``init: zeros`` and the pretrained initialisers (``svd``, ``mpo``, which overwrite the factors
    afterwards) start from :func:`~tensadapt.factorizations.base.default_init`; an initialiser
    registered as not ``pretrained`` (``lorta``, ``tenslora``, a plugin's) is called per tensor
    with ``full=None``.
    """
    init = plan.spec.init
    fn: Any = None
    if init != "zeros":
        from .init import is_pretrained
        from .plugins import initializer_registry

        reg = initializer_registry()
        if init in reg and not is_pretrained(reg.get(init)):
            fn = reg.get(init)
    out = {}
    for tp in plan.tensors:
        if fn is None:
            out[tp.name] = default_init(tp.network, generator=generator)
        else:
            out[tp.name] = dict(fn(plan.spec.factorization, tp.network, None, generator))
    return out


class TensorAdapter(nn.Module):
    """One adapter: the factors of a plan as ``factors[tensor][factor]`` parameters.

    Args:
        plan: the compiled plan.
        device, dtype: where and how to allocate the factors.
        generator: RNG for the initial factors (reproducible under a fixed seed).
    """

    def __init__(
        self,
        plan: Plan,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.plan = plan
        self.scaling = float(plan.spec.scaling)
        self.factors = nn.ModuleDict()
        start = initial_factors(plan, generator)
        for tp in plan.tensors:
            self.factors[tp.name] = nn.ParameterDict(
                {
                    f.name: nn.Parameter(
                        start[tp.name][f.name].to(device=device, dtype=dtype or torch.float32)
                    )
                    for f in tp.factors
                }
            )
        self.dropout_p = float(plan.spec.dropout)
        self.dropout = nn.Dropout(self.dropout_p) if self.dropout_p > 0 else nn.Identity()
        self.init_report: Any = None  # tensadapt.init.InitReport, set by a pretrained init
        self.executor = Executor(self)

    # -- what callers use -----------------------------------------------------------------------
    def add_updates(
        self,
        targets: tuple[TargetPlan, ...],
        x: torch.Tensor,
        y: torch.Tensor,
        inplace: bool,
        frame: Frame | None,
    ) -> torch.Tensor:
        """``y + Σ_t update_t(x)`` (see :meth:`tensadapt.executor.Executor.add_updates`)."""
        return self.executor.add_updates(targets, x, y, inplace, frame)

    def update(self, t: TargetPlan, x: torch.Tensor) -> torch.Tensor:
        """The target's update ``scaling · x·S`` on the path the forward takes, without a frame.

        Args:
            t: the target.
            x: input ``[..., in_features]``.
        Returns:
            ``[..., out_features]``.
        """
        n = x.numel() // x.shape[-1]
        kind = t.strategy(n)
        ex = self.executor
        if kind == "stages":
            return ex.stage_update(t, x, None)
        u = ex.left(t, kind, x, n, None) @ ex.right(t, kind, None).to(x.dtype)
        return u.reshape(*x.shape[:-1], -1)

    def reference_update(self, t: TargetPlan, x: torch.Tensor) -> torch.Tensor:
        """The straightforward contraction (see :meth:`Executor.reference_update`)."""
        return self.executor.reference_update(t, x)

    def factor_operands(self, t: TargetPlan, names: Sequence[str]) -> list[torch.Tensor]:
        """The target's slices of the named factors (views; stacked axes indexed away)."""
        return self.executor.operands(t, names)

    def delta_slice(self, t: TargetPlan) -> torch.Tensor:
        """The target's update as a matrix ``S[in_features, out_features]`` (scaling included):
        ``update(x) = x·S``."""
        return self.executor.delta_slice(t)

    def delta_weight(self, t: TargetPlan) -> torch.Tensor:
        """``ΔW`` in the layout of the base weight (``[out, in]`` linear, ``[in, out]`` conv1d),
        for this target's rows only."""
        s = self.delta_slice(t)  # [in, out] of the real matrix
        return s if t.layout == "conv1d" else s.t()

    def clear_cache(self) -> None:
        """Nothing to clear: per-forward state lives in a frame that ends with the forward."""


class AdapterHub(nn.Module):
    """Every adapter of one model, by name; which one is active; the running forward's frame.

    Registered on the base model as :data:`tensadapt.model.HUB_ATTR`, so the factors are part of
    the model's parameters. :class:`AdaptedLinear` and :class:`SavedModule` read it by reference.
    """

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.enabled = True
        self.frame: Frame | None = None

    def adapter(self, name: str | None = None) -> TensorAdapter:
        """The adapter called ``name`` (default: the active one)."""
        key = self.active if name is None else name
        if key is None or key not in self.adapters:
            from .errors import AdapterMismatchError

            raise AdapterMismatchError(
                f"no adapter named {key!r}; adapters: {', '.join(self.adapters) or 'none'}"
            )
        ad = self.adapters[key]
        assert isinstance(ad, TensorAdapter)
        return ad


#: base modules whose backward never reads their output, so updates may be added in place
def _inplace_safe(base: nn.Module) -> bool:
    from .quant import NF4Linear

    if isinstance(base, nn.Linear | NF4Linear):
        return True
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(base, Conv1D)


class AdaptedLinear(nn.Module):
    """A base Linear/Conv1D plus the updates of the active adapter's targets in it.

    ``forward(x) = base(x) + Σ_t update_t(x)`` placed at each target's output rows (a fused module
    such as GPT-2's ``c_attn`` or BLOOM's ``query_key_value`` holds q, k and v).

    Args:
        base: the wrapped module (kept as ``self.base``; its weights stay frozen).
        hub: the model's :class:`AdapterHub` (held by reference, not as a submodule).
    """

    def __init__(self, base: nn.Module, hub: AdapterHub) -> None:
        super().__init__()
        self.base = base
        object.__setattr__(self, "_hub", hub)
        #: adapter name -> this module's targets in it
        self.adapter_targets: dict[str, tuple[TargetPlan, ...]] = {}
        #: the adapter whose update is merged into the base weight, if any
        self.merged_adapter: str | None = None
        self.inplace = _inplace_safe(base)

    @property
    def hub(self) -> AdapterHub:
        hub: AdapterHub = self.__dict__["_hub"]
        return hub

    @property
    def merged(self) -> bool:
        return self.merged_adapter is not None

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight  # type: ignore[return-value]

    @property
    def targets(self) -> tuple[TargetPlan, ...]:
        """The active adapter's targets in this module (the first adapter's when it has none)."""
        found = self.adapter_targets.get(self.hub.active or "")
        if found is None:
            found = next(iter(self.adapter_targets.values()), ())
        return found

    @property
    def layout(self) -> str:
        return next(iter(self.adapter_targets.values()))[0].layout

    @property
    def out_width(self) -> int:
        w = self.weight
        return int(w.shape[1] if self.layout == "conv1d" else w.shape[0])

    def set_targets(self, name: str, targets: Sequence[TargetPlan]) -> None:
        """Adapter ``name``'s targets in this module (the adapter must be in the hub already).

        The executor's :class:`~tensadapt.executor.Program` for them is built here, outside any
        forward, so that a forward traced by ``torch.compile`` only looks it up."""
        self.adapter_targets[name] = found = tuple(targets)
        self.hub.adapter(name).executor.program(found)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        hub = self.hub
        name = hub.active
        if self.merged_adapter is not None or not hub.enabled or name is None:
            return y
        targets = self.adapter_targets.get(name)
        if targets is None:
            return y
        ad = hub.adapters[name]
        return ad.add_updates(targets, x, y, self.inplace, hub.frame)  # type: ignore[operator,no-any-return]

    @torch.no_grad()
    def _apply_delta(self, name: str, sign: float) -> None:
        w = self.weight
        ad = self.hub.adapter(name)
        dim = 1 if self.layout == "conv1d" else 0
        for t in self.adapter_targets[name]:
            fused.add_into(w, t.fused, dim, ad.delta_weight(t).to(w.dtype) * sign)

    def merge(self, name: str | None = None) -> None:
        """Add an adapter's updates (default: the active one) into the base weight; the forward
        then costs exactly the base's. An NF4 base first materialises a dense weight."""
        name = name or self.hub.active
        if self.merged_adapter is not None or name is None or name not in self.adapter_targets:
            return
        materialize = getattr(self.base, "materialize", None)
        if materialize is not None:
            materialize()
        self._apply_delta(name, 1.0)
        self.merged_adapter = name

    def unmerge(self) -> None:
        """Subtract the merged updates again, restoring the base weight (up to float rounding; an
        NF4 base drops its dense weight and is back to its exact codes)."""
        name = self.merged_adapter
        if name is None:
            return
        release = getattr(self.base, "release", None)
        if release is not None:
            release()
        else:
            self._apply_delta(name, -1.0)
        self.merged_adapter = None

    def extra_repr(self) -> str:
        keys = {n: [t.key for t in ts] for n, ts in self.adapter_targets.items()}
        return f"targets={keys}, merged={self.merged_adapter}"


class SavedModule(nn.Module):
    """A ``modules_to_save`` module: the original, frozen, plus one trained copy per adapter.

    The forward runs the active adapter's copy (the original when adapters are disabled or the
    active adapter saves no copy), as PEFT does, so adapters never overwrite each other's heads
    and ``disable_adapter()`` gives the base model back. Attribute reads fall through to the
    module that would run.

    Args:
        original: the module being saved.
        hub: the model's :class:`AdapterHub` (held by reference).
    """

    def __init__(self, original: nn.Module, hub: AdapterHub) -> None:
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        object.__setattr__(self, "_hub", hub)
        for p in original.parameters():
            p.requires_grad_(False)

    def add(self, name: str) -> nn.Module:
        """A trainable copy of the original for adapter ``name``."""
        dup = copy.deepcopy(self.original)
        for p in dup.parameters():
            p.requires_grad_(True)
        self.copies[name] = dup
        return dup

    def current(self) -> nn.Module:
        hub: AdapterHub = self.__dict__["_hub"]
        if hub.enabled and hub.active is not None and hub.active in self.copies:
            return self.copies[hub.active]
        return self.original

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.current()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or name in ("original", "copies", "_hub"):
                raise
            return getattr(self.current(), name)


def factor_items(adapter: TensorAdapter) -> list[tuple[str, str, nn.Parameter]]:
    """``(tensor name, factor name, parameter)`` for every factor, in plan order."""
    out = []
    for tname, pd in adapter.factors.items():
        assert isinstance(pd, nn.ParameterDict)
        out += [(tname, fname, p) for fname, p in pd.items()]
    return out


__all__ = [
    "AdaptedLinear",
    "AdapterHub",
    "SavedModule",
    "TensorAdapter",
    "factor_items",
    "initial_factors",
]
