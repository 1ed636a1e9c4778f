"""``plan()``: spec × architecture → an immutable, printable, JSON-able :class:`Plan`.

The plan fixes, before any module exists: every tensor's axes and factors, which slice of which
tensor each target is, and the einsum that maps a target's input ``x[T, in]`` to its update
``[T, out]``. When one factor alone holds the input legs (LoRA's A, CP's and Tucker's ``in``
factor, TT's first core) the contraction is split in two stages: ``z = x·F_in`` is shared by every
target of the tensor that reads the same input (q, k and v of a layer), then each target contracts
``z`` with the rest. Planning needs no weights.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import opt_einsum as oe

from .arch.base import PROJECTIONS, Architecture, TargetSite
from .errors import PlanError
from .factorizations.base import Axis, FactorSpec, Network, nominal_rank
from .modes import WRITE_PROJECTIONS, out_side, tensor_axes
from .quant import MemoryPlan, memory_plan
from .spec import AdapterSpec, get_factorization, load_spec

#: token count used to price contractions per token (paths are re-chosen at run time per shape)
NOMINAL_TOKENS = 1024
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Stage:
    """One einsum: ``operands`` (``"x"``/``"z"`` or factor names) with ``equation``.

    ``shapes`` are the operand shapes with the token axis given as ``-1``.
    """

    equation: str
    operands: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    flops_per_token: float


@dataclass(frozen=True)
class Route:
    """The two-matrix form of a target's update: ``update = (x·P_in)·P_out``.

    ``P_in[x_dim, R]`` contracts the factors in ``in_factors`` (every factor holding an input leg,
    plus whichever others make the bond ``R`` cheapest), ``P_out[R, y_dim]`` the rest. Neither
    depends on the tokens, so both are computed once per forward (batched over the stacked axes,
    scaling folded in), ``x·P_in`` is shared by every target with the same ``in_key`` and input
    (q, k and v of a layer), and each target then costs one ``addmm`` into the base output.

    Attributes:
        in_factors, out_factors: the two groups of factors (names).
        x_legs, y_legs: the input / output legs, in flattening order.
        bond_legs: legs shared by both groups; ``R`` is the product of their sizes.
        rank: ``R``.
        fixed_flops: FLOPs to build ``P_in`` and ``P_out`` for this target (token-independent).
        flops_per_token: ``2·(x_dim·R + R·y_dim)``.
        in_key: targets with the same key reading the same input tensor share ``x·P_in``.
    """

    in_factors: tuple[str, ...]
    out_factors: tuple[str, ...]
    x_legs: tuple[str, ...]
    y_legs: tuple[str, ...]
    bond_legs: tuple[str, ...]
    rank: int
    fixed_flops: float
    flops_per_token: float
    in_key: str


@dataclass(frozen=True)
class TensorPlan:
    """One update tensor: its axes, its factors and its targets."""

    name: str
    axes: tuple[Axis, ...]
    factors: tuple[FactorSpec, ...]
    axis_legs: tuple[tuple[str, tuple[str, ...]], ...]
    leg_sizes: tuple[tuple[str, int], ...]
    zero_factor: str
    n_params: int

    @property
    def network(self) -> Network:
        """The factorization's :class:`Network` this tensor was planned from."""
        return Network(self.factors, self.axis_legs, self.leg_sizes, self.zero_factor)

    def axis_size(self, name: str) -> int:
        return {a.name: a.size for a in self.axes}[name]


