"""Initialisers: how an adapter's factors start, and the frozen residual a pretrained one leaves.

``init: zeros`` needs nothing from here (:func:`~tensadapt.factorizations.base.default_init` gives a
zero update). Each other init is an :class:`Initializer` in the registry. Two reproduce the papers'
own zero-update initialisations exactly (``pretrained = False``; see ``docs/papers.md``):
:func:`lorta` (the LoRTA authors' CP init) and :func:`tenslora` (the TensLoRA authors' Tucker / CP
init). The pretrained ones (:func:`svd`, :func:`mpo`) start the factors from a decomposition of the
*pretrained* weights that the spec targets, stacked into the same tensor as the update
(``[axis sizes...]``, divided by the spec's ``scaling``): :mod:`tensadapt.decompose` builds that
tensor and decomposes it, one tensorly decomposition per format.

:func:`initialize` (called by :func:`~tensadapt.inplace.attach`) copies the factors into the adapter
and replaces each targeted base weight by the residual ``W0 − ΔW(init)`` (``residual: frozen``), by
that residual in NF4 (``residual: nf4``, :class:`~tensadapt.quant.NF4Linear`), or, for ``base: nf4``
with ``init: zeros``, by ``W0`` in NF4. The figures (approximation error of the init, quantisation
error against its bound, a checksum of every residual) are kept in an :class:`InitReport` at
``model.tensadapt_adapter.init_report``.

Everything is deterministic for the same base weights (fixed seeds for randomised SVD and padding
noise), so :func:`~tensadapt.load_adapter` rebuilds the same residual instead of storing it, and
:func:`check_checksums` compares it with the checksums saved with the adapter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .decompose import INIT_SEED, decompose, pad_to, pretrained_tensor, target_matrix
from .errors import PlanError
from .factorizations.base import Network

if TYPE_CHECKING:
    from .nn import AdaptedLinear, TensorAdapter
    from .planner import Plan, TargetPlan


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
