"""Property-based: the contracted forward equals ``x·ΔWᵀ`` with ΔW reconstructed from the factors,
over random shapes, ranks, modes and factorizations (hypothesis)."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from tensadapt.arch.base import Architecture, TargetSite
from tensadapt.factorizations.base import Network, reconstruct
from tensadapt.nn import TensorAdapter
from tensadapt.planner import plan

FACTS = ["lora", "cp", "tucker", "tt", "mpo"]


def synthetic_arch(n_layers: int, n_heads: int, n_kv: int, head_dim: int, d: int) -> Architecture:
    sites = []
    for layer in range(n_layers):
        for p, (i, o, side, h) in {
            "q": (d, n_heads * head_dim, "out", n_heads),
            "k": (d, n_kv * head_dim, "out", n_kv),
            "v": (d, n_kv * head_dim, "out", n_kv),
            "o": (n_heads * head_dim, d, "in", n_heads),
        }.items():
            sites.append(TargetSite(layer, p, f"layers.{layer}.{p}", i, o, None, "linear", side, h))  # type: ignore[arg-type]
    return Architecture(
        "synthetic", "synthetic", n_layers, d, n_heads, n_kv, head_dim, None, tuple(sites)
    )


@st.composite
def cases(draw):
    n_heads = draw(st.integers(1, 4))
    n_kv = draw(st.sampled_from([k for k in range(1, n_heads + 1) if n_heads % k == 0]))
    head_dim = draw(st.integers(1, 6))
    d = draw(st.integers(2, 12))
    n_layers = draw(st.integers(1, 3))
    fact = draw(st.sampled_from(FACTS))
    modes = draw(st.lists(st.sampled_from(["heads", "qkv", "depth"]), unique=True))
    targets = draw(st.lists(st.sampled_from(["q", "k", "v", "o"]), min_size=1, unique=True))
    rank = draw(st.integers(1, 5))
    if fact == "tucker" and draw(st.booleans()):
        names = ["in", "head_dim", "heads"] if "heads" in modes else ["in", "out"]
        names += [m for m in ("qkv", "depth") if m in modes]
        rank = {n: draw(st.integers(1, 4)) for n in names}
    spec = {"factorization": fact, "modes": modes, "targets": targets, "rank": rank, "alpha": 3.0}
    if fact == "mpo":
        spec["options"] = {"n_cores": draw(st.integers(1, 3))}
    tokens = draw(st.integers(1, 9))
    return synthetic_arch(n_layers, n_heads, n_kv, head_dim, d), spec, tokens


def _delta_w(full: torch.Tensor, tp, t) -> torch.Tensor:
    """ΔW [out, in] of target ``t`` taken from the full reconstructed tensor (independent path)."""
    names = [a.name for a in tp.axes]
    idx = [slice(None)] * len(names)
    for axis, i in t.index:
        idx[names.index(axis)] = i
    m = full[tuple(idx)]
    kept = [n for n in names if n not in dict(t.index)]
    if "heads" in kept:  # flatten the head side heads-major, as the model lays out heads
        m = m.permute(kept.index("in"), kept.index("heads"), kept.index("head_dim")).reshape(
            m.shape[0], -1
        )
    return m if t.transposed else m.t()


@given(cases())
def test_contracted_forward_equals_reconstruction(case) -> None:
    arch, spec, tokens = case
    p = plan(spec, arch)
    adapter = TensorAdapter(p, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for prm in adapter.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g, dtype=torch.float64))
    for t in p.targets:
        tp = p.tensor(t.tensor)
        pd = adapter.factors[tp.name]
        full = reconstruct(
            Network(tp.factors, tp.axis_legs, tp.leg_sizes, tp.zero_factor), dict(pd.items())
        )
        dw = _delta_w(full, tp, t) * p.spec.scaling
        assert dw.shape == (t.out_features, t.in_features)
        x = torch.randn(2, tokens, t.in_features, generator=g, dtype=torch.float64)
        got = adapter.update(t, x)
        want = x @ dw.t()
        err = (got - want).norm() / want.norm().clamp_min(1e-30)
        assert err <= 1e-5, (t.key, float(err))
        # merge path: delta_weight is the same matrix
        torch.testing.assert_close(adapter.delta_weight(t), dw, rtol=1e-9, atol=1e-9)
        adapter.clear_cache()
