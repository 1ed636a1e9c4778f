"""DoTA as published (arXiv 2412.20891): capped bond ranks, Table 2's shapes, the paper's counts.

The paper's formulas are computed here independently of tensadapt's planner: Eq. (1)
``R_k = min(∏_{n≤k} I_n J_n, ∏_{n>k} I_n J_n)``, the truncation ``R̄_k = min(R, R_k)`` and
``ρ = Σ_k R̄_{k-1} I_k J_k R̄_k`` (Sec. 3.1), on the shapes of Table 2 (copied from the paper).
"""

from __future__ import annotations

import math
from functools import cache

import pytest
import torch
from conftest import build_model, hidden, model_inputs
from hypothesis import given, settings
from hypothesis import strategies as st

import tensadapt as ta
from tensadapt.errors import SpecError
from tensadapt.factorizations import MPO, Axis, reconstruct
from tensadapt.factorizations.mpo import MPOOptions, balanced_factors
from tensadapt.init import decompose, target_matrix
from tensadapt.model import adapted_modules, get_adapter
from tensadapt.planner import plan

#: DoTA's Table 2, "Tensor shape for hidden dimension"
PAPER_TABLE2 = {
    50400: [5, 10, 14, 12, 6],
    14336: [4, 8, 8, 8, 7],
    11008: [4, 4, 43, 4, 4],
    768: [4, 4, 4, 4, 3],
    3072: [4, 4, 8, 6, 4],
    1024: [4, 4, 4, 4, 4],
    4096: [4, 4, 8, 8, 4],
    2304: [4, 4, 8, 6, 3],
}
DOTA_TARGETS = ["q", "k", "v", "up", "down"]  # "Q, K, V, U and D" (Appendix B)


def paper_rho(i_shape: list[int], j_shape: list[int], r: int) -> int:
    """ρ of the paper for one matrix: Eq. (1), the threshold R, the sum over cores."""
    n = len(i_shape)
    ij = [i * j for i, j in zip(i_shape, j_shape, strict=True)]
    ranks = [1]
    for k in range(1, n):  # R_k for k = 1..N-1 (1-based as in the paper)
        r_k = min(math.prod(ij[:k]), math.prod(ij[k:]))
        ranks.append(min(r, r_k))
    ranks.append(1)
    return sum(ranks[k] * ij[k] * ranks[k + 1] for k in range(n))


def _dota_spec(rank: int, targets=DOTA_TARGETS, **kw) -> dict:
    return {
        "factorization": "mpo",
        "targets": list(targets),
        "rank": rank,
        "options": {"n_cores": 5},
        **kw,
    }