@dataclass(frozen=True)
class TargetPlan:
    """One adapted matrix and how its update is computed.

    Attributes:
        layer, proj: which matrix.
        module: module path below the backbone (see :class:`~tensadapt.arch.base.TargetSite`).
        tensor: name of the :class:`TensorPlan` it is a slice of.
        index: fixed indices of the stacked axes, e.g. ``(("qkv", 1), ("depth", 3))``.
        transposed: write-out projection stored as ``ΔWᵀ`` (o, down).
        in_features, out_features: the matrix's real input/output width.
        out_slice: output columns of a fused module, else ``None``.
        layout: ``linear`` or ``conv1d``.
        selects: per factor operand, the ``(dim, index)`` picks that slice it (applied high dim first).
        stage_in: the shared input stage ``x·F_in -> z``, or ``None``.
        stage_out: the target stage (from ``z`` when ``stage_in`` is set, else from ``x``).
        delta: the einsum reconstructing this target's slice ``S[x_dim, y_dim]`` from its factors.
        share_key: targets with the same key and the same input share ``stage_in``'s result.
    """

    layer: int
    proj: str
    module: str
    tensor: str
    index: tuple[tuple[str, int], ...]
    transposed: bool
    in_features: int
    out_features: int
    out_slice: tuple[int, int] | None
    layout: str
    selects: tuple[tuple[str, tuple[tuple[int, int], ...]], ...]
    stage_in: Stage | None
    stage_out: Stage
    delta: Stage
    share_key: str
    route: Route | None = None

    @property
    def key(self) -> str:
        return f"{self.proj}.{self.layer}"

    def strategy(self, tokens: int) -> str:
        """The cheapest way to compute the update for ``tokens`` rows, by FLOPs at that count:
        ``route`` (``(x·P_in)·P_out``), ``rebuild`` (``x·S`` with ``S`` rebuilt once per forward)
        or, for networks without a route (MPO), ``stages`` (the opt_einsum stages). The route wins
        ties (within 1 %): it runs as one ``addmm`` per target with no per-call path dispatch."""
        costs = self.costs(tokens)
        if "route" in costs:  # exact at every token count; the stage estimate is per 1024 tokens
            return "route" if costs["route"] <= 1.01 * costs["rebuild"] else "rebuild"
        return min(costs.items(), key=lambda kv: kv[1])[0]

    def costs(self, tokens: int) -> dict[str, float]:
        """FLOPs of each strategy for ``tokens`` rows (shared work counted in full)."""
        out = {
            "rebuild": self.delta.flops_per_token
            + 2.0 * tokens * self.in_features * self.out_features,
            "stages": tokens
            * (
                self.stage_out.flops_per_token
                + (self.stage_in.flops_per_token if self.stage_in else 0.0)
            ),
        }
        if self.route is not None:
            out["route"] = self.route.fixed_flops + tokens * self.route.flops_per_token
        return out


@dataclass(frozen=True)
class Plan:
    """Everything :func:`~tensadapt.model` needs, as pure data. Prints itself as a table."""

    spec: AdapterSpec
    architecture: dict[str, Any]
    tensors: tuple[TensorPlan, ...]
    targets: tuple[TargetPlan, ...]
    n_params: int
    lora_params: int
    flops_per_token: float
    lora_flops_per_token: float
    model_params: int | None = None
    extras: tuple[tuple[str, Any], ...] = field(default_factory=tuple)
    #: bytes of trainable factors, targeted base weights and frozen residual (see quant.MemoryPlan)
    memory: MemoryPlan | None = None

    def tensor(self, name: str) -> TensorPlan:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def ratio_to_lora(self) -> float:
        return self.n_params / self.lora_params if self.lora_params else math.nan

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spec"] = self.spec.to_dict()
        d["format_version"] = FORMAT_VERSION
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        return format_plan(self)


def _arch_of(model_or_config: Any) -> Architecture:
    from . import arch as arch_mod

    if isinstance(model_or_config, Architecture):
        return model_or_config
    if isinstance(model_or_config, str):
        return arch_mod.from_config(arch_mod.load_config(model_or_config))
    if hasattr(model_or_config, "named_modules"):
        return arch_mod.from_model(model_or_config)
    return arch_mod.from_config(model_or_config)


def _model_params(model_or_config: Any, arch: Architecture) -> int | None:
    if hasattr(model_or_config, "parameters"):
        return sum(p.numel() for p in model_or_config.parameters())
    return None


