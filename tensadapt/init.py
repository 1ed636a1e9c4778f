"""Initialisers: how an adapter's factors start, and the frozen residual a pretrained one leaves.

``init: zeros`` needs nothing from here (:func:`~tensadapt.factorizations.base.default_init` gives a
zero update). Each other init is an :class:`Initializer` in the registry. Two reproduce the papers'
own zero-update initialisations exactly (``pretrained = False``; see ``docs/papers.md``):
:func:`lorta` (the LoRTA authors' CP init) and :func:`tenslora` (the TensLoRA authors' Tucker / CP
init). The pretrained ones (``svd``, ``mpo``) start the factors from a decomposition of the
*pretrained* weights that the spec targets, stacked into the same tensor as the update:

1. :func:`pretrained_tensor` puts each target's ``S0 = W0ᵀ`` (``[in_features, out_features]``, the
   inverse of :meth:`~tensadapt.nn.TensorAdapter.delta_slice`) into the tensor at the target's
   ``index``, reshaped into its legs; the result is divided by the spec's ``scaling``.
2. :func:`decompose` runs tensorly (PyTorch backend, in a scoped ``backend_context``, on the weights'
   own device) and maps the decomposition onto the network's factor names (:data:`DECOMPOSERS`):

   ======  ==========================================================================================
   format  decomposition → factors
   ======  ==========================================================================================
   lora    truncated (randomised when large) SVD of the ``in × rest`` unfolding: ``A = U√S``,
           ``B = V√S`` (PiSSA)
   tucker  HOOI started from HOSVD (``tensorly.decomposition.tucker``): core, ``U_axis``
   cp      CP-ALS with SVD init (``parafac``); the weights λ are spread as ``λ^(1/N)`` over the
           factors
   tt      TT-SVD (``tensor_train``) over the axes, cores ``[r, axis, r]``
   mpo     DoTA's MPO: TT-SVD of the tensor reshaped to ``(I1·J1, I2·J2, …, I_N·J_N, rest…)``,
           cores reshaped to ``[r, I_k, J_k, r]``
   ======  ==========================================================================================

   When a bond is larger than the decomposition can fill (rank > a mode's size), the factor is
   padded: one side of the bond gets zeros, the other small noise, so the reconstruction is unchanged
   and gradients still reach the padded entries.
3. :func:`initialize` (called by :func:`~tensadapt.model`) copies the factors into the adapter and
   replaces each targeted base weight by the residual ``W0 − ΔW(init)`` (``residual: frozen``), by
   that residual in NF4 (``residual: nf4``, :class:`~tensadapt.quant.NF4Linear`), or, for
   ``base: nf4`` with ``init: zeros``, by ``W0`` in NF4. The figures (approximation error of the init,
   quantisation error against its bound, a checksum of every residual) are kept in an
   :class:`InitReport` at ``model.tensadapt_adapter.init_report``.

Everything is deterministic for the same base weights (fixed seeds for randomised SVD and padding
noise), so :func:`~tensadapt.load_adapter` rebuilds the same residual instead of storing it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .errors import PlanError
from .factorizations.base import Network

if TYPE_CHECKING:
    from .nn import AdaptedLinear, TensorAdapter
    from .planner import Plan, TargetPlan, TensorPlan

#: seed of every random choice an initialiser makes (randomised SVD, padding noise)
INIT_SEED = 0
#: matrices whose smaller side reaches this use randomised SVD when the rank is small
RANDOMIZED_MIN_SIDE = 1024

Decomposer = Callable[[Network, torch.Tensor, torch.Generator], dict[str, torch.Tensor]]


# -- the pretrained tensor ----------------------------------------------------------------------
def target_matrix(t: TargetPlan, weight: torch.Tensor) -> torch.Tensor:
    """The target's pretrained matrix as ``S0[in_features, out_features]`` (``x·S0`` = its output).

    Args:
        t: the target.
        weight: the module's weight, ``[out, in]`` (linear) or ``[in, out]`` (conv1d), whole module
            (a fused module's rows are cut with ``t.fused``).
    """
    from . import fused

    if t.layout == "conv1d":
        s = fused.gather(weight, t.fused, 1)
    else:
        s = fused.gather(weight, t.fused, 0).t()
    if tuple(s.shape) != (t.in_features, t.out_features):
        raise PlanError(
            f"{t.key}: weight slice has shape {tuple(s.shape)}, the plan expects "
            f"[{t.in_features}, {t.out_features}]"
        )
    return s


def pretrained_tensor(
    tp: TensorPlan, targets: Sequence[TargetPlan], mats: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Stack the targets' pretrained matrices into the update tensor's layout.

    Args:
        tp: the tensor.
        targets: its targets.
        mats: target key (``"q.3"``) -> ``S0[in_features, out_features]``.
    Returns:
        tensor of shape ``[axis sizes...]`` (axis order of ``tp.axes``), float32.
    Raises:
        PlanError: an entry of the tensor belongs to no target.
    """
    sizes = dict(tp.leg_sizes)
    all_legs = [g for _, legs in tp.axis_legs for g in legs]
    axes_legs = dict(tp.axis_legs)
    ref = next(iter(mats.values()))
    full = torch.zeros([sizes[g] for g in all_legs], device=ref.device, dtype=torch.float32)
    filled = torch.zeros(full.shape[len(full.shape) - len(_stacked(tp)) :], dtype=torch.bool)
    for t in targets:
        x_legs, y_legs = t.x_legs, t.y_legs
        fixed = {axes_legs[a][0]: i for a, i in t.index}
        free = [g for g in all_legs if g not in fixed]
        s = mats[t.key].to(torch.float32).reshape([sizes[g] for g in (*x_legs, *y_legs)])
        s = s.permute([[*x_legs, *y_legs].index(g) for g in free])
        idx = tuple(fixed.get(g, slice(None)) for g in all_legs)
        full[idx] = s
        filled[tuple(i for _, i in t.index)] = True
    if not bool(filled.all()):
        raise PlanError(f"{tp.name}: some stacked slices have no target; cannot build W0's tensor")
    return full.reshape([a.size for a in tp.axes])


def _stacked(tp: TensorPlan) -> list[str]:
    return [a.name for a in tp.axes if a.name in ("qkv", "depth")]


# -- decompositions -----------------------------------------------------------------------------
def _svd_method(rows: int, cols: int, rank: int) -> str:
    side = min(rows, cols)
    return "randomized_svd" if side >= RANDOMIZED_MIN_SIDE and rank * 8 <= side else "truncated_svd"


def pad_to(
    t: torch.Tensor,
    shape: Sequence[int],
    zero_dims: Sequence[int],
    gen: torch.Generator,
) -> torch.Tensor:
    """Embed ``t`` in the leading corner of ``shape``; the new entries are small noise, except
    along ``zero_dims`` where they are 0 (that side of a padded bond contributes nothing, so the
    reconstruction is unchanged while gradients still reach the noise side).

    Args:
        t: the decomposition's factor, every dim <= ``shape``.
        shape: the network's factor shape.
        zero_dims: dims whose padded range is set to zero.
    """
    if tuple(t.shape) == tuple(shape):
        return t
    rms = float(t.pow(2).mean().sqrt()) if t.numel() else 1.0
    noise = torch.randn(tuple(shape), generator=gen).to(t.device) * (rms or 1.0) * 1e-2
    out = noise.to(t.dtype)
    for d in zero_dims:
        out.narrow(d, t.shape[d], shape[d] - t.shape[d]).zero_()
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


def _legs_tensor(net: Network, full: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    sizes = dict(net.leg_sizes)
    legs = [g for _, ls in net.axis_legs for g in ls]
    return full.reshape([sizes[g] for g in legs]), legs


def _lora(net: Network, full: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    import tensorly as tl
    from tensorly.tenalg import svd_interface

    a, b = net.factor("A"), net.factor("B")
    r = a.shape[-1]
    m = full.reshape(a.shape[0], -1)  # [in, rest]
    k = min(r, *m.shape)
    with tl.backend_context("pytorch"):
        u, s, vh = svd_interface(
            m, n_eigenvecs=k, method=_svd_method(m.shape[0], m.shape[1], k), random_state=INIT_SEED
        )
    root = s.sqrt()
    fa = u[:, :k] * root[:k]  # [in, k]
    fb = (vh[:k].t() * root[:k]).reshape(*b.shape[:-1], k)  # [*rest, k]
    return {"A": pad_to(fa, a.shape, (), gen), "B": pad_to(fb, b.shape, (fb.dim() - 1,), gen)}


def _tucker(net: Network, full: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    import tensorly as tl
    from tensorly.decomposition import tucker

    core_spec = net.factor("core")
    axes = [a for a, _ in net.axis_legs]
    ranks = [min(r, n) for r, n in zip(core_spec.shape, full.shape, strict=True)]
    for _ in range(len(ranks)):  # a mode's rank cannot exceed the product of the others'
        ranks = [min(r, math.prod(ranks[:i] + ranks[i + 1 :])) for i, r in enumerate(ranks)]
    with tl.backend_context("pytorch"):
        method = _svd_method(max(full.shape), math.prod(full.shape) // max(full.shape), max(ranks))
        core, factors = tucker(full, rank=ranks, init="svd", svd=method, n_iter_max=10, tol=1e-7)
    out = {"core": pad_to(core, core_spec.shape, range(core.dim()), gen)}
    for a, u in zip(axes, factors, strict=True):
        out[f"U_{a}"] = pad_to(u, net.factor(f"U_{a}").shape, (), gen)
    return out


def _cp(net: Network, full: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    import tensorly as tl
    from tensorly.decomposition import parafac

    axes = [a for a, _ in net.axis_legs]
    r = net.factor(f"U_{axes[0]}").shape[-1]
    with tl.backend_context("pytorch"):
        weights, factors = parafac(
            full, rank=r, init="svd", n_iter_max=200, tol=1e-10, random_state=INIT_SEED
        )
    n = len(factors)
    mag = weights.abs().pow(1.0 / n)
    out = {f"U_{a}": f * mag for a, f in zip(axes, factors, strict=True)}
    out[f"U_{axes[0]}"] = out[f"U_{axes[0]}"] * weights.sign()
    return out


def _train(net: Network, full: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """TT-SVD for every chain network: ``tt`` (one axis per core) and ``mpo`` (core k holds the
    sub-legs ``in.k``, ``out.k``; the tensor is permuted to ``(i1 j1 i2 j2 …)`` first)."""
    import tensorly as tl
    from tensorly.decomposition import tensor_train

    t, legs = _legs_tensor(net, full)
    axis_legs = set(legs)
    sites = [[g for g in f.legs if g in axis_legs] for f in net.factors]
    order = [legs.index(g) for site in sites for g in site]
    sizes = dict(net.leg_sizes)
    site_sizes = [math.prod(sizes[g] for g in site) for site in sites]
    t = t.permute(order).reshape(site_sizes)
    bonds = [1] + [net.factors[k].shape[-1] if k < len(sites) - 1 else 1 for k in range(len(sites))]
    big = max(site_sizes)
    with tl.backend_context("pytorch"):
        method = _svd_method(big, t.numel() // big, max(bonds))
        cores = tensor_train(t, rank=bonds, svd=method, random_state=INIT_SEED)
    out = {}
    n = len(sites)
    for k, (f, core, site) in enumerate(zip(net.factors, cores, sites, strict=True)):
        c = core.reshape(core.shape[0], *[sizes[g] for g in site], core.shape[-1])
        full_shape = [f.shape[0] if k > 0 else 1, *[sizes[g] for g in site]]
        full_shape.append(f.shape[-1] if k < n - 1 else 1)
        c = pad_to(c, full_shape, (c.dim() - 1,), gen)  # right bond zero, left bond noise
        if k == n - 1:
            c = c.squeeze(-1)
        if k == 0:
            c = c.squeeze(0)
        out[f.name] = c
    return out


#: factorization name -> decomposition of ``full / scaling`` into the network's factors
DECOMPOSERS: dict[str, Decomposer] = {
    "lora": _lora,
    "tucker": _tucker,
    "cp": _cp,
    "tt": _train,
    "mpo": _train,
}


def decompose(
    factorization: str, net: Network, full: torch.Tensor, gen: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Factors of ``net`` whose reconstruction approximates ``full`` (the pretrained init).

    Args:
        factorization: the format's name (a key of :data:`DECOMPOSERS`).
        net: the tensor's network.
        full: tensor of shape ``[axis sizes...]``.
        gen: RNG for padding noise (default: seeded with :data:`INIT_SEED`).
    Returns:
        factor name -> tensor of the factor's shape, on ``full``'s device, float32.
    Raises:
        PlanError: the format has no pretrained init.
    """
    fn = DECOMPOSERS.get(factorization)
    if fn is None:
        raise PlanError(
            f"init: factorization {factorization!r} has no pretrained initialiser; those with one: "
            f"{', '.join(DECOMPOSERS)} (a format lists its inits in `tensadapt plugins`)"
        )
    gen = gen or torch.Generator().manual_seed(INIT_SEED)
    factors = fn(net, full.to(torch.float32), gen)
    for f in net.factors:
        got = tuple(factors[f.name].shape)
        if got != f.shape:  # pragma: no cover - a decomposer bug
            raise AssertionError(f"{factorization}: factor {f.name} is {got}, expected {f.shape}")
    return {k: v.contiguous() for k, v in factors.items()}


@dataclass(frozen=True)
class Initializer:
    """An initialiser as specs and the registry see it: a callable with its facts.

    Called as ``init(factorization, network, full, generator) -> {factor name: tensor}``.

    Attributes:
        name: the name specs use (``init: <name>``).
        description: one line for ``tensadapt plugins``.
        pretrained: whether it starts from the pretrained weights. ``True``: ``full`` is the
            stacked pretrained tensor ``[axis sizes...]`` divided by the scaling, and the init's
            reconstruction is subtracted into a residual (:func:`initialize`). ``False``: ``full``
            is ``None`` and the factors it returns give an update of exactly 0.
        factorizations: the formats it initialises.
    """

    fn: Callable[
        [str, Network, torch.Tensor | None, torch.Generator | None], dict[str, torch.Tensor]
    ]
    name: str
    description: str
    pretrained: bool
    factorizations: tuple[str, ...]

    def __call__(
        self,
        factorization: str,
        net: Network,
        full: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        if factorization not in self.factorizations:
            raise PlanError(
                f"init: {self.name!r} initialises factorization(s) {', '.join(self.factorizations)}, "
                f"not {factorization!r}"
            )
        if self.pretrained and full is None:
            raise PlanError(f"init: {self.name!r} needs the pretrained weights (full=None given)")
        return self.fn(factorization, net, full, generator)


def _make(
    name: str, description: str, pretrained: bool, factorizations: tuple[str, ...]
) -> Callable[[Callable[..., dict[str, torch.Tensor]]], Initializer]:
    def wrap(fn: Callable[..., dict[str, torch.Tensor]]) -> Initializer:
        return Initializer(fn, name, description, pretrained, factorizations)

    return wrap


@_make(
    "svd",
    "pretrained weights by SVD / HOSVD-HOOI / CP-ALS / TT-SVD",
    True,
    ("lora", "cp", "tucker", "tt"),
)
def svd(
    factorization: str, net: Network, full: torch.Tensor, gen: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Factors from the pretrained tensor: truncated SVD (lora), HOSVD/HOOI (tucker), CP-ALS (cp),
    TT-SVD (tt). Signature of every initialiser: ``(factorization, network, full, gen) -> factors``
    with ``full`` the stacked pretrained tensor ``[axis sizes...]`` divided by the scaling."""
    return decompose(factorization, net, full, gen)


@_make("mpo", "pretrained weights by DoTA's MPO (TT-matrix SVD)", True, ("mpo",))
def mpo(
    factorization: str, net: Network, full: torch.Tensor, gen: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """DoTA's MPO decomposition of each pretrained matrix (TT-SVD on the (i_k, j_k)-paired
    reshape), bond ranks ``min(R, R_k)`` as the network declares them (see
    :mod:`tensadapt.factorizations.mpo`)."""
    return decompose(factorization, net, full, gen)


# -- the papers' zero-update initialisers (docs/papers.md) ---------------------------------------
@_make(
    "lorta",
    "LoRTA authors' init: A ~ U(±1/√r), C_h, C_m, C_l ~ U(±√(6/r)), B = 0",
    False,
    ("cp",),
)
def lorta(
    factorization: str, net: Network, full: None = None, gen: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """The LoRTA authors' initialisation of their CP factors (PEFT fork, ``tuners/lorta/model.py``,
    ``inject_adapter``), on tensadapt's factor names.

    Their factors are ``A [d, r]`` (the model-width side: tensadapt's ``U_in``), ``B [r, d/H]``
    (``U_head_dim``, transposed), ``C_h [H, r]`` (``U_heads``), ``C_m [4, r]`` (``U_qkv``) and
    ``C_l [L, r]`` (``U_depth``). ``A`` gets ``kaiming_uniform_(a=√5)`` on ``[d, r]`` (fan-in
    ``r``): ``U(±1/√r)``; each ``C`` gets ``kaiming_uniform_(a=√5·init_scale)`` with their default
    ``init_scale = 0``: ``U(±√(6/r))``; ``B`` is zero, so the update is exactly 0 at step 0. Without
    the heads mode the output-side factor ``U_out`` plays ``B``.

    Returns:
        factor name -> float32 tensor of the factor's shape.
    """
    out: dict[str, torch.Tensor] = {}
    # drawn in the authors' order (C_l, C_h, C_m, then A), so a generator seeded s gives their
    # values under torch.manual_seed(s)
    order = {"depth": 0, "heads": 1, "qkv": 2, "in": 4}
    for f in sorted(net.factors, key=lambda f: order.get(f.legs[0], 3)):
        if f.name == net.zero_factor:  # U_head_dim (or U_out): their B
            out[f.name] = torch.zeros(f.shape)
            continue
        # torch's own kaiming_uniform_ on [axis, r]: fan-in r, exactly the authors' bound
        a = math.sqrt(5) if f.legs[0] == "in" else 0.0
        out[f.name] = torch.nn.init.kaiming_uniform_(torch.empty(f.shape), a=a, generator=gen)
    return {f.name: out[f.name] for f in net.factors}


@_make(
    "tenslora",
    "TensLoRA authors' init: Tucker core 0 (CP: input factor 0), other factors orthogonal",
    False,
    ("tucker", "cp"),
)
def tenslora(
    factorization: str, net: Network, full: None = None, gen: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """The TensLoRA authors' initialisation (``tenslora/tensors_manipulator.py``, ``TuckerLoRA`` and
    ``CPLoRA`` with ``init="orthogonal"``, the setting of their training scripts).

    Tucker: the core is zero and every factor ``[axis, r_axis]`` is ``orthogonal_``, drawn in axis
    order. CP: the ``in`` factor is zero and the others are ``orthogonal_``. The authors reseed the
    RNG before building each tensor, so every tensor starts from the same factors: here each call
    draws from a fresh generator seeded with ``gen``'s initial seed (0 without one). The update is
    exactly 0 at step 0 (zero core, resp. zero input factor); the first step moves only the core
    (resp. the input factor).

    Returns:
        factor name -> float32 tensor of the factor's shape.
    """
    g = torch.Generator().manual_seed(gen.initial_seed() if gen is not None else 0)
    zero = "core" if factorization == "tucker" else "U_in"
    out: dict[str, torch.Tensor] = {}
    for f in net.factors:
        if f.name == zero:
            out[f.name] = torch.zeros(f.shape)
        else:
            out[f.name] = torch.nn.init.orthogonal_(torch.empty(f.shape), generator=g)
    return out


def is_pretrained(initializer: Any) -> bool:
    """Whether an initialiser starts from the pretrained weights (its ``pretrained`` attribute;
    a plugin's plain function without one is taken as pretrained, the hook's original contract)."""
    return bool(getattr(initializer, "pretrained", True))


# -- applying it to a model ---------------------------------------------------------------------
@dataclass
class ModuleReport:
    """What the init did to one adapted module.

    Attributes:
        approx_error: per target key, ``‖S0 − scaling·recon‖ / ‖S0‖`` of the init (0 for zeros).
        storage: ``fp`` (residual or base kept in the model's dtype) or ``nf4``.
        quant_max_error: ``max |W_stored − W_intended|`` of the NF4 copy (0 without NF4).
        quant_bound: the NF4 bound for that maximum, ``max_block(absmax · half_gap)``.
        checksum: ``(‖W_res‖_F, Σ W_res)`` of the residual (dequantised), to check a reload.
    """

    approx_error: dict[str, float] = field(default_factory=dict)
    storage: str = "fp"
    quant_max_error: float = 0.0
    quant_bound: float = 0.0
    checksum: tuple[float, float] = (0.0, 0.0)


@dataclass
class InitReport:
    """Figures of :func:`initialize`, per adapted module path."""

    init: str
    residual: str
    base: str
    modules: dict[str, ModuleReport] = field(default_factory=dict)

    def checksums(self) -> dict[str, list[float]]:
        return {n: list(m.checksum) for n, m in self.modules.items()}

    def __str__(self) -> str:
        errs = [e for m in self.modules.values() for e in m.approx_error.values()]
        lines = [f"init {self.init}, residual {self.residual}, base {self.base}"]
        if errs:
            lines.append(
                f"init approximation error ‖W0−ΔW0‖/‖W0‖: mean {sum(errs) / len(errs):.4f}, "
                f"max {max(errs):.4f} over {len(errs)} matrices"
            )
        q = [m for m in self.modules.values() if m.storage == "nf4"]
        if q:
            worst = max(q, key=lambda m: m.quant_max_error / max(m.quant_bound, 1e-30))
            lines.append(
                f"NF4 weight error: max {max(m.quant_max_error for m in q):.3e} "
                f"(bound {max(m.quant_bound for m in q):.3e}; worst ratio "
                f"{worst.quant_max_error / max(worst.quant_bound, 1e-30):.3f})"
            )
        return "\n".join(lines)


@torch.no_grad()
def initialize(
    modules: Sequence[tuple[str, AdaptedLinear]],
    adapter: TensorAdapter,
    seed: int | None = None,
) -> InitReport:
    """Apply the spec's ``init``, ``residual`` and ``base`` to freshly injected modules.

    Args:
        modules: ``(path, AdaptedLinear)`` of every wrapper (unmerged, base weights = ``W0``).
        adapter: their shared adapter (factors hold the default init; overwritten by any other
            init: a pretrained one, or a zero-update one such as ``lorta`` / ``tenslora``).
        seed: seed for padding noise and for the zero-update inits' draws (default
            :data:`INIT_SEED`); the decompositions and therefore the residual do not depend on it.
    Returns:
        the :class:`InitReport`, also stored as ``adapter.init_report``.
    """
    from . import fused
    from .quant import NF4Linear

    plan = adapter.plan
    spec = plan.spec
    report = InitReport(spec.init, spec.residual, spec.base)
    initializer = None
    if spec.init != "zeros":
        from .plugins import initializer_registry

        initializer = initializer_registry().get(spec.init)
    # a zero-update initialiser (lorta, tenslora, a plugin's) already set the factors when the
    # adapter was built (tensadapt.nn.initial_factors); only pretrained ones run here
    pretrained = initializer is not None and is_pretrained(initializer)
    if initializer is not None and pretrained:
        mats = {t.key: target_matrix(t, m.weight) for _, m in modules for t in _own(m, plan)}
        gen = torch.Generator().manual_seed(INIT_SEED if seed is None else seed)
        for tp in plan.tensors:
            ts = [t for t in plan.targets if t.tensor == tp.name]
            full = pretrained_tensor(tp, ts, mats) / adapter.scaling
            factors = initializer(spec.factorization, tp.network, full, gen)
            _copy_factors(adapter, tp.name, tp.network, factors, spec.init)
    for name, m in modules:
        rep = ModuleReport()
        report.modules[name] = rep
        if not pretrained and spec.base != "nf4":
            continue
        w0 = m.weight
        w = w0.detach().to(torch.float32).clone()
        for t in _own(m, plan):
            d = adapter.delta_weight(t).to(torch.float32)
            if pretrained:
                s0 = target_matrix(t, w0).to(torch.float32)
                rep.approx_error[t.key] = float(
                    (s0 - adapter.delta_slice(t).float()).norm() / s0.norm().clamp_min(1e-30)
                )
                fused.add_into(w, t.fused, 1 if t.layout == "conv1d" else 0, -d)
        if spec.residual == "nf4" or spec.base == "nf4":
            q = NF4Linear.from_module(m.base, weight=w.to(w0.dtype))
            stored = q.dequantize(torch.float32)
            rep.storage = "nf4"
            rep.quant_max_error = float((stored - w).abs().max())
            rep.quant_bound = float(q.error_bound().max())
            m.base = q
        else:
            w0.copy_(w.to(w0.dtype))
            stored = w0.to(torch.float32)
        rep.checksum = (float(stored.norm()), float(stored.sum()))
    adapter.init_report = report
    return report


def _own(m: AdaptedLinear, plan: Plan) -> tuple[TargetPlan, ...]:
    """The targets of ``plan`` that module ``m`` carries."""
    mine = {t.key for t in plan.targets}
    return tuple(t for ts in m.adapter_targets.values() for t in ts if t.key in mine)


def _copy_factors(
    adapter: TensorAdapter,
    tensor: str,
    net: Network,
    factors: Mapping[str, torch.Tensor],
    init: str,
) -> None:
    """Copy an initialiser's factors into the adapter, after checking names and shapes (an
    initialiser may come from a plugin)."""
    problems = [
        f"{f.name}: {tuple(factors[f.name].shape) if f.name in factors else 'missing'}, "
        f"expected {f.shape}"
        for f in net.factors
        if f.name not in factors or tuple(factors[f.name].shape) != f.shape
    ]
    if problems:
        raise PlanError(
            f"init {init!r} gave wrong factors for tensor {tensor}: {'; '.join(problems)}"
        )
    params: torch.nn.ParameterDict = adapter.factors[tensor]  # type: ignore[assignment]
    for f in net.factors:
        p = params[f.name]
        p.copy_(factors[f.name].to(device=p.device, dtype=p.dtype))


def check_checksums(
    report: InitReport, saved: Mapping[str, Any], source: str, rtol: float = 1e-3
) -> list[str]:
    """Differences between a rebuilt residual and the checksums saved with an adapter."""
    problems = []
    for name, want in saved.items():
        got = report.modules.get(name)
        if got is None:
            problems.append(f"{source}: residual of {name!r} was saved but the model has none")
            continue
        norm, total = got.checksum
        scale = max(abs(float(want[0])), 1e-12)
        if abs(norm - float(want[0])) > rtol * scale or abs(total - float(want[1])) > rtol * scale:
            problems.append(
                f"{source}: residual of {name!r} differs from the saved one (norm {norm:.6g} vs "
                f"{float(want[0]):.6g}); the base weights are not the ones the adapter was made from"
            )
    return problems


__all__ = [
    "DECOMPOSERS",
    "INIT_SEED",
    "InitReport",
    "Initializer",
    "ModuleReport",
    "check_checksums",
    "decompose",
    "initialize",
    "is_pretrained",
    "lorta",
    "mpo",
    "pad_to",
    "pretrained_tensor",
    "svd",
    "target_matrix",
    "tenslora",
]