@cache
def _meta_model(name: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from tensadapt.arch import preset_config

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(preset_config(name))


@pytest.mark.parametrize("model", ["llama2-7b", "llama3-8b"])
@pytest.mark.parametrize("rank", [8, 16, 32])
def test_rho_equals_the_paper_formula_on_llama(model: str, rank: int) -> None:
    p = plan(_dota_spec(rank), model)
    assert {t.proj for t in p.targets} == set(DOTA_TARGETS)
    total = 0
    for t in p.targets:
        (tp,) = [x for x in p.tensors if x.name == t.tensor]  # one tensor per matrix
        want = paper_rho(PAPER_TABLE2[t.in_features], PAPER_TABLE2[t.out_features], rank)
        assert tp.n_params == want, (t.key, tp.n_params, want)
        total += want
    assert p.n_params == total


@pytest.mark.parametrize(("model", "percent"), [("llama2-7b", 0.15), ("llama3-8b", 0.06)])
def test_table1_parameter_share_at_the_chosen_rank(model: str, percent: float) -> None:
    """Table 1's "#Params (%)" for DoTA (N = 5, R = 16 "unless specified otherwise")."""
    p = plan(_dota_spec(16), _meta_model(model))
    assert p.model_params is not None
    assert round(100 * p.n_params / p.model_params, 2) == percent


def test_paper_examples() -> None:
    """Sec. 3.1's example (1024 x 1024, N = 5, R = 8, I_k = J_k = 4: "approximately 3.3K") and the
    issue's 768 x 768 at R = 16 (a bond capped at R_4 = 9)."""
    mpo = MPO()
    square = lambda d: [Axis("in", d), Axis("out", d)]  # noqa: E731
    assert (
        mpo.n_params(square(1024), 8, MPOOptions(n_cores=5))
        == 3328
        == paper_rho([4] * 5, [4] * 5, 8)
    )
    assert mpo.n_params(square(768), 16, MPOOptions(n_cores=5)) == 10833
    assert paper_rho([4, 4, 4, 4, 3], [4, 4, 4, 4, 3], 16) == 10833
    net = mpo.network(square(768), 16, MPOOptions(n_cores=5))
    assert [f.shape for f in net.factors] == [
        (4, 4, 16),
        (16, 4, 4, 16),
        (16, 4, 4, 16),
        (16, 4, 4, 9),
        (9, 3, 3),
    ]


@pytest.mark.parametrize("dim", sorted(PAPER_TABLE2))
def test_every_table2_shape_is_used(dim: int) -> None:
    i_shape, j_shape = MPO().shapes([Axis("in", dim), Axis("out", dim)], MPOOptions(n_cores=5))
    assert list(i_shape) == list(j_shape) == PAPER_TABLE2[dim]


@pytest.mark.parametrize(("dim", "cores"), [(2048, 5), (5120, 5), (768, 4), (4096, 3), (97, 5)])
def test_other_widths_use_the_balanced_rule(dim: int, cores: int) -> None:
    i_shape, _ = MPO().shapes([Axis("in", dim), Axis("out", dim)], MPOOptions(n_cores=cores))
    assert i_shape == balanced_factors(dim, cores)
    assert math.prod(i_shape) == dim and len(i_shape) == cores


@settings(max_examples=30, deadline=None)
@given(
    i_shape=st.lists(st.integers(1, 6), min_size=2, max_size=5),
    data=st.data(),
    rank=st.integers(1, 80),
)
def test_counts_equal_rho_for_any_shape_and_rank(i_shape, data, rank: int) -> None:
    j_shape = data.draw(st.lists(st.integers(1, 6), min_size=len(i_shape), max_size=len(i_shape)))
    axes = [Axis("in", math.prod(i_shape)), Axis("out", math.prod(j_shape))]
    opts = MPOOptions(n_cores=len(i_shape), in_shape=tuple(i_shape), out_shape=tuple(j_shape))
    assert MPO().n_params(axes, rank, opts) == paper_rho(i_shape, j_shape, rank)


def _sites_and_bonds(tp) -> tuple[list[int], list[int]]:
    """Open-leg size of each core and the size of each bond, read off the factor shapes."""
    sites = [
        math.prod(s for leg, s in zip(f.legs, f.shape, strict=True) if not leg.startswith("b"))
        for f in tp.factors
    ]
    bonds = [f.shape[-1] for f in tp.factors[:-1]]
    return sites, bonds


def test_counts_equal_real_trainable_parameters() -> None:
    """With bonds capped (tiny widths, large R), the model's real trainable parameters are the
    planned count, which is ρ summed over the targets."""
    model = build_model("tiny-llama")
    spec = _dota_spec(64, targets=("q", "k", "v", "o", "up", "down"))
    spec["options"] = {"n_cores": 3}
    ta.inject(model, spec, seed=0)
    p = get_adapter(model).plan
    assert ta.trainable_parameters(model) == p.n_params
    want = sum(
        paper_rho(
            list(balanced_factors(t.in_features, 3)), list(balanced_factors(t.out_features, 3)), 64
        )
        for t in p.targets
    )
    assert p.n_params == want
    assert any(b < 64 for tp in p.tensors for b in _sites_and_bonds(tp)[1])  # the cap is active


@pytest.mark.parametrize("residual", ["frozen", "nf4"])
def test_mpo_init_respects_the_capped_ranks(residual: str) -> None:
    """TT-SVD fills the capped bonds exactly: at R above every R_k the init is W0 itself (no
    padding), the residual is 0 up to rounding, and the model is unchanged at step 0."""
    model = build_model("tiny-llama")
    inputs = model_inputs(model)
    w0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    with torch.no_grad():
        base = hidden(model, inputs)
    spec = _dota_spec(10_000, targets=("q", "v", "down"), init="mpo", residual=residual)
    spec["options"] = {"n_cores": 3}
    ta.inject(model, spec, seed=0)
    ad = get_adapter(model)
    for tp in ad.plan.tensors:  # every bond is exactly Eq. (1)'s R_k (R is above them all)
        sites, bonds = _sites_and_bonds(tp)
        assert bonds == [
            min(math.prod(sites[: k + 1]), math.prod(sites[k + 1 :])) for k in range(len(bonds))
        ]
    for name, m in adapted_modules(model):
        for t in m.targets:
            torch.testing.assert_close(
                ad.delta_slice(t).detach(), target_matrix(t, w0[name]), rtol=1e-4, atol=1e-4
            )
    errs = [e for rep in ad.init_report.modules.values() for e in rep.approx_error.values()]
    assert max(errs) < 1e-4
    with torch.no_grad():
        out = hidden(model, inputs)
    tol = 1e-4 if residual == "frozen" else 0.1
    assert float((out - base).norm() / base.norm()) < tol


def test_mpo_init_truncated_below_the_cap() -> None:
    """At R below the caps the init is a real truncation: error > 0, and it never grows with R."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 36, generator=g)
    opts = MPOOptions(n_cores=3, in_shape=(2, 3, 4), out_shape=(3, 3, 4))
    axes = [Axis("in", 24), Axis("out", 36)]
    errs = []
    for r in (1, 2, 4, 8, 16, 64):
        net = MPO().network(axes, r, opts)
        rec = reconstruct(net, decompose("mpo", net, w))
        errs.append(float((rec - w).norm() / w.norm()))
    assert errs[0] > errs[2] > 0 and errs[-1] < 1e-5
    assert all(b <= a + 1e-6 for a, b in zip(errs, errs[1:], strict=False))


@pytest.mark.parametrize(
    ("options", "where"),
    [
        ({"n_cores": True}, "n_cores"),
        ({"n_cores": 5.0}, "n_cores"),
        ({"n_cores": "5"}, "n_cores"),
        ({"n_cores": 2, "in_shape": [4, True]}, "in_shape"),
    ],
)
def test_mpo_options_are_strict(options: dict, where: str) -> None:
    with pytest.raises(SpecError, match=f"options.{where}"):
        ta.load_spec({"factorization": "mpo", "targets": ["q"], "rank": 2, "options": options})
