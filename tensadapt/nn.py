"""Modules: :class:`TensorAdapter` holds every shared factor once; :class:`AdaptedLinear` wraps one
base module (a Linear, or GPT-2's fused Conv1D) and adds its targets' updates.

The forward never rebuilds an update tensor: each target contracts its input with the factors on
the path opt_einsum chooses for the real token count (compiled once per shape and cached). The
shared input stage ``z = dropout(x)·F_in`` is computed once per input tensor and reused by every
target that reads the same input (q, k and v of a layer), with one dropout mask per layer input.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import opt_einsum as oe
import torch
from torch import nn

from .factorizations.base import default_init
from .planner import Plan, Stage, TargetPlan


class TensorAdapter(nn.Module):
    """All factors of a plan, as ``factors[tensor][factor]`` parameters.

    Args:
        plan: the compiled plan.
        device, dtype: where and how to allocate the factors.
        generator: RNG for the default init (reproducible factors under a fixed seed).
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
        for tp in plan.tensors:
            net_init = default_init(_network(tp), generator=generator)
            self.factors[tp.name] = nn.ParameterDict(
                {
                    f.name: nn.Parameter(
                        net_init[f.name].to(device=device, dtype=dtype or torch.float32)
                    )
                    for f in tp.factors
                }
            )
        self.dropout = nn.Dropout(plan.spec.dropout) if plan.spec.dropout > 0 else nn.Identity()
        self.enabled = True
        self.init_report: Any = None  # tensadapt.init.InitReport, set by inject
        self._hook: Any = None
        self._exprs: dict[tuple[str, tuple[tuple[int, ...], ...]], Callable[..., torch.Tensor]] = {}
        self._x_cache: tuple[Any, int, torch.Tensor] | None = None
        self._z_cache: dict[str, tuple[Any, tuple[int, int, bool], torch.Tensor]] = {}

    # -- contraction -------------------------------------------------------------------------
    def _expr(
        self, stage: Stage, shapes: tuple[tuple[int, ...], ...]
    ) -> Callable[..., torch.Tensor]:
        key = (stage.equation, shapes)
        expr = self._exprs.get(key)
        if expr is None:
            expr = oe.contract_expression(stage.equation, *shapes, optimize="auto-hq")
            self._exprs[key] = expr
        return expr

    def _run(self, stage: Stage, operands: Sequence[torch.Tensor]) -> torch.Tensor:
        shapes = tuple(tuple(o.shape) for o in operands)
        return self._expr(stage, shapes)(*operands, backend="torch")

    def factor_operands(self, t: TargetPlan, names: Sequence[str]) -> list[torch.Tensor]:
        """The target's slices of the named factors (views; stacked axes indexed away)."""
        params: nn.ParameterDict = self.factors[t.tensor]  # type: ignore[assignment]
        sel = dict(t.selects)
        out = []
        for n in names:
            f = params[n]
            for dim, idx in sel[n]:
                f = f.select(dim, idx)
            out.append(f)
        return out

    def _dropped(self, x: torch.Tensor) -> torch.Tensor:
        """``dropout(x)``, one mask per input tensor (shared by the targets that read it)."""
        if isinstance(self.dropout, nn.Identity):
            return x
        c = self._x_cache
        if c is not None and c[0]() is x and c[1] == x._version:
            return c[2]
        xd = self.dropout(x)
        self._x_cache = (weakref.ref(x), x._version, xd)
        return xd

    def update(self, t: TargetPlan, x: torch.Tensor) -> torch.Tensor:
        """The target's update ``scaling · x·S``.

        Args:
            t: the target.
            x: input ``[..., in_features]``.
        Returns:
            ``[..., out_features]``.
        """
        lead = x.shape[:-1]
        xs_shape = t.stage_in.shapes[0][1:] if t.stage_in is not None else t.stage_out.shapes[0][1:]
        if t.stage_in is not None:
            z = self._shared_z(t, x)
            ops = self.factor_operands(t, t.stage_out.operands[1:])
            if not ops:  # F_in held every leg: the first stage already gave the update
                z = z * self.scaling
            y = self._run(t.stage_out, [z, *_scaled(ops, self.scaling)])
        else:
            xd = self._dropped(x).reshape(-1, *xs_shape)
            ops = self.factor_operands(t, t.stage_out.operands[1:])
            y = self._run(t.stage_out, [xd, *_scaled(ops, self.scaling)])
        return y.reshape(*lead, -1)

    def _shared_z(self, t: TargetPlan, x: torch.Tensor) -> torch.Tensor:
        assert t.stage_in is not None
        (fin,) = self.factor_operands(t, t.stage_in.operands[1:])
        version = (x._version, fin._version, torch.is_grad_enabled())
        c = self._z_cache.get(t.share_key)
        if c is not None and c[0]() is x and c[1] == version:
            return c[2]
        xd = self._dropped(x).reshape(-1, *t.stage_in.shapes[0][1:])
        z = self._run(t.stage_in, [xd, fin])
        self._z_cache[t.share_key] = (weakref.ref(x), version, z)
        return z

    def delta_slice(self, t: TargetPlan) -> torch.Tensor:
        """The target's update as a matrix ``S[in_features, out_features]`` (scaling included):
        ``update(x) = x·S``."""
        ops = self.factor_operands(t, t.delta.operands)
        s = self._run(t.delta, ops)
        return s.reshape(t.in_features, t.out_features) * self.scaling

    def delta_weight(self, t: TargetPlan) -> torch.Tensor:
        """``ΔW`` in the layout of the base weight (``[out, in]`` linear, ``[in, out]`` conv1d)."""
        s = self.delta_slice(t)  # [x_dim, y_dim] == [in, out] of the real matrix
        return s if t.layout == "conv1d" else s.t()

    def clear_cache(self) -> None:
        self._x_cache = None
        self._z_cache.clear()


