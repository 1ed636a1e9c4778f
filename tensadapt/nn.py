"""Modules: :class:`TensorAdapter` holds one adapter's factors; :class:`AdaptedLinear` wraps one
base module (a Linear, or a fused one such as GPT-2's ``Conv1D``) and adds the active adapter's
updates; :class:`SavedModule` keeps a trained copy of a ``modules_to_save`` module per adapter;
:class:`AdapterHub` holds every adapter of a model, which one is active, and the running frame.

The forward never rebuilds an update tensor: each target contracts its input with the factors
(see :mod:`tensadapt.executor`, which owns the per-forward work).
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import fused
from .executor import Executor, Frame
from .factorizations.base import default_init
from .planner import Plan, TargetPlan

if TYPE_CHECKING:
    from .init import InitReport
    from .registry import Initializer


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
    fn: Initializer | None = None
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
        self.init_report: InitReport | None = None  # set by a pretrained init
        self.executor = Executor(self)

    def params(self, tensor: str) -> nn.ParameterDict:
        """The factors of one tensor, by factor name."""
        found = self.factors[tensor]
        assert isinstance(found, nn.ParameterDict)
        return found

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


class Adapted(nn.Module, abc.ABC):
    """What every wrapper of a base module shares: the targets of each adapter in it, which one is
    merged, and merging (into the base weights the targets name, as :meth:`weight_of` gives them).

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
        #: fraction of the merged update lost to the weight's precision (see :meth:`merge`)
        self.merge_loss = 0.0

    @property
    def hub(self) -> AdapterHub:
        hub: AdapterHub = self.__dict__["_hub"]
        return hub

    @property
    def merged(self) -> bool:
        return self.merged_adapter is not None

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

    def set_targets(self, name: str, targets: Sequence[TargetPlan]) -> None:
        """Adapter ``name``'s targets in this module (the adapter must be in the hub already).

        The executor's :class:`~tensadapt.executor.Program` for them is built here, outside any
        forward, so that a forward traced by ``torch.compile`` only looks it up."""
        self.adapter_targets[name] = found = tuple(targets)
        self._prepare(name, found)

    def _prepare(self, name: str, targets: tuple[TargetPlan, ...]) -> None:
        """Build what a forward over ``targets`` looks up: the executor's program of the module's
        targets (a wrapper with its own forward over other groupings overrides this)."""
        self.hub.adapter(name).executor.program(targets)

    def active_targets(self) -> tuple[TensorAdapter, tuple[TargetPlan, ...]] | None:
        """The active adapter and its targets here, or ``None`` when the base alone runs
        (merged, adapters disabled, or the active adapter does not touch this module)."""
        hub = self.hub
        name = hub.active
        if self.merged_adapter is not None or not hub.enabled or name is None:
            return None
        targets = self.adapter_targets.get(name)
        if targets is None:
            return None
        return hub.adapters[name], targets  # type: ignore[return-value]

    # -- merging ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def weight_of(self, t: TargetPlan) -> torch.Tensor:
        """The base weight (a view) that target ``t``'s update merges into (each wrapper knows
        where its weights are)."""

    @abc.abstractmethod
    def _weights(self, name: str) -> list[torch.Tensor]:
        """The distinct base parameters adapter ``name`` merges into."""

    @torch.no_grad()
    def _apply_delta(self, name: str, sign: float) -> None:
        ad = self.hub.adapter(name)
        for t in self.adapter_targets[name]:
            w = self.weight_of(t)
            dim = 1 if t.layout == "conv1d" else 0
            fused.add_into(w, t.fused, dim, ad.delta_weight(t).to(w.dtype) * sign)

    @torch.no_grad()
    def _merge_low_precision(self, name: str) -> None:
        """Merge into 16-bit weights: ``W + ΔW`` computed in float32 and rounded once; the
        weights before the merge are kept so :meth:`unmerge` restores them bit for bit, and the
        part of ``ΔW`` the rounding loses is measured (:attr:`merge_loss`)."""
        ad = self.hub.adapter(name)
        params = self._weights(name)
        self._premerge = [p.detach().clone() for p in params]
        exact = {id(p): p.detach().to(torch.float32) for p in params}
        delta = {id(p): torch.zeros_like(exact[id(p)]) for p in params}
        for t in self.adapter_targets[name]:
            w = self.weight_of(t)
            owner = next(p for p in params if _shares_storage(w, p))
            dim = 1 if t.layout == "conv1d" else 0
            view = _same_view(delta[id(owner)], w, owner)
            fused.add_into(view, t.fused, dim, ad.delta_weight(t).to(torch.float32))
        lost = torch.zeros(())
        total = torch.zeros(())
        for p in params:
            merged = exact[id(p)] + delta[id(p)]
            p.copy_(merged.to(p.dtype))
            lost = lost + (p.to(torch.float32) - merged).square().sum()
            total = total + delta[id(p)].square().sum()
        self.merge_loss = float(lost.sqrt() / total.sqrt().clamp_min(1e-30))

    def merge(self, name: str | None = None) -> None:
        """Add an adapter's updates (default: the active one) into the base weights; the forward
        then costs exactly the base's. An NF4 base first materialises a dense weight; 16-bit
        weights are merged in float32 and rounded once, the loss measured in :attr:`merge_loss`
        (``‖round(W+ΔW) − (W+ΔW)‖ / ‖ΔW‖``: what fraction of the update the weights' precision
        cannot hold)."""
        name = name or self.hub.active
        if self.merged_adapter is not None or name is None or name not in self.adapter_targets:
            return
        materialize = getattr(self.base, "materialize", None)
        if materialize is not None:
            materialize()
        if any(w.dtype in (torch.float16, torch.bfloat16) for w in self._weights(name)):
            self._merge_low_precision(name)
        else:
            self._apply_delta(name, 1.0)
            self.merge_loss = 0.0
        self.merged_adapter = name

    def unmerge(self) -> None:
        """Subtract the merged updates again, restoring the base weights (16-bit ones exactly,
        from their copy; float32 ones up to float rounding; an NF4 base drops its dense weight
        and is back to its exact codes)."""
        name = self.merged_adapter
        if name is None:
            return
        release = getattr(self.base, "release", None)
        premerge = self.__dict__.pop("_premerge", None)
        if release is not None:
            release()
        elif premerge is not None:
            with torch.no_grad():
                for p, old in zip(self._weights(name), premerge, strict=True):
                    p.copy_(old)
        else:
            self._apply_delta(name, -1.0)
        self.merged_adapter = None

    def extra_repr(self) -> str:
        keys = {n: [t.key for t in ts] for n, ts in self.adapter_targets.items()}
        return f"targets={keys}, merged={self.merged_adapter}"


