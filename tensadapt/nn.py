"""Modules: :class:`TensorAdapter` holds every shared factor once; :class:`AdaptedLinear` wraps one
base module (a Linear, or GPT-2's fused Conv1D) and adds its targets' updates.

The forward never rebuilds an update tensor: each target contracts its input with the factors on
the path opt_einsum chooses for the real token count (compiled once per shape and cached). The
shared input stage ``z = dropout(x)·F_in`` is computed once per input tensor and reused by every
target that reads the same input (q, k and v of a layer), with one dropout mask per layer input.
"""

from __future__ import annotations

import math
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
            net_init = default_init(tp.network, generator=generator)
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
        #: per-forward cache (``P`` matrices, shared ``x·P_in``, dropout masks): live only between
        #: the model's forward pre- and post-hook (see :meth:`attach`), so no tensor of a
        #: finished graph is ever reused
        self._active = False
        self._fwd: dict[Any, Any] = {}
        self._groups: dict[tuple[int, int], list[tuple[str, tuple[TargetPlan, ...]]]] = {}
        self._batched: dict[tuple[str, tuple[str, ...], tuple[str, ...]], _Batched] = {}

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

    def update(self, t: TargetPlan, x: torch.Tensor) -> torch.Tensor:
        """The target's update ``scaling · x·S``.

        Args:
            t: the target.
            x: input ``[..., in_features]``.
        Returns:
            ``[..., out_features]``.
        """
        n = x.numel() // x.shape[-1]
        kind = t.strategy(n)
        if kind != "stages":
            u = self._input(t, kind, x, n) @ self._right(t, kind).to(x.dtype)
            return u.reshape(*x.shape[:-1], -1)
        return self._stage_update(t, x)

    def _stage_update(self, t: TargetPlan, x: torch.Tensor) -> torch.Tensor:
        """The update on the opt_einsum stages (networks without a two-matrix route: MPO)."""
        lead = x.shape[:-1]
        xs_shape = t.stage_in.shapes[0][1:] if t.stage_in is not None else t.stage_out.shapes[0][1:]
        if t.stage_in is not None:
            z = self._shared_z(t, x)
            ops = self.factor_operands(t, t.stage_out.operands[1:])
            if not ops:  # F_in held every leg: the first stage already gave the update
                z = z * self.scaling
            y = self._run(t.stage_out, [z, *_scaled(ops, self.scaling)])
        else:
            xd = self._xdrop(x).reshape(-1, *xs_shape)
            ops = self.factor_operands(t, t.stage_out.operands[1:])
            y = self._run(t.stage_out, [xd, *_scaled(ops, self.scaling)])
        return y.reshape(*lead, -1)

    def _shared_z(self, t: TargetPlan, x: torch.Tensor) -> torch.Tensor:
        """``dropout(x)·F_in`` of the stage path, shared by the targets reading ``x``."""
        assert t.stage_in is not None
        (fin,) = self.factor_operands(t, t.stage_in.operands[1:])

        def make() -> tuple[torch.Tensor, torch.Tensor]:
            xd = self._xdrop(x).reshape(-1, *t.stage_in.shapes[0][1:])  # type: ignore[union-attr]
            return x, self._run(t.stage_in, [xd, fin])  # type: ignore[arg-type]

        key = ("zs", t.share_key, id(x), torch.is_grad_enabled())
        return self._memo(key, make)[1]  # type: ignore[no-any-return]

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
        self._fwd.clear()

    # -- the fast path -----------------------------------------------------------------------
    def attach(self, model: nn.Module) -> _Hooks:
        """Scope the per-forward cache to ``model``'s forward: a pre-hook clears and opens it, a
        post-hook clears and closes it. Returns a handle whose ``remove()`` drops both hooks."""

        def begin(module: nn.Module, args: Any) -> None:
            self.clear_cache()
            self._active = True

        def end(module: nn.Module, args: Any, output: Any) -> None:
            self.clear_cache()
            self._active = False

        return _Hooks(
            model.register_forward_pre_hook(begin), model.register_forward_hook(end), self
        )

    def _memo(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()``, memoised for the running model forward only (plain call outside one)."""
        if not self._active:
            return make()
        v = self._fwd.get(key)
        if v is None:
            v = self._fwd[key] = make()
        return v

    def _xdrop(self, x: torch.Tensor) -> torch.Tensor:
        """``dropout(x)``: one mask per input tensor and forward, shared by its targets."""
        if isinstance(self.dropout, nn.Identity) or not self.training:
            return x
        return self._memo(("drop", id(x)), lambda: (x, self.dropout(x)))[1]  # type: ignore[no-any-return]

    def _side(self, t: TargetPlan, side: str) -> torch.Tensor:
        """``P_in[x_dim, R]`` (``side="in"``) or ``P_out[R, y_dim]`` (scaling folded in) of a
        routed target: a view of one batched contraction per tensor, side and forward."""
        bat, key, idx = self._batched_for(t, side)
        scale = self.scaling if side == "out" else 1.0
        mats = self._memo(
            ("P", key, torch.is_grad_enabled()), lambda: bat(self.factors[t.tensor], scale)
        )
        return mats[idx]  # type: ignore[no-any-return]

    def _batched_for(self, t: TargetPlan, side: str) -> tuple[_Batched, Any, int]:
        """The compiled batched contraction of a route side (built once), its key, and the
        target's position in its output."""
        r = t.route
        assert r is not None
        names = r.in_factors if side == "in" else r.out_factors
        tp = self.plan.tensor(t.tensor)
        axis_legs = dict(tp.axis_legs)
        held = {leg for f in tp.factors if f.name in names for leg in f.legs}
        stacked = tuple((axis_legs[a][0], i) for a, i in t.index if axis_legs[a][0] in held)
        keep = (*r.x_legs, *r.bond_legs) if side == "in" else (*r.bond_legs, *r.y_legs)
        key = (t.tensor, names, tuple(leg for leg, _ in stacked) + ("|",) + keep)
        bat = self._batched.get(key)
        if bat is None:
            bat = self._batched[key] = _Batched(
                tp,
                names,
                [leg for leg, _ in stacked],
                keep,
                len(r.x_legs if side == "in" else r.bond_legs),
            )
        return bat, key, bat.flat([i for _, i in stacked])

    def _slice_s(self, t: TargetPlan) -> torch.Tensor:
        """``S[in, out]`` rebuilt once per forward (the ``rebuild`` strategy)."""
        return self._memo(("S", id(t), torch.is_grad_enabled()), lambda: self.delta_slice(t))  # type: ignore[no-any-return]

    def _input(self, t: TargetPlan, kind: str, x: torch.Tensor, n: int) -> torch.Tensor:
        """The left operand ``[n, R]`` of a target's ``addmm``: ``dropout(x)·P_in`` (shared by
        every target with the same ``in_key`` and input) or, to rebuild, ``dropout(x)`` itself."""
        if kind == "rebuild":
            return self._xdrop(x).reshape(n, x.shape[-1])
        r = t.route
        assert r is not None

        def make() -> tuple[torch.Tensor, torch.Tensor]:
            xd = self._xdrop(x).reshape(n, x.shape[-1])
            pin = self._side(t, "in")
            return x, xd @ pin.to(xd.dtype)

        return self._memo(("z", r.in_key, id(x), torch.is_grad_enabled()), make)[1]  # type: ignore[no-any-return]

    def _right(self, t: TargetPlan, kind: str) -> torch.Tensor:
        """The right operand ``[R, out_features]`` of a target's ``addmm``."""
        return self._slice_s(t) if kind == "rebuild" else self._side(t, "out")

    def module_groups(
        self, targets: tuple[TargetPlan, ...], n: int
    ) -> list[tuple[str, tuple[TargetPlan, ...]]]:
        """Targets of one module grouped by their left operand, for ``n`` rows: ``(kind, group)``
        with kind ``route``/``rebuild``/``stages`` chosen by FLOPs at ``n`` (cached per ``n``)."""
        key = (id(targets), n)
        groups = self._groups.get(key)
        if groups is None:
            by: dict[tuple[str, str], list[TargetPlan]] = {}
            for t in targets:
                kind = t.strategy(n)
                gk = (kind, t.route.in_key if kind == "route" and t.route else t.key)
                if kind == "rebuild":
                    gk = (kind, "x")
                by.setdefault(gk, []).append(t)
            groups = self._groups[key] = [(k[0], tuple(v)) for k, v in by.items()]
        return groups

    def add_updates(
        self,
        targets: tuple[TargetPlan, ...],
        x: torch.Tensor,
        y: torch.Tensor,
        inplace: bool,
    ) -> torch.Tensor:
        """``y + Σ_t update_t(x)`` with every update placed at its target's output columns.

        All routed/rebuilt targets of the module become one ``addmm``: their left operands
        ``[n, R_g]`` side by side, their right operands as one block matrix ``[Σ R_g, width]``
        (zero where a group has no columns). With ``inplace`` the product is accumulated straight
        into the base output's storage (``addmm_``, no extra pass over ``[n, width]``).

        Args:
            targets: the module's targets.
            x: the module input ``[..., in_features]``.
            y: the base output ``[..., width]``.
            inplace: the base module's backward does not need its output (Linear, Conv1D).
        Returns:
            ``[..., width]`` (the same storage as ``y`` when updated in place).
        """
        width = y.shape[-1]
        n = y.numel() // width if width else 0
        lefts: list[torch.Tensor] = []
        rights: list[torch.Tensor] = []
        stages: list[TargetPlan] = []
        for kind, group in self.module_groups(targets, n):
            if kind == "stages":
                stages.extend(group)
                continue
            lefts.append(self._input(group[0], kind, x, n).to(y.dtype))
            rights.append(_block(group, [self._right(t, kind) for t in group], width).to(y.dtype))
        out = _rows(y, n, width, inplace)
        if lefts:
            z = lefts[0] if len(lefts) == 1 else torch.cat(lefts, dim=1)
            p = rights[0] if len(rights) == 1 else torch.cat(rights, dim=0)
            out = out.addmm_(z, p) if inplace else torch.addmm(out, z, p)
        if stages:
            ups = [self._stage_update(t, x).reshape(n, -1).to(y.dtype) for t in stages]
            out = out + _block(stages, ups, width, dim=1)
        return out.view(y.shape)

    def reference_update(self, t: TargetPlan, x: torch.Tensor) -> torch.Tensor:
        """The straightforward contraction: one einsum of ``x`` with every (sliced) factor, then
        ``· scaling``. No sharing, no caching, no dropout; the reference the fast path is tested
        against.

        Args:
            t: the target.
            x: input ``[..., in_features]``.
        Returns:
            ``[..., out_features]``.
        """
        eq = t.stage_out.equation if t.stage_in is None else _joined(t)
        ops = self.factor_operands(t, [n for n in _all_names(t)])
        xs = x.reshape(-1, *(t.stage_in or t.stage_out).shapes[0][1:])
        y = oe.contract(eq, xs, *ops, backend="torch") * self.scaling
        return y.reshape(*x.shape[:-1], -1)


#: base modules (by class name) whose output the update may be accumulated into in place
_INPLACE_SAFE = frozenset({"Conv1D", "NF4Linear"})


class _Hooks:
    """Both forward hooks of :meth:`TensorAdapter.attach`; ``remove()`` drops them."""

    def __init__(self, pre: Any, post: Any, adapter: TensorAdapter) -> None:
        self.handles = (pre, post)
        self.adapter = adapter

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.adapter.clear_cache()
        self.adapter._active = False


class _Batched:
    """One side of a route for every target of a tensor at once.

    Contracts the (unsliced) factors ``names`` into ``[*stacked legs, *keep]`` with a compiled
    opt_einsum expression (shapes are the parameters', so it is compiled once), folds ``scale``
    into the smallest factor, and returns the result as a tuple of ``[A, B]`` matrices, one per
    combination of the stacked indices (``unbind``: a single backward node).

    Args:
        tp: the tensor.
        names: the factors of this side.
        stacked: stacked-axis legs these factors hold (index order).
        keep: the legs of the matrix; the first ``n_rows`` form its rows.
    """

    def __init__(
        self,
        tp: Any,
        names: Sequence[str],
        stacked: Sequence[str],
        keep: Sequence[str],
        n_rows: int,
    ) -> None:
        sizes = dict(tp.leg_sizes)
        facs = [f for f in tp.factors if f.name in names]
        sym: dict[str, str] = {}

        def s(legs: Sequence[str]) -> str:
            for leg in legs:
                sym.setdefault(leg, oe.get_symbol(len(sym)))
            return "".join(sym[leg] for leg in legs)

        eq = ",".join(s(f.legs) for f in facs) + "->" + s([*stacked, *keep])
        self.names = [f.name for f in facs]
        self.smallest = min(range(len(facs)), key=lambda i: facs[i].numel)
        self.expr = oe.contract_expression(eq, *[f.shape for f in facs], optimize="optimal")
        self.stack_sizes = [sizes[leg] for leg in stacked]
        rows = math.prod(sizes[leg] for leg in keep[:n_rows])
        cols = math.prod(sizes[leg] for leg in keep[n_rows:])
        self.shape = (math.prod(self.stack_sizes), rows, cols)

    def __call__(self, params: Any, scale: float) -> tuple[torch.Tensor, ...]:
        ops = [params[n] for n in self.names]
        if scale != 1.0:
            ops[self.smallest] = ops[self.smallest] * scale
        out = self.expr(*ops, backend="torch")
        return out.reshape(self.shape).unbind(0)  # type: ignore[no-any-return]

    def flat(self, idx: Sequence[int]) -> int:
        k = 0
        for i, size in zip(idx, self.stack_sizes, strict=True):
            k = k * size + i
        return k


def _rows(y: torch.Tensor, n: int, width: int, inplace: bool) -> torch.Tensor:
    """``y`` as ``[n, width]``. In place, prefer the 2-D tensor ``y`` is a plain view of (what
    ``F.linear``/``Conv1D`` return for 3-D inputs): writing into it directly avoids autograd's
    ``CopySlices`` (a full copy of the gradient) that writing through the view would add."""
    if y.dim() == 2:
        return y
    b = y._base
    if (
        inplace
        and b is not None
        and b.dim() == 2
        and b.shape == (n, width)
        and b.is_contiguous()
        and y.is_contiguous()
        and y.data_ptr() == b.data_ptr()
    ):
        return b
    return y.reshape(n, width)


def _block(
    group: Sequence[TargetPlan], mats: Sequence[torch.Tensor], width: int, dim: int = 0
) -> torch.Tensor:
    """Place each target's ``[R, out_t]`` (``dim=0``; or ``[n, out_t]`` with ``dim=1``) at its
    output columns of a ``[R, width]`` block, zeros elsewhere; no copy for a full-width target."""
    pieces: list[torch.Tensor] = []
    pos = 0
    ref = mats[0]
    lead = ref.shape[0]
    for t, m in sorted(
        zip(group, mats, strict=True), key=lambda tm: (tm[0].out_slice or (0, 0))[0]
    ):
        a, b = t.out_slice or (0, width)
        if a > pos:
            pieces.append(ref.new_zeros(lead, a - pos))
        pieces.append(m)
        pos = b
    if pos < width:
        pieces.append(ref.new_zeros(lead, width - pos))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


def _all_names(t: TargetPlan) -> list[str]:
    return [*(t.stage_in.operands[1:] if t.stage_in else ()), *t.stage_out.operands[1:]]


def _joined(t: TargetPlan) -> str:
    """The single einsum ``x, F_in, rest -> update`` of a two-stage target."""
    assert t.stage_in is not None
    a_in, a_out = t.stage_in.equation.split("->")
    x_term, fin_term = a_in.split(",")
    b_in, b_out = t.stage_out.equation.split("->")
    rest = b_in.split(",")[1:]
    return ",".join([x_term, fin_term, *rest]) + "->" + b_out


def _scaled(ops: list[torch.Tensor], scaling: float) -> list[torch.Tensor]:
    """Fold ``scaling`` into the smallest operand (cheaper than scaling the output)."""
    if scaling == 1.0 or not ops:
        return ops
    i = min(range(len(ops)), key=lambda k: ops[k].numel())
    return [o * scaling if k == i else o for k, o in enumerate(ops)]


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
        # these bases' backward never reads their output, so the update may be added in place
        inplace = isinstance(self.base, nn.Linear) or type(self.base).__name__ in _INPLACE_SAFE
        return self.adapter.add_updates(self.targets, x, y, inplace)

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