def _scaled(ops: list[torch.Tensor], scaling: float) -> list[torch.Tensor]:
    """Fold ``scaling`` into the smallest operand (cheaper than scaling the output)."""
    if scaling == 1.0 or not ops:
        return ops
    i = min(range(len(ops)), key=lambda k: ops[k].numel())
    return [o * scaling if k == i else o for k, o in enumerate(ops)]


def _network(tp: Any) -> Any:
    from .factorizations.base import Network

    return Network(tp.factors, tp.axis_legs, tp.leg_sizes, tp.zero_factor)


class AdaptedLinear(nn.Module):
    """A base Linear/Conv1D plus the updates of its targets.

    ``forward(x) = base(x) + Σ_t update_t(x)`` placed at each target's output columns (GPT-2's fused
    ``c_attn`` holds q, k and v as three column blocks).

    Args:
        base: the wrapped module (kept as ``self.base``; its weights stay frozen).
        targets: the targets this module carries.
        adapter: the model's :class:`TensorAdapter` (held by reference, not as a submodule).
    """

    def __init__(
        self, base: nn.Module, targets: Sequence[TargetPlan], adapter: TensorAdapter
    ) -> None:
        super().__init__()
        self.base = base
        self.targets = tuple(sorted(targets, key=lambda t: (t.out_slice or (0, 0))[0]))
        object.__setattr__(self, "_adapter", adapter)
        self.merged = False
        w = self.weight
        self.out_features = w.shape[1] if self.targets[0].layout == "conv1d" else w.shape[0]
        self._full = len(self.targets) == 1 and self.targets[0].out_slice is None

    @property
    def adapter(self) -> TensorAdapter:
        ad: TensorAdapter = self.__dict__["_adapter"]
        return ad

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or not self.adapter.enabled:
            return y
        ups = [self.adapter.update(t, x).to(y.dtype) for t in self.targets]
        if self._full:
            return y + ups[0]
        return y + self._place(ups, y)

    def _place(self, ups: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        pieces = []
        pos = 0
        for t, u in zip(self.targets, ups, strict=True):
            a, b = t.out_slice or (0, self.out_features)
            if a > pos:
                pieces.append(y.new_zeros(*y.shape[:-1], a - pos))
            pieces.append(u)
            pos = b
        if pos < self.out_features:
            pieces.append(y.new_zeros(*y.shape[:-1], self.out_features - pos))
        return torch.cat(pieces, dim=-1)

    @torch.no_grad()
    def _apply_delta(self, sign: float) -> None:
        w = self.weight
        for t in self.targets:
            d = self.adapter.delta_weight(t).to(w.dtype) * sign
            a, b = t.out_slice or (0, self.out_features)
            if t.layout == "conv1d":
                w[:, a:b] += d
            else:
                w[a:b, :] += d

    def merge(self) -> None:
        """Add the updates into the base weight; the forward then costs exactly the base's.
        An NF4 base (:class:`~tensadapt.quant.NF4Linear`) first materialises a dense weight."""
        if not self.merged:
            materialize = getattr(self.base, "materialize", None)
            if materialize is not None:
                materialize()
            self._apply_delta(1.0)
            self.merged = True

    def unmerge(self) -> None:
        """Subtract the updates again, restoring the base weight (up to float rounding; an NF4
        base drops its dense weight and is back to its exact codes)."""
        if self.merged:
            release = getattr(self.base, "release", None)
            if release is not None:
                release()
            else:
                self._apply_delta(-1.0)
            self.merged = False

    def extra_repr(self) -> str:
        return f"targets={[t.key for t in self.targets]}, merged={self.merged}"


def factor_items(adapter: TensorAdapter) -> list[tuple[str, str, nn.Parameter]]:
    """``(tensor name, factor name, parameter)`` for every factor, in plan order."""
    out = []
    for tname, pd in adapter.factors.items():
        assert isinstance(pd, nn.ParameterDict)
        out += [(tname, fname, p) for fname, p in pd.items()]
    return out
