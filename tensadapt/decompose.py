"""The pretrained initialisers' arithmetic: the weights a spec targets, stacked into the update's
tensor, and that tensor decomposed into the network's factors. No model is touched here (applying an
init is :func:`tensadapt.init.initialize`); tensorly is imported on first call.

1. :func:`target_matrix` cuts a target's ``S0 = W0ᵀ`` (``[in_features, out_features]``, the inverse
   of :meth:`~tensadapt.nn.TensorAdapter.delta_slice`) out of its module's weight, a fused module's
   rows included; :func:`pretrained_tensor` puts each target's ``S0`` into the tensor at the
   target's ``index``, reshaped into its legs (``[axis sizes...]``). The caller divides it by the
   spec's ``scaling``.
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
   padded (:func:`pad_to`): one side of the bond gets zeros, the other small noise, so the
   reconstruction is unchanged and gradients still reach the padded entries.

Everything is deterministic for the same weights: randomised SVD and the padding noise are seeded
(:data:`INIT_SEED`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from .errors import PlanError
from .factorizations.base import Network

if TYPE_CHECKING:
    from .planner import TargetPlan, TensorPlan

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


__all__ = [
    "DECOMPOSERS",
    "INIT_SEED",
    "RANDOMIZED_MIN_SIDE",
    "Decomposer",
    "decompose",
    "pad_to",
    "pretrained_tensor",
    "target_matrix",
]