def _shares_storage(view: torch.Tensor, param: torch.Tensor) -> bool:
    return view.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()


def _same_view(full: torch.Tensor, view: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """The view of ``full`` (shaped like ``owner``) at the place ``view`` has in ``owner``."""
    offset = view.storage_offset() - owner.storage_offset()
    return full.as_strided(view.shape, view.stride(), full.storage_offset() + offset)


class AdaptedLinear(Adapted):
    """A base Linear/Conv1D plus the updates of the active adapter's targets in it.

    ``forward(x) = base(x) + Σ_t update_t(x)`` placed at each target's output rows (a fused module
    such as GPT-2's ``c_attn`` or BLOOM's ``query_key_value`` holds q, k and v).
    """

    def __init__(self, base: nn.Module, hub: AdapterHub) -> None:
        super().__init__(base, hub)
        self.inplace = _inplace_safe(base)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight  # type: ignore[return-value]

    @property
    def out_width(self) -> int:
        w = self.weight
        return int(w.shape[1] if self.layout == "conv1d" else w.shape[0])

    def weight_of(self, t: TargetPlan) -> torch.Tensor:
        return self.weight

    def _weights(self, name: str) -> list[torch.Tensor]:
        return [self.weight]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        found = self.active_targets()
        if found is None:
            return y
        ad, targets = found
        return ad.add_updates(targets, x, y, self.inplace, self.hub.frame)


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

    def forward(self, *args: Any, **kwargs: object) -> Any:
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
    "Adapted",
    "AdaptedLinear",
    "AdapterHub",
    "SavedModule",
    "TensorAdapter",
    "factor_items",
    "initial_factors",
]
