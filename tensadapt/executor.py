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

Everything that is pure planning (opt_einsum paths, which factor slices a target reads, how a
module's targets group into one ``addmm`` at each token count, where fused rows go) is decided
when the adapter is built (:class:`Executor`, :class:`Program`), never inside a forward: the
forward is tensor work plus lookups of those decisions, which is what lets dynamo trace it into
one graph. The only decision that depends on the input is the strategy per token count; a
:class:`Program` holds the few token-count intervals where it changes, so a compiled graph
guards on ``n < bound`` (and stays valid under dynamic shapes) instead of re-planning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar, cast

import torch
from torch import nn

from . import contract, fused
from .costs import NOMINAL_TOKENS, TOKENS
from .planner import Stage, TargetPlan

if TYPE_CHECKING:
    from .nn import TensorAdapter

V = TypeVar("V")

#: how many recent inputs a frame keeps dropout masks for (q, k, v of one layer share one input)
_MASKS = 8

#: the strategies of :meth:`TargetPlan.strategy`
_KINDS = ("route", "rebuild", "stages")


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
        self.names = tuple(f.name for f in facs)
        self.smallest = _smallest([f.numel for f in facs])
        self.run = contract.contraction(
            [f.legs for f in facs], [*stacked, *keep], [f.shape for f in facs], "optimal"
        )
        self.stack_sizes = tuple(sizes[leg] for leg in stacked)
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


@dataclass(frozen=True)
class _Side:
    """One route side of one target: its batched contraction (shared by the tensor's targets),
    the frame key of that contraction, the target's position in its output, and the contraction
    of this target's own slices (used without a frame)."""

    batched: _Batched
    key: Hashable
    idx: int
    own: contract.Contraction
    names: tuple[str, ...]
    rows: int


@dataclass(frozen=True)
class _Target:
    """Everything about one target the forward needs, fixed when the adapter is built.

    Attributes:
        picks: per factor name, the ``(dim, index)`` selects that slice it.
        delta: the contraction rebuilding ``S[in, out]`` from the sliced factors.
        sides: ``(P_in side, P_out side)`` of the route, or ``None`` (MPO: stages only).
        stage_in, stage_out: the stages' contractions at :data:`NOMINAL_TOKENS` rows (what a
            compiled forward runs; eager forwards pick the path for the real token count).
        z_keys: the frame keys of the shared left operand, without / with grad enabled.
    """

    picks: dict[str, tuple[tuple[int, int], ...]]
    delta: contract.Contraction
    sides: tuple[_Side, _Side] | None
    stage_in: contract.Contraction | None
    stage_out: contract.Contraction
    z_keys: tuple[str, str]
    zs_keys: tuple[str, str]


@dataclass(frozen=True)
class _Group:
    """Targets of one module sharing one left operand: ``kind`` is ``route`` or ``rebuild``;
    ``layout`` places their right operands in the module's (fused) output width."""

    kind: str
    targets: tuple[TargetPlan, ...]
    layout: fused.Layout


@dataclass(frozen=True)
class _Regime:
    """How a module computes its updates on one interval of token counts."""

    groups: tuple[_Group, ...]
    stages: tuple[TargetPlan, ...]
    stage_layout: fused.Layout | None


@dataclass(frozen=True)
class Program:
    """One module's targets, grouped into ``addmm`` operands for every token count.

    ``regimes[i]`` holds for ``bounds[i-1] <= n < bounds[i]`` (the last one for every larger
    ``n``): the bounds are the token counts where :meth:`TargetPlan.strategy` of one of the targets
    changes (costs are linear in the token count, so there are at most a few).
    """

    targets: tuple[TargetPlan, ...]
    bounds: tuple[int, ...]
    regimes: tuple[_Regime, ...]

    def at(self, n: int) -> _Regime:
        """The regime for ``n`` rows (under ``torch.compile``: a guard ``n < bound`` each)."""
        for bound, regime in zip(self.bounds, self.regimes, strict=False):
            if n < bound:
                return regime
        return self.regimes[-1]


def _smallest(sizes: Sequence[int]) -> int:
    best = 0
    for i in range(1, len(sizes)):
        if sizes[i] < sizes[best]:
            best = i
    return best


def strategy_bounds(t: TargetPlan) -> tuple[int, ...]:
    """The token counts ``n >= 1`` where ``t.strategy(n) != t.strategy(n - 1)``.

    Every strategy's cost is linear in the token count, so each pair of cost lines crosses at
    most once; the integers around each crossing are checked with :meth:`TargetPlan.strategy`
    itself, so the bounds agree with it exactly.
    """
    c0, c1 = t.costs(0), t.costs(1)
    lines = {k: (c0[k], c1[k] - c0[k]) for k in c0}
    if "route" in lines:  # the route wins ties within 1 %
        a, b = lines["rebuild"]
        lines["rebuild~"] = (1.01 * a, 1.01 * b)
    found: set[int] = set()
    names = list(lines)
    for i, p in enumerate(names):
        for q in names[i + 1 :]:
            (a0, a1), (b0, b1) = lines[p], lines[q]
            if a1 == b1:
                continue
            cross = (b0 - a0) / (a1 - b1)
            if not math.isfinite(cross) or cross < 0 or cross > 2**62:
                continue
            for k in range(max(1, math.floor(cross) - 2), math.ceil(cross) + 3):
                if t.strategy(k) != t.strategy(k - 1):
                    found.add(k)
    return tuple(sorted(found))


class Executor:
    """Computes the updates of one :class:`~tensadapt.nn.TensorAdapter`'s targets.

    Every contraction and every target's slicing is built when the executor is built (plain
    Python state, never parameters); a module's :class:`Program` when its targets are set
    (:meth:`program`).
    """

    def __init__(self, ad: TensorAdapter) -> None:
        self.ad = ad
        self._batched: dict[Hashable, _Batched] = {}
        self._targets: dict[str, _Target] = {t.key: self._prepare(t) for t in ad.plan.targets}
        self._programs: dict[int, Program] = {}

    # -- built once --------------------------------------------------------------------------------
    def _prepare(self, t: TargetPlan) -> _Target:
        tp = self.ad.plan.tensor(t.tensor)
        picks = dict(t.selects)
        shapes = {f.name: _sliced_shape(f.shape, picks[f.name]) for f in tp.factors}
        legs = {f.name: t.sliced_legs(f) for f in tp.factors}
        delta = contract._build(t.delta.equation, tuple(shapes[n] for n in t.delta.operands), None)
        sides = None
        z_keys = ("", "")
        if t.route is not None:
            sides = (self._side(t, "in", shapes, legs), self._side(t, "out", shapes, legs))
            z_keys = (f"z:{t.route.in_key}:False", f"z:{t.route.in_key}:True")
        return _Target(
            picks=picks,
            delta=delta,
            sides=sides,
            stage_in=None if t.stage_in is None else _nominal(t.stage_in),
            stage_out=_nominal(t.stage_out),
            z_keys=z_keys,
            zs_keys=(f"zs:{t.share_key}:False", f"zs:{t.share_key}:True"),
        )

    def _side(
        self,
        t: TargetPlan,
        side: str,
        shapes: dict[str, tuple[int, ...]],
        legs: dict[str, tuple[str, ...]],
    ) -> _Side:
        r = t.route
        assert r is not None
        names = r.in_factors if side == "in" else r.out_factors
        keep = (*t.x_legs, *r.bond_legs) if side == "in" else (*r.bond_legs, *t.y_legs)
        tp = self.ad.plan.tensor(t.tensor)
        axis_legs = dict(tp.axis_legs)
        held = {leg for f in tp.factors if f.name in names for leg in f.legs}
        stacked = tuple((axis_legs[a][0], i) for a, i in t.index if axis_legs[a][0] in held)
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
        own = contract.contraction(
            [legs[n] for n in names], keep, [shapes[n] for n in names], "optimal"
        )
        rows = t.in_features if side == "in" else r.rank
        return _Side(bat, key, bat.flat([i for _, i in stacked]), own, tuple(names), rows)

    def program(self, targets: tuple[TargetPlan, ...]) -> Program:
        """The :class:`Program` of one module's targets (built once per tuple; the wrapper asks
        for it when its targets are set, so a compiled forward only looks it up)."""
        found = self._programs.get(id(targets))
        if found is not None:
            return found
        bounds = tuple(sorted({b for t in targets for b in strategy_bounds(t)}))
        regimes = tuple(self._regime(targets, n) for n in (0, *bounds))
        prog = self._programs[id(targets)] = Program(targets, bounds, regimes)
        return prog

    def _regime(self, targets: tuple[TargetPlan, ...], n: int) -> _Regime:
        width = _width(targets)
        groups = []
        stages: tuple[TargetPlan, ...] = ()
        for kind, group in self.groups(targets, n):
            if kind == "stages":
                stages += group
                continue
            groups.append(_Group(kind, group, fused.layout([t.fused for t in group], width)))
        lay = fused.layout([t.fused for t in stages], width) if stages else None
        return _Regime(tuple(groups), stages, lay)

    def groups(
        self, targets: tuple[TargetPlan, ...], n: int
    ) -> list[tuple[str, tuple[TargetPlan, ...]]]:
        """Targets of one module grouped by their left operand, for ``n`` rows: ``(kind, group)``
        with kind ``route``/``rebuild``/``stages`` chosen by FLOPs at ``n`` (planning only: the
        forward reads the result from the module's :class:`Program`)."""
        by: dict[tuple[str, str], list[TargetPlan]] = {}
        for t in targets:
            kind = t.strategy(n)
            gk = (kind, t.route.in_key if kind == "route" and t.route else t.key)
            if kind == "rebuild":
                gk = (kind, "x")
            by.setdefault(gk, []).append(t)
        return [(k[0], tuple(v)) for k, v in by.items()]

    # -- factor slices -----------------------------------------------------------------------
    def operands(self, t: TargetPlan, names: Sequence[str]) -> list[torch.Tensor]:
        """The target's slices of the named factors (views; stacked axes indexed away)."""
        params = self.ad.params(t.tensor)
        picks = self._targets[t.key].picks
        out = []
        for n in names:
            f = params[n]
            for dim, idx in picks[n]:
                f = f.select(dim, idx)
            out.append(f)
        return out

    def run(self, equation: str, operands: Sequence[torch.Tensor]) -> torch.Tensor:
        """One einsum on its opt_einsum path for these operand shapes (built once per shape;
        eager only: planning a path is not traced)."""
        shapes = tuple(tuple(o.shape) for o in operands)
        return contract._build(equation, shapes, None)(*operands)

    def delta_slice(self, t: TargetPlan) -> torch.Tensor:
        """The target's update as a matrix ``S[in_features, out_features]`` (scaling included):
        ``update(x) = x·S``."""
        s = self._targets[t.key].delta(*self.operands(t, t.delta.operands))
        return s.reshape(t.in_features, t.out_features) * self.ad.scaling

    # -- route sides ---------------------------------------------------------------------------
    def side(self, t: TargetPlan, side: str, frame: Frame | None) -> torch.Tensor:
        """``P_in[x_dim, R]`` (``side="in"``) or ``P_out[R, y_dim]`` (scaling folded in) of a
        routed target: with a frame, a view of one batched contraction per tensor side and
        forward; without, contracted from this target's factor slices alone."""
        sides = self._targets[t.key].sides
        assert sides is not None
        s = sides[0] if side == "in" else sides[1]
        scale = self.ad.scaling if side == "out" else 1.0
        if frame is None:
            ops = self.operands(t, s.names)
            if scale != 1.0:
                i = _smallest([o.numel() for o in ops])
                ops[i] = ops[i] * scale
            return s.own(*ops).reshape(s.rows, -1)
        params = self.ad.params(t.tensor)
        bat = s.batched
        mats = frame.value(("P", s.key, _grad()), lambda: bat(params, scale))
        return mats[s.idx]

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

        def make() -> torch.Tensor:
            xd = self.dropped(x, frame).reshape(n, x.shape[-1])
            return xd @ self.side(t, "in", frame).to(xd.dtype)

        if frame is None:
            return make()
        return frame.shared(self._targets[t.key].z_keys[_grad()], x, make)

    def right(self, t: TargetPlan, kind: str, frame: Frame | None) -> torch.Tensor:
        """The right operand ``[R, out_features]`` of a target's ``addmm``."""
        if kind == "route":
            return self.side(t, "out", frame)
        if frame is None:
            return self.delta_slice(t)
        return frame.value(("S", t.tensor, t.key, _grad()), lambda: self.delta_slice(t))

    def stage_update(self, t: TargetPlan, x: torch.Tensor, frame: Frame | None) -> torch.Tensor:
        """The update on the opt_einsum stages (networks without a two-matrix route: MPO).

        Eager forwards take the path opt_einsum chooses for the real token count; a compiled
        forward takes the one chosen at :data:`~tensadapt.costs.NOMINAL_TOKENS` (the same
        result up to float rounding)."""
        ad = self.ad
        info = self._targets[t.key]
        compiling = torch.compiler.is_compiling()
        lead = x.shape[:-1]
        stage_in = t.stage_in
        if stage_in is not None:
            x_shape = stage_in.shapes[0][1:]
            (fin,) = self.operands(t, stage_in.operands[1:])
            run_in = info.stage_in

            def make() -> torch.Tensor:
                xd = self.dropped(x, frame).reshape(-1, *x_shape)
                if compiling:
                    assert run_in is not None
                    return run_in(xd, fin)
                return self.run(stage_in.equation, [xd, fin])

            z = make() if frame is None else frame.shared(info.zs_keys[_grad()], x, make)
            ops = self.operands(t, t.stage_out.operands[1:])
            if not ops:  # F_in held every leg: the first stage already gave the update
                z = z * ad.scaling
            args = [z, *_scaled(ops, ad.scaling)]
        else:
            xd = self.dropped(x, frame).reshape(-1, *t.stage_out.shapes[0][1:])
            ops = self.operands(t, t.stage_out.operands[1:])
            args = [xd, *_scaled(ops, ad.scaling)]
        y = info.stage_out(*args) if compiling else self.run(t.stage_out.equation, args)
        return y.reshape(*lead, -1)

    # -- one module ------------------------------------------------------------------------------
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
        (``addmm_``, no extra pass over ``[n, width]``) in eager; a compiled forward adds out of
        place (see the comment in the body).

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
        if torch.compiler.is_compiling():
            # functionalised, an in-place addmm_ into a view of the base output turns into
            # copies and clones in the compiled backward; the compiler places the sum itself
            inplace = False
        prog = self._programs.get(id(targets))
        if prog is None:
            prog = self.program(targets)
        regime = prog.at(n)
        lefts: list[torch.Tensor] = []
        rights: list[torch.Tensor] = []
        for g in regime.groups:
            lefts.append(self.left(g.targets[0], g.kind, x, n, frame).to(y.dtype))
            mats = [self.right(t, g.kind, frame) for t in g.targets]
            rights.append(fused.assemble(g.layout, mats).to(y.dtype))
        out = _rows(y, n, width, inplace)
        if lefts:
            z = lefts[0] if len(lefts) == 1 else torch.cat(lefts, dim=1)
            p = rights[0] if len(rights) == 1 else torch.cat(rights, dim=0)
            out = out.addmm_(z, p) if inplace else torch.addmm(out, z, p)
        if regime.stage_layout is not None:
            ups = [self.stage_update(t, x, frame).reshape(n, -1) for t in regime.stages]
            out = out + fused.assemble(regime.stage_layout, ups).to(y.dtype)
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


def _sliced_shape(shape: Sequence[int], picks: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    """``shape`` with the picked dims removed."""
    drop = {d for d, _ in picks}
    return tuple(s for d, s in enumerate(shape) if d not in drop)


def _nominal(stage: Stage) -> contract.Contraction:
    """A stage's contraction planned at :data:`NOMINAL_TOKENS` rows."""
    shapes = tuple(tuple(NOMINAL_TOKENS if d == -1 else d for d in s) for s in stage.shapes)
    return contract._build(stage.equation, shapes, None)


def _width(targets: Sequence[TargetPlan]) -> int:
    """The output width of the module holding ``targets`` (the fused width if fused)."""
    for t in targets:
        if t.fused is not None:
            return t.fused.width
    return targets[0].out_features


def _rows(y: torch.Tensor, n: int, width: int, inplace: bool) -> torch.Tensor:
    """``y`` as ``[n, width]``. In place (eager only: :meth:`Executor.add_updates` never adds in
    place under ``torch.compile``), prefer the 2-D tensor ``y`` is a plain view of (what
    ``F.linear``/``Conv1D`` return for 3-D inputs): writing into it directly avoids autograd's
    ``CopySlices`` (a full copy of the gradient) that writing through the view would add."""
    if y.dim() == 2:
        return y
    if inplace:
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
    i = _smallest([o.numel() for o in ops])
    return [o * scaling if k == i else o for k, o in enumerate(ops)]


__all__ = ["Executor", "Frame", "Program", "strategy_bounds"]
