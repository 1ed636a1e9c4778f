"""The per-forward work of an adapter, in one place that ``torch.compile`` can trace.

A :class:`Frame` holds what one forward of the adapted model computes once and shares: the
``P_in``/``P_out`` matrices of every tensor side (one batched contraction each, scaling folded in),
``x·P_in`` shared by the targets that read the same input tensor (q, k and v of a layer: HF models
pass the same tensor object to all three) and one dropout mask per input. The model object
(:class:`tensadapt.model.TensadaptModel`) opens a frame around each forward of its base model and
closes it after; nothing is keyed by object ids and no hook sits on the user's model. Inputs are
matched by identity (``is``), which dynamo traces, and only the latest input per key is kept.

Without a frame (a module called directly, a model used in place after :func:`tensadapt.inject`,
or gradient checkpointing, whose recomputation must see the same operations as the forward) each
module computes its own targets' ``P`` slices: the same values, without the sharing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, TypeVar, cast

import torch
from torch import nn

from . import contract, fused
from .costs import TOKENS
from .planner import TargetPlan

if TYPE_CHECKING:
    from .nn import TensorAdapter

V = TypeVar("V")

#: how many recent inputs a frame keeps dropout masks for (q, k, v of one layer share one input)
_MASKS = 8


class Frame:
    """What one forward of the adapted model computes once (see the module docstring).

    Attributes:
        memo: values by key: ``P`` matrices per tensor side, rebuilt slices, grouping of targets.
        inputs: per sharing key, the latest ``(x, x·P_in)``.
        masks: the latest ``(x, dropout(x))`` pairs, newest last.
    """

    __slots__ = ("inputs", "masks", "memo")

    def __init__(self) -> None:
        self.memo: dict[Hashable, object] = {}
        self.inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.masks: list[tuple[torch.Tensor, torch.Tensor]] = []

    def shared(self, key: str, x: torch.Tensor, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``make()`` for input ``x``, computed once per (key, x) and reused while x is the
        latest input seen under that key."""
        hit = self.inputs.get(key)
        if hit is not None and hit[0] is x:
            return hit[1]
        value = make()
        self.inputs[key] = (x, value)
        return value

    def value(self, key: Hashable, make: Callable[[], V]) -> V:
        """``make()``, once per key and frame."""
        if key not in self.memo:
            self.memo[key] = make()
        return cast(V, self.memo[key])


def _grad() -> bool:
    return torch.is_grad_enabled()


class _Batched:
    """One side of a route for every target of a tensor at once.

    Contracts the (unsliced) factors ``names`` into ``[*stacked legs, *keep]`` (shapes are the
    parameters', so the path is fixed once), folds ``scale`` into the smallest factor, and returns
    ``[A, B]`` matrices, one per combination of the stacked indices (``unbind``: one backward node).

    Args:
        ad: the adapter.
        tensor: the tensor's name.
        names: the factors of this side.
        stacked: stacked-axis legs these factors hold (index order).
        keep: the legs of the matrix; the first ``n_rows`` form its rows.
    """

    def __init__(
        self,
        ad: TensorAdapter,
        tensor: str,
        names: Sequence[str],
        stacked: Sequence[str],
        keep: Sequence[str],
        n_rows: int,
    ) -> None:
        tp = ad.plan.tensor(tensor)
        sizes = dict(tp.leg_sizes)
        facs = [f for f in tp.factors if f.name in names]
        self.names = [f.name for f in facs]
        self.smallest = min(range(len(facs)), key=lambda i: facs[i].numel)
        self.run = contract.contraction(
            [f.legs for f in facs], [*stacked, *keep], [f.shape for f in facs], "optimal"
        )
        self.stack_sizes = [sizes[leg] for leg in stacked]
        rows = math.prod(sizes[leg] for leg in keep[:n_rows])
        cols = math.prod(sizes[leg] for leg in keep[n_rows:])
        self.shape = (math.prod(self.stack_sizes), rows, cols)

    def __call__(self, params: nn.ParameterDict, scale: float) -> tuple[torch.Tensor, ...]:
        ops = [params[n] for n in self.names]
        if scale != 1.0:
            ops[self.smallest] = ops[self.smallest] * scale
        return self.run(*ops).reshape(self.shape).unbind(0)

    def flat(self, idx: Sequence[int]) -> int:
        k = 0
        for i, size in zip(idx, self.stack_sizes, strict=True):
            k = k * size + i
        return k