def plan(
    spec: AdapterSpec | Mapping[str, Any] | str | os.PathLike[str], model_or_config: Any
) -> Plan:
    """Compile ``spec`` against an architecture.

    Args:
        spec: an :class:`AdapterSpec`, or anything :func:`load_spec` takes.
        model_or_config: a model (any device, ``meta`` included), a ``transformers`` config, an
            :class:`Architecture`, or a preset name / local path.
    Returns:
        the :class:`Plan`.
    Raises:
        PlanError: the spec names targets or layers this architecture lacks, or ranks/options that
            do not fit its sizes.
    """
    spec = load_spec(spec if isinstance(spec, AdapterSpec | Mapping | str) else Path(spec))
    arch = _arch_of(model_or_config)
    fact = get_factorization(spec.factorization)
    options = fact.parse_options(spec.options)

    layers = list(range(arch.n_layers)) if spec.layers == "all" else list(spec.layers)
    bad_layers = [i for i in layers if i >= arch.n_layers]
    if bad_layers:
        raise PlanError(
            f"layers: {bad_layers} out of range; {arch.family} has layers 0..{arch.n_layers - 1}"
        )
    missing = [p for p in spec.targets if p not in arch.projections]
    if missing:
        raise PlanError(
            f"targets: {arch.family} has no projection(s) {missing}; it has {', '.join(arch.projections)}"
        )
    modes = tuple(spec.modes)
    sites = [arch.site(layer, p) for layer in layers for p in spec.targets]

    # group sites by oriented shape; within a group, split along modes that are not stacked
    groups: dict[tuple[int, int, int], list[TargetSite]] = {}
    for s in sites:
        groups.setdefault(_group_key(s, modes), []).append(s)
    tensors: list[TensorPlan] = []
    targets: list[TargetPlan] = []
    problems: list[str] = []
    lora_params = 0
    r_nom = nominal_rank(spec.rank)
    for key, members in groups.items():
        projs = [p for p in PROJECTIONS if any(m.proj == p for m in members)]
        gname = "_".join(projs)
        parts: dict[tuple[str, ...], list[TargetSite]] = {}
        for m in members:
            part = ((gname,) if "qkv" in modes else (m.proj,)) + (
                () if "depth" in modes else (f"l{m.layer}",)
            )
            parts.setdefault(part, []).append(m)
        for part, ms in parts.items():
            name = "__".join(part)  # e.g. q_k_v (stacked), q__l3 (per matrix)
            n_in, n_out, n_heads = key
            axes = tensor_axes(modes, n_in, n_out, n_heads, len(projs), len(layers))
            try:
                problems += [f"{name}: {p}" for p in fact.check(axes, spec.rank, options)]
                if problems:
                    continue
                net = fact.network(axes, spec.rank, options)
            except KeyError as e:  # a rank mapping without this tensor's axis (e.g. MLP 'out')
                axes_txt = ", ".join(a.name for a in axes)
                problems.append(f"rank: tensor {name} has axes ({axes_txt}); {e.args[0]}")
                continue
            tp = TensorPlan(
                name, axes, net.factors, net.axis_legs, net.leg_sizes, net.zero_factor, net.n_params
            )
            tensors.append(tp)
            for m in ms:
                index = []
                if "qkv" in modes:
                    index.append(("qkv", projs.index(m.proj)))
                if "depth" in modes:
                    index.append(("depth", layers.index(m.layer)))
                targets.append(_target_plan(tp, m, tuple(index)))
                lora_params += r_nom * (m.in_features + m.out_features)
    if problems:
        raise PlanError("; ".join(problems))

    flops = _total_flops(targets)
    return Plan(
        spec=spec,
        architecture=arch.fingerprint(),
        tensors=tuple(tensors),
        targets=tuple(sorted(targets, key=lambda t: (t.layer, PROJECTIONS.index(t.proj)))),
        n_params=sum(t.n_params for t in tensors),
        lora_params=lora_params,
        flops_per_token=flops,
        lora_flops_per_token=float(
            sum(2 * r_nom * (t.in_features + t.out_features) for t in targets)
        ),
        model_params=_model_params(model_or_config, arch),
        memory=memory_plan(
            [t.in_features * t.out_features for t in targets],
            sum(t.n_params for t in tensors),
            spec.residual,
            spec.base,
            _weight_dtype(model_or_config),
        ),
    )


def _weight_dtype(model_or_config: Any) -> str:
    """The base weights' dtype: the model's, the config's ``dtype``, else float32 (from_config)."""
    if hasattr(model_or_config, "parameters"):
        for p in model_or_config.parameters():
            if p.is_floating_point():
                return str(p.dtype).removeprefix("torch.")
    cfg = model_or_config
    if isinstance(cfg, str):
        from . import arch as arch_mod

        cfg = arch_mod.load_config(cfg)
    d = getattr(cfg, "dtype", None)
    return str(d).removeprefix("torch.") if d not in (None, "auto") else "float32"


