"""``plan()``: spec × architecture → an immutable, printable, JSON-able :class:`Plan`.

The plan fixes, before any module exists: every tensor's axes and factors, which slice of which
tensor each target is, its input and output legs (``x_legs``, ``y_legs``: stored here once, read by
the executor, the initialisers and export), and the einsums that map a target's input ``x[T, in]``
to its update ``[T, out]``. When one factor alone holds the input legs (LoRA's A, CP's and Tucker's
``in`` factor, TT's first core) the contraction is split in two stages: ``z = x·F_in`` is shared by
every target of the tensor that reads the same input (q, k and v of a layer), then each target
contracts ``z`` with the rest. Planning needs no weights.

Pricing lives in :mod:`tensadapt.costs`, the printed table in :mod:`tensadapt.plan_table`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from torch import nn

from . import contract
from .arch.base import PROJECTIONS, Architecture, ExpertWeights, Fused, TargetSite
from .costs import TOKENS, best_route, lora_equivalent, stage_flops, total_flops
from .errors import PlanError
from .factorizations.base import Axis, FactorSpec, Network, nominal_rank
from .modes import WRITE_PROJECTIONS, tensor_axes
from .quant import MemoryPlan, memory_plan
from .spec import AdapterSpec, get_factorization, load_spec

if TYPE_CHECKING:
    from transformers import PretrainedConfig

#: what a plan is made against: a model (any device, ``meta`` included), a ``transformers``
#: config, an :class:`Architecture`, or a preset name / local path
ModelOrConfig: TypeAlias = "nn.Module | PretrainedConfig | Architecture | str"

#: bytes a plan may ask to allocate for its factors before planning refuses (see :func:`plan`)
MAX_FACTOR_BYTES = 64 * 2**30


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
        bond_legs: legs shared by both groups; ``R`` is the product of their sizes.
        rank: ``R``.
        fixed_flops: FLOPs to build ``P_in`` and ``P_out`` for this target (token-independent).
        flops_per_token: ``2·(x_dim·R + R·y_dim)``.
        in_key: targets with the same key reading the same input tensor share ``x·P_in``.
    """

    in_factors: tuple[str, ...]
    out_factors: tuple[str, ...]
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
        transposed: the slice is ``ΔWᵀ``: its ``in`` axis is the matrix's output (o and down;
            every attention projection under ``orientation: lorta``).
        in_features, out_features: the matrix's real input/output width.
        fused: where this projection's rows sit in a fused module (``None`` if not fused).
        layout: ``linear`` or ``conv1d``.
        selects: per factor, the ``(dim, index)`` picks that slice it (applied high dim first).
        x_legs, y_legs: the tensor legs of the matrix's input and output, in flattening order:
            ``update(x) = x·S`` with ``S[x_legs..., y_legs...]`` reshaped to ``[in, out]``.
        stage_in: the shared input stage ``x·F_in -> z``, or ``None``.
        stage_out: the target stage (from ``z`` when ``stage_in`` is set, else from ``x``).
        delta: the einsum reconstructing this target's slice ``S[x_legs, y_legs]`` from its factors.
        share_key: targets with the same key and the same input share ``stage_in``'s result.
        route: the two-matrix form, or ``None`` (MPO cores hold both sides).
        experts: for a mixture-of-experts projection, the stacked parameter it lives in.
        expert: which expert of it (its index on the parameter's first dimension).
    """

    layer: int
    proj: str
    module: str
    tensor: str
    index: tuple[tuple[str, int], ...]
    transposed: bool
    in_features: int
    out_features: int
    fused: Fused | None
    layout: str
    selects: tuple[tuple[str, tuple[tuple[int, int], ...]], ...]
    x_legs: tuple[str, ...]
    y_legs: tuple[str, ...]
    stage_in: Stage | None
    stage_out: Stage
    delta: Stage
    share_key: str
    route: Route | None = None
    experts: ExpertWeights | None = None
    expert: int | None = None

    @property
    def key(self) -> str:
        base = f"{self.proj}.{self.layer}"
        return base if self.expert is None else f"{base}.e{self.expert}"

    @property
    def out_slice(self) -> tuple[int, int] | None:
        """Contiguous output columns of a column-block fused projection, else ``None``."""
        return self.fused.columns if self.fused is not None else None

    def sliced_legs(self, factor: FactorSpec) -> tuple[str, ...]:
        """The legs ``factor`` keeps once this target's stacked indices are fixed."""
        drop = {dim for dim, _ in dict(self.selects)[factor.name]}
        return tuple(leg for d, leg in enumerate(factor.legs) if d not in drop)

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
    """Everything the adapted model needs, as pure data. Prints itself as a table."""

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
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        from .plan_table import format_plan

        return format_plan(self)


def _arch_of(model_or_config: ModelOrConfig) -> Architecture:
    from . import arch as arch_mod

    if isinstance(model_or_config, Architecture):
        return model_or_config
    if isinstance(model_or_config, str):
        return arch_mod.from_config(arch_mod.load_config(model_or_config))
    if isinstance(model_or_config, nn.Module):
        return arch_mod.from_model(model_or_config)
    return arch_mod.from_config(model_or_config)


def plan(
    spec: AdapterSpec | Mapping[str, Any] | str | os.PathLike[str], model_or_config: ModelOrConfig
) -> Plan:
    """Compile ``spec`` against an architecture.

    Args:
        spec: an :class:`AdapterSpec`, or anything :func:`load_spec` takes.
        model_or_config: a model (any device, ``meta`` included), a ``transformers`` config, an
            :class:`Architecture`, or a preset name / local path.
    Returns:
        the :class:`Plan`.
    Raises:
        PlanError: the spec names targets or layers this architecture lacks, ranks/options that
            do not fit its sizes, or factors too large to allocate (more than
            :data:`MAX_FACTOR_BYTES` in float32).
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
    lorta = getattr(spec, "orientation", "head-consistent") == "lorta"
    strided = getattr(spec, "head_layout", "contiguous") == "strided"
    wanted = set(layers)
    sites = [s for s in arch.sites if s.proj in spec.targets and s.layer in wanted]
    if not sites:
        raise PlanError(f"targets {list(spec.targets)} exist in none of the layers {layers}")
    # the layers each projection exists in with each shape (a model may have a projection only in
    # some layers -- cross attention in the decoder -- or in two widths -- a dense MLP in some
    # layers, a shared expert in others)
    present: dict[tuple[str, int, int, int], tuple[int, ...]] = {}
    for s in sites:
        k = (s.proj, *_oriented(s, lorta), s.n_experts)
        present[k] = (*present.get(k, ()), s.layer)

    # every matrix: (site, expert) -- a mixture-of-experts site holds one matrix per expert
    matrices = [(s, e) for s in sites for e in (range(s.n_experts) if s.experts else (None,))]
    # group them by oriented shape, expert count and the layers they exist in (an
    # encoder-decoder's cross attention exists in decoder layers only); within a group, split
    # along unstacked modes
    groups: dict[tuple[int, int, int, int, tuple[int, ...]], list[tuple[TargetSite, int | None]]]
    groups = {}
    for s, e in matrices:
        n_in, n_out = _oriented(s, lorta)
        heads = s.n_heads if ("heads" in modes and s.head_side is not None) else 0
        where = present[(s.proj, n_in, n_out, s.n_experts)]
        groups.setdefault((n_in, n_out, heads, s.n_experts, where), []).append((s, e))
    tensors: list[TensorPlan] = []
    targets: list[TargetPlan] = []
    problems: list[str] = []
    taken: set[str] = set()
    for (n_in, n_out, n_heads, n_experts, group_layers), members in groups.items():
        projs = [p for p in PROJECTIONS if any(m.proj == p for m, _ in members)]
        gname = "_".join(projs)
        if gname in taken:  # the same projections in another shape: a name of its own
            gname = f"{gname}_{n_in}x{n_out}"
        taken.add(gname)
        parts: dict[tuple[str, ...], list[tuple[TargetSite, int | None]]] = {}
        for m, e in members:
            part = ((gname,) if "qkv" in modes else (m.proj,)) + (
                () if "depth" in modes else (f"l{m.layer}",)
            )
            if e is not None and "experts" not in modes:
                part += (f"e{e}",)
            parts.setdefault(part, []).append((m, e))
        for part, ms in parts.items():
            name = "__".join(part)  # e.g. q_k_v (stacked), q__l3 (per matrix)
            axes = tensor_axes(
                modes, n_in, n_out, n_heads, len(projs), len(group_layers), n_experts
            )
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
            names = {a.name for a in axes}
            for m, expert in ms:
                index = []
                if "qkv" in modes:
                    index.append(("qkv", projs.index(m.proj)))
                if "experts" in names and expert is not None:
                    index.append(("experts", expert))
                if "depth" in modes:
                    index.append(("depth", group_layers.index(m.layer)))
                targets.append(_target_plan(tp, m, tuple(index), lorta, strided, expert))
    if problems:
        raise PlanError("; ".join(problems))
    n_params = sum(t.n_params for t in tensors)
    if 4 * n_params > MAX_FACTOR_BYTES:
        raise PlanError(
            f"rank: the factors would hold {n_params:,} parameters "
            f"({4 * n_params / 2**30:.1f} GiB in float32), more than the "
            f"{MAX_FACTOR_BYTES // 2**30} GiB tensadapt allows; lower the rank"
        )

    r_nom = nominal_rank(spec.rank)
    lora_params, lora_flops = lora_equivalent(targets, r_nom)
    return Plan(
        spec=spec,
        architecture=arch.fingerprint(),
        tensors=tuple(tensors),
        targets=tuple(
            sorted(targets, key=lambda t: (t.layer, PROJECTIONS.index(t.proj), t.expert or 0))
        ),
        n_params=n_params,
        lora_params=lora_params,
        flops_per_token=total_flops(targets),
        lora_flops_per_token=lora_flops,
        model_params=_model_params(model_or_config),
        memory=memory_plan(
            [t.in_features * t.out_features for t in targets],
            n_params,
            spec.residual,
            spec.base,
            _weight_dtype(model_or_config),
        ),
    )


def _model_params(model_or_config: ModelOrConfig) -> int | None:
    if isinstance(model_or_config, nn.Module):
        return sum(p.numel() for p in model_or_config.parameters())
    return None


def _weight_dtype(model_or_config: ModelOrConfig) -> str:
    """The base weights' dtype: the model's, the config's ``dtype``, else float32 (from_config)."""
    if isinstance(model_or_config, nn.Module):
        for p in model_or_config.parameters():
            if p.is_floating_point():
                return str(p.dtype).removeprefix("torch.")
    cfg = model_or_config
    if isinstance(cfg, str):
        from . import arch as arch_mod

        cfg = arch_mod.load_config(cfg)
    d = getattr(cfg, "dtype", None)
    return str(d).removeprefix("torch.") if d not in (None, "auto") else "float32"


def _transposed(s: TargetSite, lorta: bool) -> bool:
    """Whether the slice is ``ΔWᵀ``: write-out projections always; with the LoRTA authors'
    orientation every head-structured projection (q, k, v as well as o)."""
    return s.proj in WRITE_PROJECTIONS or (lorta and s.head_side is not None)


def _oriented(s: TargetSite, lorta: bool) -> tuple[int, int]:
    """``(in, out)`` widths of the oriented slice: its ``in`` axis first."""
    if _transposed(s, lorta):
        return s.out_features, s.in_features
    return s.in_features, s.out_features


def _target_plan(
    tp: TensorPlan,
    site: TargetSite,
    index: tuple[tuple[str, int], ...],
    lorta: bool,
    strided: bool,
    expert: int | None = None,
) -> TargetPlan:
    axes_legs = dict(tp.axis_legs)
    transposed = _transposed(site, lorta)
    names = [a.name for a in tp.axes]
    # the head side in flattening order: contiguous heads are the model's real heads (head
    # outer, head_dim inner); strided ones interleave them (head_dim outer), as tl.unfold does
    if "heads" in names:
        head_side = ["head_dim", "heads"] if strided else ["heads", "head_dim"]
    else:
        head_side = ["out"]
    x_axes, y_axes = (head_side, ["in"]) if transposed else (["in"], head_side)
    x_legs = tuple(leg for a in x_axes for leg in axes_legs[a])
    y_legs = tuple(leg for a in y_axes for leg in axes_legs[a])
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
    picks_of = dict(selects)

    x_shape = tuple(sizes[leg] for leg in x_legs)
    holders = [f for f in sliced if set(f[1]) & set(x_legs)]
    stage_in = None
    share_key = f"{tp.name}:{'T' if transposed else 'N'}"
    if len(holders) == 1 and set(x_legs) <= set(holders[0][1]) and not picks_of[holders[0][0]]:
        fin = holders[0]
        bonds = tuple(leg for leg in fin[1] if leg not in x_legs)
        stage_in = _stage(
            [(TOKENS, *x_legs), fin[1]],
            (TOKENS, *bonds),
            ("x", fin[0]),
            ((-1, *x_shape), fin[2]),
            sizes,
        )
        rest = [f for f in sliced if f is not fin]
        z_shape = tuple(sizes[leg] for leg in bonds)
        stage_out = _stage(
            [(TOKENS, *bonds), *[f[1] for f in rest]],
            (TOKENS, *y_legs),
            ("z", *[f[0] for f in rest]),
            ((-1, *z_shape), *[f[2] for f in rest]),
            sizes,
        )
    else:
        stage_out = _stage(
            [(TOKENS, *x_legs), *[f[1] for f in sliced]],
            (TOKENS, *y_legs),
            ("x", *[f[0] for f in sliced]),
            ((-1, *x_shape), *[f[2] for f in sliced]),
            sizes,
        )
    delta_eq = contract.equation([f[1] for f in sliced], (*x_legs, *y_legs))
    delta = Stage(
        delta_eq,
        tuple(f[0] for f in sliced),
        tuple(f[2] for f in sliced),
        contract.flops([f[1] for f in sliced], (*x_legs, *y_legs), sizes),
    )
    route = best_route(tp.name, sliced, picks_of, x_legs, y_legs, sizes, transposed)
    return TargetPlan(
        layer=site.layer,
        proj=site.proj,
        module=site.module,
        tensor=tp.name,
        index=index,
        transposed=transposed,
        in_features=site.in_features,
        out_features=site.out_features,
        fused=site.fused,
        layout=site.layout,
        selects=tuple(selects),
        x_legs=x_legs,
        y_legs=y_legs,
        stage_in=stage_in,
        stage_out=stage_out,
        delta=delta,
        share_key=share_key,
        route=route,
        experts=site.experts,
        expert=expert,
    )


def _stage(
    inputs: Sequence[Sequence[str]],
    output: Sequence[str],
    operands: tuple[str, ...],
    shapes: tuple[tuple[int, ...], ...],
    sizes: Mapping[str, int],
) -> Stage:
    """One token-carrying einsum, priced per token."""
    return Stage(
        contract.equation(inputs, output), operands, shapes, stage_flops(inputs, output, sizes)
    )


def format_plan(p: Plan) -> str:
    """The plan as a text table (see :mod:`tensadapt.plan_table`)."""
    from .plan_table import format_plan as fmt

    return fmt(p)


__all__ = [
    "MAX_FACTOR_BYTES",
    "Plan",
    "Route",
    "Stage",
    "TargetPlan",
    "TensorPlan",
    "format_plan",
    "plan",
]
