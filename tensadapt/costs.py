"""Pricing a target's update: the two-matrix route search and FLOP accounting.

Every count is opt_einsum's (through :mod:`tensadapt.contract`): the route's ``P_in``/``P_out``
are contracted on opt_einsum's optimal path, then ``x·P_in`` and ``z·P_out`` cost ``2·T·X·R`` and
``2·T·R·Y`` — opt_einsum's own convention for a matrix product.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from . import contract

if TYPE_CHECKING:
    from .planner import Route, TargetPlan, TensorPlan

#: token count used to price contractions per token (paths are re-chosen at run time per shape)
NOMINAL_TOKENS = 1024

#: one factor after the target's stacked indices are fixed: (name, remaining legs, shape)
Sliced = tuple[str, tuple[str, ...], tuple[int, ...]]


def best_route(
    tensor: str,
    sliced: Sequence[Sliced],
    selects: Mapping[str, tuple[tuple[int, int], ...]],
    x_legs: Sequence[str],
    y_legs: Sequence[str],
    sizes: Mapping[str, int],
    transposed: bool,
) -> Route | None:
    """The cheapest two-matrix split of a target's (index-sliced) factors, or ``None`` when a
    factor holds both input and output legs (MPO cores): that network has no such split.

    Every factor holding an input leg goes to ``P_in``, every factor holding an output leg to
    ``P_out``; the others (cores, stacked-axis factors) go to whichever side gives the lowest
    FLOPs at :data:`NOMINAL_TOKENS` (all ``2^k`` assignments are tried; ``k`` is small).
    """
    from .planner import Route

    xs, ys = set(x_legs), set(y_legs)
    must_in = [f for f in sliced if set(f[1]) & xs]
    must_out = [f for f in sliced if set(f[1]) & ys]
    if any(f in must_out for f in must_in) or not must_in or not must_out:
        return None
    free = [f for f in sliced if f not in must_in and f not in must_out]
    x_dim = contract.size_of(x_legs, dict(sizes))
    y_dim = contract.size_of(y_legs, dict(sizes))
    best: tuple[float, Route] | None = None
    for mask in range(1 << len(free)):
        ins = must_in + [f for i, f in enumerate(free) if mask >> i & 1]
        outs = must_out + [f for i, f in enumerate(free) if not mask >> i & 1]
        in_legs = {leg for f in ins for leg in f[1]}
        out_legs = {leg for f in outs for leg in f[1]}
        bonds = tuple(
            dict.fromkeys(leg for f in sliced for leg in f[1] if leg in in_legs & out_legs)
        )
        rank = contract.size_of(bonds, dict(sizes))
        fixed = contract.flops([f[1] for f in ins], [*x_legs, *bonds], dict(sizes))
        fixed += contract.flops([f[1] for f in outs], [*bonds, *y_legs], dict(sizes))
        per_token = 2.0 * (x_dim * rank + rank * y_dim)
        cost = fixed + NOMINAL_TOKENS * per_token
        if best is None or cost < best[0]:
            in_key = f"{tensor}:" + ",".join(f"{f[0]}{list(selects[f[0]])}" for f in ins)
            best = (
                cost,
                Route(
                    in_factors=tuple(f[0] for f in ins),
                    out_factors=tuple(f[0] for f in outs),
                    bond_legs=bonds,
                    rank=rank,
                    fixed_flops=fixed,
                    flops_per_token=per_token,
                    in_key=in_key + (":T" if transposed else ":N"),
                ),
            )
    return best[1] if best else None


def stage_flops(
    inputs: Sequence[Sequence[str]], output: Sequence[str], sizes: Mapping[str, int]
) -> float:
    """FLOPs of one contraction whose first operand carries the token leg, per token."""
    real = dict(sizes)
    real[TOKENS] = NOMINAL_TOKENS
    shapes = [tuple(real[leg] for leg in legs) for legs in inputs]
    return contract.contraction(inputs, output, shapes).flops / NOMINAL_TOKENS


#: the token leg of stage equations
TOKENS = "__tokens__"


def route_path_flops(t: TargetPlan, tp: TensorPlan, tokens: int) -> tuple[float, float]:
    """``(ours, optimal)``: the FLOPs of the whole target network ``x, factors -> update`` at
    ``tokens`` rows on the path the adapter runs (the route, the rebuild or the stages, as
    :meth:`TargetPlan.strategy` picks), and on opt_einsum's ``optimal`` path. Shared work
    (``x·P_in`` for q, k and v) is counted in full for every target.
    """
    sizes = dict(tp.leg_sizes)
    sizes[TOKENS] = tokens
    picks = dict(t.selects)
    legs = [
        tuple(leg for d, leg in enumerate(f.legs) if d not in {dim for dim, _ in picks[f.name]})
        for f in tp.factors
    ]
    inputs = [(TOKENS, *t.x_legs), *legs]
    shapes = [tuple(sizes[leg] for leg in op) for op in inputs]
    opt = contract.contraction(
        inputs, (TOKENS, *t.y_legs), shapes, optimize="optimal" if len(shapes) <= 7 else "auto-hq"
    )
    return t.costs(tokens)[t.strategy(tokens)], opt.flops


def total_flops(targets: Sequence[TargetPlan]) -> float:
    """Adapter FLOPs per token of a plan's stage path (a shared input stage counted once per
    layer and sharing key)."""
    seen: set[tuple[str, int]] = set()
    total = 0.0
    for t in targets:
        if t.stage_in is not None and (t.share_key, t.layer) not in seen:
            seen.add((t.share_key, t.layer))
            total += t.stage_in.flops_per_token
        total += t.stage_out.flops_per_token
    return total


def lora_equivalent(targets: Sequence[TargetPlan], rank: int) -> tuple[int, float]:
    """Parameters and FLOPs per token of LoRA at ``rank`` on the same matrices."""
    params = sum(rank * (t.in_features + t.out_features) for t in targets)
    return params, float(2 * params)


__all__ = [
    "NOMINAL_TOKENS",
    "TOKENS",
    "best_route",
    "lora_equivalent",
    "route_path_flops",
    "stage_flops",
    "total_flops",
]