def _group_key(s: TargetSite, modes: Sequence[str]) -> tuple[int, int, int]:
    n_in, n_out = (
        (s.out_features, s.in_features)
        if s.proj in WRITE_PROJECTIONS
        else (s.in_features, s.out_features)
    )
    heads = s.n_heads if ("heads" in modes and s.head_side is not None) else 0
    return (n_in, n_out, heads)


def _target_plan(
    tp: TensorPlan, site: TargetSite, index: tuple[tuple[str, int], ...]
) -> TargetPlan:
    axes_legs = dict(tp.axis_legs)
    transposed = site.proj in WRITE_PROJECTIONS
    head_side = out_side(tp.axes)
    x_axes, y_axes = (head_side, ["in"]) if transposed else (["in"], head_side)
    x_legs = [leg for a in x_axes for leg in axes_legs[a]]
    y_legs = [leg for a in y_axes for leg in axes_legs[a]]
    fixed = {axes_legs[a][0]: i for a, i in index}
    sizes = dict(tp.leg_sizes)

    sliced: list[tuple[str, tuple[str, ...], tuple[int, ...]]] = []
    selects = []
    for f in tp.factors:
        picks = tuple(
            sorted(((d, fixed[leg]) for d, leg in enumerate(f.legs) if leg in fixed), reverse=True)
        )
        legs = tuple(leg for leg in f.legs if leg not in fixed)
        sliced.append((f.name, legs, tuple(sizes[leg] for leg in legs)))
        selects.append((f.name, picks))

    sym: dict[str, str] = {}

    def s(legs: Sequence[str]) -> str:
        for leg in legs:
            sym.setdefault(leg, oe.get_symbol(len(sym)))
        return "".join(sym[leg] for leg in legs)

    tok = "__tokens__"
    x_shape = tuple(sizes[leg] for leg in x_legs)
    holders = [f for f in sliced if set(f[1]) & set(x_legs)]
    stage_in = None
    share_key = f"{tp.name}:{'T' if transposed else 'N'}"
    if len(holders) == 1 and set(x_legs) <= set(holders[0][1]) and not dict(selects)[holders[0][0]]:
        fin = holders[0]
        bonds = [leg for leg in fin[1] if leg not in x_legs]
        eq1 = f"{s([tok, *x_legs])},{s(fin[1])}->{s([tok, *bonds])}"
        stage_in = _stage(eq1, ("x", fin[0]), ((-1, *x_shape), fin[2]))
        rest = [f for f in sliced if f is not fin]
        z_shape = tuple(sizes[leg] for leg in bonds)
        eq2 = ",".join([s([tok, *bonds])] + [s(f[1]) for f in rest]) + "->" + s([tok, *y_legs])
        stage_out = _stage(
            eq2, ("z", *[f[0] for f in rest]), ((-1, *z_shape), *[f[2] for f in rest])
        )
    else:
        eq = ",".join([s([tok, *x_legs])] + [s(f[1]) for f in sliced]) + "->" + s([tok, *y_legs])
        stage_out = _stage(
            eq, ("x", *[f[0] for f in sliced]), ((-1, *x_shape), *[f[2] for f in sliced])
        )
    eqd = ",".join(s(f[1]) for f in sliced) + "->" + s([*x_legs, *y_legs])
    delta = _stage(eqd, tuple(f[0] for f in sliced), tuple(f[2] for f in sliced), tokens=False)
    route = _route(tp.name, sliced, selects, x_legs, y_legs, sizes, transposed)
    return TargetPlan(
        layer=site.layer,
        proj=site.proj,
        module=site.module,
        tensor=tp.name,
        index=index,
        transposed=transposed,
        in_features=site.in_features,
        out_features=site.out_features,
        out_slice=site.out_slice,
        layout=site.layout,
        selects=tuple(selects),
        stage_in=stage_in,
        stage_out=stage_out,
        delta=delta,
        share_key=share_key,
        route=route,
    )