class Executor:
    """Computes the updates of one :class:`~tensadapt.nn.TensorAdapter`'s targets.

    Contractions are built once per shape and kept here (plain Python state, never parameters).
    """

    def __init__(self, ad: TensorAdapter) -> None:
        self.ad = ad
        self._batched: dict[Hashable, _Batched] = {}
        self._own: dict[Hashable, contract.Contraction] = {}
        self._groups: dict[tuple[int, int], list[tuple[str, tuple[TargetPlan, ...]]]] = {}

    # -- factor slices -----------------------------------------------------------------------
    def operands(self, t: TargetPlan, names: Sequence[str]) -> list[torch.Tensor]:
        """The target's slices of the named factors (views; stacked axes indexed away)."""
        params = self.ad.params(t.tensor)
        sel = dict(t.selects)
        out = []
        for n in names:
            f = params[n]
            for dim, idx in sel[n]:
                f = f.select(dim, idx)
            out.append(f)
        return out

    def run(self, equation: str, operands: Sequence[torch.Tensor]) -> torch.Tensor:
        """One einsum on its opt_einsum path for these operand shapes (built once per shape)."""
        shapes = tuple(tuple(o.shape) for o in operands)
        return contract._build(equation, shapes, None)(*operands)

    def delta_slice(self, t: TargetPlan) -> torch.Tensor:
        """The target's update as a matrix ``S[in_features, out_features]`` (scaling included):
        ``update(x) = x·S``."""
        s = self.run(t.delta.equation, self.operands(t, t.delta.operands))
        return s.reshape(t.in_features, t.out_features) * self.ad.scaling

    # -- route sides ---------------------------------------------------------------------------
    def side(self, t: TargetPlan, side: str, frame: Frame | None) -> torch.Tensor:
        """``P_in[x_dim, R]`` (``side="in"``) or ``P_out[R, y_dim]`` (scaling folded in) of a
        routed target: with a frame, a view of one batched contraction per tensor side and
        forward; without, contracted from this target's factor slices alone."""
        r = t.route
        assert r is not None
        scale = self.ad.scaling if side == "out" else 1.0
        if frame is None:
            return self._own_side(t, side, scale)
        bat, key, idx = self._batched_for(t, side)
        params = self.ad.params(t.tensor)
        mats = frame.value(("P", key, _grad()), lambda: bat(params, scale))
        return mats[idx]

    def _own_side(self, t: TargetPlan, side: str, scale: float) -> torch.Tensor:
        r = t.route
        assert r is not None
        names = r.in_factors if side == "in" else r.out_factors
        keep = (*t.x_legs, *r.bond_legs) if side == "in" else (*r.bond_legs, *t.y_legs)
        ops = self.operands(t, names)
        key = (t.tensor, t.index, side)
        run = self._own.get(key)
        if run is None:
            tp = self.ad.plan.tensor(t.tensor)
            legs = [t.sliced_legs(tp.factors[[f.name for f in tp.factors].index(n)]) for n in names]
            run = self._own[key] = contract.contraction(
                legs, keep, [tuple(o.shape) for o in ops], "optimal"
            )
        if scale != 1.0:
            i = min(range(len(ops)), key=lambda k: ops[k].numel())
            ops[i] = ops[i] * scale
        rows = t.in_features if side == "in" else r.rank
        return run(*ops).reshape(rows, -1)

    def _batched_for(self, t: TargetPlan, side: str) -> tuple[_Batched, Hashable, int]:
        """The batched contraction of a route side (built once), its key, and the target's
        position in its output."""
        r = t.route
        assert r is not None
        names = r.in_factors if side == "in" else r.out_factors
        tp = self.ad.plan.tensor(t.tensor)
        axis_legs = dict(tp.axis_legs)
        held = {leg for f in tp.factors if f.name in names for leg in f.legs}
        stacked = tuple((axis_legs[a][0], i) for a, i in t.index if axis_legs[a][0] in held)
        keep = (*t.x_legs, *r.bond_legs) if side == "in" else (*r.bond_legs, *t.y_legs)
        key = (t.tensor, names, tuple(leg for leg, _ in stacked) + ("|",) + keep)
        bat = self._batched.get(key)
        if bat is None:
            bat = self._batched[key] = _Batched(
                self.ad,
                t.tensor,
                names,
                [leg for leg, _ in stacked],
                keep,
                len(t.x_legs if side == "in" else r.bond_legs),
            )
        return bat, key, bat.flat([i for _, i in stacked])

    # -- inputs ----------------------------------------------------------------------------------
    def dropped(self, x: torch.Tensor, frame: Frame | None) -> torch.Tensor:
        """``dropout(x)``: one mask per input tensor and forward, shared by its targets."""
        ad = self.ad
        if ad.dropout_p == 0.0 or not ad.training:
            return x
        if frame is None:
            return ad.dropout(x)
        for seen, xd in frame.masks:
            if seen is x:
                return xd
        xd = ad.dropout(x)
        frame.masks.append((x, xd))
        del frame.masks[:-_MASKS]
        return xd

    def left(
        self, t: TargetPlan, kind: str, x: torch.Tensor, n: int, frame: Frame | None
    ) -> torch.Tensor:
        """The left operand ``[n, R]`` of a target's ``addmm``: ``dropout(x)·P_in`` (shared by
        every target with the same ``in_key`` and input) or, to rebuild, ``dropout(x)`` itself."""
        if kind == "rebuild":
            return self.dropped(x, frame).reshape(n, x.shape[-1])
        r = t.route
        assert r is not None

        def make() -> torch.Tensor:
            xd = self.dropped(x, frame).reshape(n, x.shape[-1])
            return xd @ self.side(t, "in", frame).to(xd.dtype)

        if frame is None:
            return make()
        return frame.shared(f"z:{r.in_key}:{_grad()}", x, make)

    def right(self, t: TargetPlan, kind: str, frame: Frame | None) -> torch.Tensor:
        """The right operand ``[R, out_features]`` of a target's ``addmm``."""
        if kind == "route":
            return self.side(t, "out", frame)
        if frame is None:
            return self.delta_slice(t)
        return frame.value(("S", t.tensor, t.key, _grad()), lambda: self.delta_slice(t))

    def stage_update(self, t: TargetPlan, x: torch.Tensor, frame: Frame | None) -> torch.Tensor:
        """The update on the opt_einsum stages (networks without a two-matrix route: MPO)."""
        ad = self.ad
        lead = x.shape[:-1]
        if t.stage_in is not None:
            x_shape = t.stage_in.shapes[0][1:]
            (fin,) = self.operands(t, t.stage_in.operands[1:])

            def make() -> torch.Tensor:
                xd = self.dropped(x, frame).reshape(-1, *x_shape)
                return self.run(t.stage_in.equation, [xd, fin])  # type: ignore[union-attr]

            z = make() if frame is None else frame.shared(f"zs:{t.share_key}:{_grad()}", x, make)
            ops = self.operands(t, t.stage_out.operands[1:])
            if not ops:  # F_in held every leg: the first stage already gave the update
                z = z * ad.scaling
            y = self.run(t.stage_out.equation, [z, *_scaled(ops, ad.scaling)])
        else:
            xd = self.dropped(x, frame).reshape(-1, *t.stage_out.shapes[0][1:])
            ops = self.operands(t, t.stage_out.operands[1:])
            y = self.run(t.stage_out.equation, [xd, *_scaled(ops, ad.scaling)])
        return y.reshape(*lead, -1)

    # -- one module ------------------------------------------------------------------------------
    def groups(
        self, targets: tuple[TargetPlan, ...], n: int
    ) -> list[tuple[str, tuple[TargetPlan, ...]]]:
        """Targets of one module grouped by their left operand, for ``n`` rows: ``(kind, group)``
        with kind ``route``/``rebuild``/``stages`` chosen by FLOPs at ``n`` (cached per ``n``)."""
        key = (id(targets), n)
        found = self._groups.get(key)
        if found is None:
            by: dict[tuple[str, str], list[TargetPlan]] = {}
            for t in targets:
                kind = t.strategy(n)
                gk = (kind, t.route.in_key if kind == "route" and t.route else t.key)
                if kind == "rebuild":
                    gk = (kind, "x")
                by.setdefault(gk, []).append(t)
            found = self._groups[key] = [(k[0], tuple(v)) for k, v in by.items()]
        return found

    def add_updates(
        self,
        targets: tuple[TargetPlan, ...],
        x: torch.Tensor,
        y: torch.Tensor,
        inplace: bool,
        frame: Frame | None,
    ) -> torch.Tensor:
        """``y + Σ_t update_t(x)`` with every update placed at its target's output rows.

        All routed/rebuilt targets of the module become one ``addmm``: their left operands
        ``[n, R_g]`` side by side, their right operands as one block matrix ``[Σ R_g, width]``
        (zero where a group has no rows of the output; fused layouts via :mod:`tensadapt.fused`).
        With ``inplace`` the product is accumulated straight into the base output's storage
        (``addmm_``, no extra pass over ``[n, width]``).

        Args:
            targets: the module's targets.
            x: the module input ``[..., in_features]``.
            y: the base output ``[..., width]``.
            inplace: the base module's backward does not need its output (Linear, Conv1D).
            frame: the running forward's frame, or ``None``.
        Returns:
            ``[..., width]`` (the same storage as ``y`` when updated in place).
        """
        width = y.shape[-1]
        n = y.numel() // width if width else 0
        lefts: list[torch.Tensor] = []
        rights: list[torch.Tensor] = []
        stages: list[TargetPlan] = []
        for kind, group in self.groups(targets, n):
            if kind == "stages":
                stages.extend(group)
                continue
            lefts.append(self.left(group[0], kind, x, n, frame).to(y.dtype))
            mats = [(t.fused, self.right(t, kind, frame)) for t in group]
            rights.append(fused.place(mats, width).to(y.dtype))
        out = _rows(y, n, width, inplace)
        if lefts:
            z = lefts[0] if len(lefts) == 1 else torch.cat(lefts, dim=1)
            p = rights[0] if len(rights) == 1 else torch.cat(rights, dim=0)
            out = out.addmm_(z, p) if inplace else torch.addmm(out, z, p)
        if stages:
            ups = [(t.fused, self.stage_update(t, x, frame).reshape(n, -1)) for t in stages]
            out = out + fused.place(ups, width).to(y.dtype)
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
        tp = self.ad.plan.tensor(t.tensor)
        names = [f.name for f in tp.factors]
        legs = [(TOKENS, *t.x_legs)] + [t.sliced_legs(f) for f in tp.factors]
        ops = self.operands(t, names)
        sizes = dict(tp.leg_sizes)
        xs = x.reshape(-1, *(sizes[leg] for leg in t.x_legs))
        run = contract.contraction(
            legs, (TOKENS, *t.y_legs), [tuple(xs.shape), *[tuple(o.shape) for o in ops]]
        )
        y = run(xs, *ops) * self.ad.scaling
        return y.reshape(*x.shape[:-1], -1)


def _rows(y: torch.Tensor, n: int, width: int, inplace: bool) -> torch.Tensor:
    """``y`` as ``[n, width]``. In place (eager only), prefer the 2-D tensor ``y`` is a plain view
    of (what ``F.linear``/``Conv1D`` return for 3-D inputs): writing into it directly avoids
    autograd's ``CopySlices`` (a full copy of the gradient) that writing through the view would
    add. Under ``torch.compile`` the compiler owns such choices."""
    if y.dim() == 2:
        return y
    if inplace and not torch.compiler.is_compiling():
        b = y._base
        if (
            b is not None
            and b.dim() == 2
            and b.shape == (n, width)
            and b.is_contiguous()
            and y.is_contiguous()
            and y.data_ptr() == b.data_ptr()
        ):
            return b
    return y.reshape(n, width)


def _scaled(ops: list[torch.Tensor], scaling: float) -> list[torch.Tensor]:
    """Fold ``scaling`` into the smallest operand (cheaper than scaling the output)."""
    if scaling == 1.0 or not ops:
        return ops
    i = min(range(len(ops)), key=lambda k: ops[k].numel())
    return [o * scaling if k == i else o for k, o in enumerate(ops)]


__all__ = ["Executor", "Frame"]