def _route(
    tensor: str,
    sliced: Sequence[tuple[str, tuple[str, ...], tuple[int, ...]]],
    selects: Sequence[tuple[str, tuple[tuple[int, int], ...]]],
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
    xs, ys = set(x_legs), set(y_legs)
    must_in = [f for f in sliced if set(f[1]) & xs]
    must_out = [f for f in sliced if set(f[1]) & ys]
    if any(f in must_out for f in must_in) or not must_in or not must_out:
        return None
    free = [f for f in sliced if f not in must_in and f not in must_out]
    x_dim = math.prod(sizes[leg] for leg in x_legs)
    y_dim = math.prod(sizes[leg] for leg in y_legs)
    best: tuple[float, Route] | None = None
    for mask in range(1 << len(free)):
        ins = must_in + [f for i, f in enumerate(free) if mask >> i & 1]
        outs = must_out + [f for i, f in enumerate(free) if not mask >> i & 1]
        in_legs = {leg for f in ins for leg in f[1]}
        out_legs = {leg for f in outs for leg in f[1]}
        bonds = tuple(
            dict.fromkeys(leg for f in sliced for leg in f[1] if leg in in_legs & out_legs)
        )
        rank = math.prod(sizes[leg] for leg in bonds)
        fixed = _group_flops(ins, [*x_legs, *bonds], sizes) + _group_flops(
            outs, [*bonds, *y_legs], sizes
        )
        per_token = 2.0 * (x_dim * rank + rank * y_dim)
        cost = fixed + NOMINAL_TOKENS * per_token
        if best is None or cost < best[0]:
            picks = dict(selects)
            in_key = f"{tensor}:" + ",".join(f"{f[0]}{list(picks[f[0]])}" for f in ins)
            best = (
                cost,
                Route(
                    in_factors=tuple(f[0] for f in ins),
                    out_factors=tuple(f[0] for f in outs),
                    x_legs=tuple(x_legs),
                    y_legs=tuple(y_legs),
                    bond_legs=bonds,
                    rank=rank,
                    fixed_flops=fixed,
                    flops_per_token=per_token,
                    in_key=in_key + (":T" if transposed else ":N"),
                ),
            )
    return best[1] if best else None


def _group_flops(
    group: Sequence[tuple[str, tuple[str, ...], tuple[int, ...]]],
    keep: Sequence[str],
    sizes: Mapping[str, int],
) -> float:
    """opt_einsum's optimal FLOPs to contract ``group`` into the legs ``keep`` (0 for one factor)."""
    if len(group) < 2:
        return 0.0
    sym: dict[str, str] = {}
    for f in group:
        for leg in f[1]:
            sym.setdefault(leg, oe.get_symbol(len(sym)))
    eq = ",".join("".join(sym[leg] for leg in f[1]) for f in group)
    eq += "->" + "".join(sym[leg] for leg in keep)
    return _path_cost(eq, tuple(f[2] for f in group))


@functools.lru_cache(maxsize=4096)
def _path_cost(eq: str, shapes: tuple[tuple[int, ...], ...]) -> float:
    """opt_einsum's FLOPs on its best path (memoised: the targets of one tensor share shapes)."""
    _, info = oe.contract_path(
        eq, *shapes, shapes=True, optimize="optimal" if len(shapes) <= 6 else "auto"
    )
    return float(info.opt_cost)


def route_path_flops(t: TargetPlan, tp: TensorPlan, tokens: int) -> tuple[float, float]:
    """``(ours, optimal)``: opt_einsum's FLOP count of the whole target network ``x, factors ->
    update`` at ``tokens`` rows on the path the adapter runs (``route``: build ``P_in``, ``P_out``,
    then ``x·P_in·P_out``; else the rebuild or stage path), and on opt_einsum's ``optimal`` path.
    Shared work (``x·P_in`` for q, k and v) is counted in full for every target.
    """
    sizes = dict(tp.leg_sizes)
    picks = dict(t.selects)
    ops = []
    for f in tp.factors:
        drop = {d for d, _ in picks[f.name]}
        legs = tuple(leg for d, leg in enumerate(f.legs) if d not in drop)
        ops.append((f.name, legs))
    axes_legs = dict(tp.axis_legs)
    head_side = out_side(tp.axes)
    x_axes, y_axes = (head_side, ["in"]) if t.transposed else (["in"], head_side)
    xl = [leg for a in x_axes for leg in axes_legs[a]]
    yl = [leg for a in y_axes for leg in axes_legs[a]]
    sym: dict[str, str] = {}

    def s(legs: Sequence[str]) -> str:
        for leg in legs:
            sym.setdefault(leg, oe.get_symbol(len(sym)))
        return "".join(sym[leg] for leg in legs)

    tok = "__tokens__"
    sizes[tok] = tokens
    eq = ",".join([s([tok, *xl])] + [s(legs) for _, legs in ops]) + "->" + s([tok, *yl])
    shapes = [tuple(sizes[leg] for leg in [tok, *xl])] + [
        tuple(sizes[leg] for leg in legs) for _, legs in ops
    ]
    _, opt = oe.contract_path(
        eq, *shapes, shapes=True, optimize="optimal" if len(shapes) <= 7 else "auto-hq"
    )
    # the route's P_in / P_out are contracted on opt_einsum's optimal path (fixed_flops), then
    # x·P_in and z·P_out cost 2·T·X·R and 2·T·R·Y: opt_einsum's own convention for both
    return t.costs(tokens)[t.strategy(tokens)], float(opt.opt_cost)


@functools.lru_cache(maxsize=4096)
def _stage(
    eq: str, operands: tuple[str, ...], shapes: tuple[tuple[int, ...], ...], tokens: bool = True
) -> Stage:
    """Price one einsum (cached: the targets of a tensor share a handful of equations)."""
    real = tuple(tuple(NOMINAL_TOKENS if d == -1 else d for d in sh) for sh in shapes)
    cost = _path_cost(eq, real) / (NOMINAL_TOKENS if tokens else 1)
    return Stage(eq, operands, shapes, cost)


def _total_flops(targets: Sequence[TargetPlan]) -> float:
    seen: set[tuple[str, int]] = set()
    total = 0.0
    for t in targets:
        if t.stage_in is not None and (t.share_key, t.layer) not in seen:
            seen.add((t.share_key, t.layer))
            total += t.stage_in.flops_per_token
        total += t.stage_out.flops_per_token
    return total


def _fmt_int(n: int | float) -> str:
    return f"{int(n):,}"


def format_plan(p: Plan) -> str:
    """The plan as a text table (what ``tensadapt plan`` prints)."""
    spec = p.spec
    a = p.architecture
    head = (
        f"tensadapt plan: {spec.factorization} over modes [{', '.join(spec.modes) or 'none'}], "
        f"targets {','.join(spec.targets)}, rank {spec.rank}\n"
        f"model: {a['family']} ({a['model_type']}), {a['n_layers']} layers, d={a['hidden_size']}, "
        f"heads={a['n_heads']}, kv_heads={a['n_kv_heads']}, head_dim={a['head_dim']}\n"
    )
    rows = [("tensor", "axes", "factors", "params", "targets")]
    counts: dict[str, int] = {}
    for t in p.targets:
        counts[t.tensor] = counts.get(t.tensor, 0) + 1
    shown = p.tensors if len(p.tensors) <= 12 else (*p.tensors[:10], None, p.tensors[-1])
    for tp in shown:
        if tp is None:
            rows.append((f"... {len(p.tensors) - 11} more", "", "", "", ""))
            continue
        axes = " × ".join(f"{x.name}={x.size}" for x in tp.axes)
        facs = " ".join(f"{f.name}{list(f.shape)}" for f in tp.factors)
        rows.append((tp.name, axes, facs, _fmt_int(tp.n_params), str(counts.get(tp.name, 0))))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    widths[2] = min(widths[2], 70)
    lines = []
    for i, r in enumerate(rows):
        cells = [r[j] if j != 2 or len(r[j]) <= 70 else r[j][:67] + "..." for j in range(5)]
        lines.append(
            "  ".join(c.ljust(widths[j]) if j < 4 else c for j, c in enumerate(cells)).rstrip()
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    pct = f" ({100 * p.n_params / p.model_params:.4f}% of the model)" if p.model_params else ""
    tail = (
        f"\ntrainable parameters: {_fmt_int(p.n_params)}{pct}\n"
        f"LoRA at rank {nominal_rank(spec.rank)} on the same targets: {_fmt_int(p.lora_params)} "
        f"(ratio {p.ratio_to_lora:.4f})\n"
        f"adapter FLOPs per token: {_fmt_int(p.flops_per_token)} "
        f"(LoRA: {_fmt_int(p.lora_flops_per_token)})\n"
        f"targets: {len(p.targets)} matrices in {len(p.tensors)} tensor(s)"
    )
    extra = "".join(f"\n{k}: {v}" for k, v in p.extras)
    if p.memory is not None:
        extra = "".join(f"\n{line}" for line in p.memory.lines()) + extra
    return head + "\n".join(lines) + tail + extra
