"""Pretrained initialisers (svd / mpo), frozen and NF4 residuals, NF4 base, merge, save/load,
memory accounting. Property-based over random shapes and ranks where the issue asks for it."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, hidden, model_inputs, randomize
from hypothesis import given, settings
from hypothesis import strategies as st

import tensadapt as ta
from tensadapt.cli import main as cli_main
from tensadapt.errors import AdapterMismatchError, SpecError
from tensadapt.factorizations import MPO, Axis, reconstruct
from tensadapt.factorizations.mpo import MPOOptions, balanced_factors
from tensadapt.init import decompose, pad_to, target_matrix
from tensadapt.model import adapted_modules, get_adapter
from tensadapt.planner import get_factorization, plan
from tensadapt.quant import NF4Linear

PRETRAINED = {"lora": "svd", "cp": "svd", "tucker": "svd", "tt": "svd", "mpo": "mpo"}


def _spec(fact: str, modes: list[str], targets, rank=3, residual="frozen", **kw) -> dict:
    spec = {
        "factorization": fact,
        "modes": modes,
        "targets": list(targets),
        "rank": rank,
        "alpha": 6,
        "init": PRETRAINED[fact],
        "residual": residual,
        **kw,
    }
    if fact == "mpo":
        spec["options"] = {"n_cores": 2}
    return spec


def _net(fact: str, sizes: list[int], rank: int, n_cores: int = 2):
    names = ["in", "out", "qkv", "depth"][: len(sizes)]
    axes = [Axis(n, s) for n, s in zip(names, sizes, strict=False)]
    f = get_factorization(fact)
    opts = MPOOptions(n_cores=n_cores) if fact == "mpo" else f.options_model()
    return f.network(axes, rank, opts)


def _rel_err(fact: str, full: torch.Tensor, rank: int, n_cores: int = 2) -> float:
    net = _net(fact, list(full.shape), rank, n_cores)
    rec = reconstruct(net, decompose(fact, net, full))
    return float((rec - full).norm() / full.norm())


# -- decompositions: properties ------------------------------------------------------------------
shapes = st.lists(st.integers(2, 6), min_size=2, max_size=4).map(
    lambda s: [s[0] * 2, s[1] * 2, *s[2:]]
)


@pytest.mark.parametrize("fact", ["lora", "tucker", "tt", "mpo"])
@settings(max_examples=10)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_error_never_grows_with_rank(fact: str, shape: list[int], seed: int) -> None:
    full = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    errs = [_rel_err(fact, full, r) for r in range(1, 9)]
    for lo, hi in zip(errs, errs[1:], strict=False):
        assert hi <= lo + 1e-5, errs


@pytest.mark.parametrize("fact", ["lora", "tucker", "tt", "mpo"])
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_full_rank_reconstructs_exactly(fact: str, shape: list[int], seed: int) -> None:
    full = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    full_rank = max(shape) if fact in ("lora", "tucker") else max(shape) ** 2
    assert _rel_err(fact, full, full_rank) < 1e-5


def test_cp_recovers_a_low_cp_rank_tensor_and_beats_zero() -> None:
    g = torch.Generator().manual_seed(0)
    fs = [torch.randn(n, 3, generator=g) for n in (8, 6, 4)]
    full = torch.einsum("ar,br,cr->abc", *fs)
    assert _rel_err("cp", full, 3) < 1e-3
    noisy = torch.randn(8, 6, 4, generator=g)
    assert _rel_err("cp", noisy, 4) < 1.0


def test_pad_keeps_reconstruction_and_shapes() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 2)
    p = pad_to(t, (3, 5), (1,), g)
    assert p.shape == (3, 5) and torch.equal(p[:, :2], t) and not p[:, 2:].any()
    q = pad_to(t, (3, 5), (), g)
    assert q[:, 2:].abs().sum() > 0


def test_no_pretrained_init_for_unknown_format() -> None:
    net = _net("lora", [4, 4], 2)
    with pytest.raises(ta.errors.PlanError, match="no pretrained initialiser"):
        decompose("nosuch", net, torch.randn(4, 4))


# -- DoTA's figures ----------------------------------------------------------------------------
def test_dota_parameter_example() -> None:
    axes = [Axis("in", 1024), Axis("out", 1024)]
    opts = MPOOptions(n_cores=5, in_shape=(4,) * 5, out_shape=(4,) * 5)
    assert MPO().n_params(axes, 8, opts) == 3328
    assert MPO().n_params(axes, 8, MPOOptions(n_cores=5)) == 3328  # auto shapes: [4]*5


@pytest.mark.parametrize(
    ("dim", "table2"),
    [
        (768, (4, 4, 4, 4, 3)),
        (1024, (4, 4, 4, 4, 4)),
        (3072, (4, 4, 8, 6, 4)),
        (4096, (4, 4, 8, 8, 4)),
    ],
)
def test_auto_mpo_shapes_match_dota_table2(dim: int, table2: tuple[int, ...]) -> None:
    assert balanced_factors(dim, 5) == table2


# -- on models ----------------------------------------------------------------------------------
MODEL_CASES = [
    ("tiny-bert", "mpo", [], ("q", "k", "v", "o")),
    ("tiny-bert", "cp", ["heads", "qkv", "depth"], ("q", "k", "v", "o")),
    ("tiny-gpt2", "lora", ["qkv"], ("q", "k", "v", "o")),
    ("tiny-gpt2", "tt", ["heads", "depth"], ("q", "v")),
    ("tiny-llama", "tucker", ["qkv", "depth"], ("q", "k", "v", "o")),
    ("tiny-llama", "mpo", ["heads", "qkv", "depth"], ("q", "k", "v", "o")),
    ("tiny-vit", "tt", ["qkv"], ("q", "k", "v")),
]


@pytest.mark.parametrize(
    ("preset", "fact", "modes", "targets"),
    MODEL_CASES,
    ids=[f"{p}-{f}-{'+'.join(m) or 'none'}" for p, f, m, _ in MODEL_CASES],
)
def test_frozen_residual_step0_equals_base(preset, fact, modes, targets) -> None:
    model = build_model(preset)
    inputs = model_inputs(model)
    with torch.no_grad():
        base = hidden(model, inputs)
    ta.inject(model, _spec(fact, modes, targets), seed=0)
    ad = get_adapter(model)
    # the init is not trivial: the factors carry a real part of W0
    errs = [e for m in ad.init_report.modules.values() for e in m.approx_error.values()]
    assert errs and max(errs) < 1.0 and min(errs) > 0
    with torch.no_grad():
        out = hidden(model, inputs)
    assert float((out - base).abs().max() / base.abs().max()) < 1e-5

    # gradients reach every factor
    out = hidden(model, inputs)
    out.pow(2).mean().backward()
    for name, p in ad.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    # merge = residual + reconstruction; unmerge restores the residual
    randomize(model, scale=0.05)
    res = {n: m.base.weight.detach().clone() for n, m in adapted_modules(model)}
    with torch.no_grad():
        adapted = hidden(model, inputs)
        ta.merge(model)
        torch.testing.assert_close(hidden(model, inputs), adapted, rtol=1e-4, atol=1e-4)
        ta.unmerge(model)
    for n, m in adapted_modules(model):
        torch.testing.assert_close(m.base.weight, res[n], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("preset", "modes", "targets"),
    [
        ("tiny-gpt2", ["heads", "qkv", "depth"], ("q", "v", "o")),
        ("tiny-llama", ["heads", "qkv", "depth"], ("q", "k", "v", "o")),
        ("tiny-bert", [], ("q", "o")),
    ],
)
def test_full_rank_init_moves_all_of_w0_into_the_factors(preset, modes, targets) -> None:
    """The pretrained tensor is exactly the inverse of delta_slice for every layout (conv1d
    slices, transposed o, heads, GQA stacks): at full rank the residual is 0 and ΔW = W0."""
    model = build_model(preset)
    w0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    ta.inject(model, {**_spec("tt", modes, targets, rank=64), "alpha": None})
    ad = get_adapter(model)
    for name, m in adapted_modules(model):
        for t in m.targets:
            s = target_matrix(t, w0[name])
            torch.testing.assert_close(ad.delta_slice(t).detach(), s, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(
                target_matrix(t, m.base.weight), torch.zeros_like(s), rtol=0, atol=1e-4
            )


@pytest.mark.parametrize(("preset", "fact"), [("tiny-llama", "mpo"), ("tiny-gpt2", "lora")])
def test_nf4_residual_step0_error_within_bound(preset: str, fact: str) -> None:
    model = build_model(preset)
    inputs = model_inputs(model)
    w0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    with torch.no_grad():
        base = hidden(model, inputs)
    ta.inject(model, _spec(fact, [], ("q", "k", "v", "o"), residual="nf4"), seed=0)
    ad = get_adapter(model)
    report = ad.init_report
    assert all(m.storage == "nf4" for m in report.modules.values())
    assert "NF4 weight error" in str(report)
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for name, m in adapted_modules(model):
        assert isinstance(m.base, NF4Linear)
        rep = report.modules[name]
        assert 0 < rep.quant_max_error <= rep.quant_bound
        # per module: |adapted(x) - base(x)| <= |x|·bound (elementwise, rigorous)
        bound = m.base.error_bound()
        with torch.no_grad():
            got = m(x)
            w = w0[name]
            want = x @ (w if m.base.layout == "conv1d" else w.t())
            lim = x.abs() @ (bound if m.base.layout == "conv1d" else bound.t())
        want = want + m.base.bias if m.base.bias is not None else want
        assert bool(((got - want).abs() <= lim + 1e-5).all())
    with torch.no_grad():
        out = hidden(model, inputs)
    rel = float((out - base).norm() / base.norm())
    assert 0 < rel < 0.1  # reported in benchmarks/RESULTS.md; small but not zero


def test_nf4_merge_unmerge_and_unload() -> None:
    model = build_model("tiny-gpt2")
    inputs = model_inputs(model)
    ta.inject(model, _spec("mpo", ["qkv"], ("q", "k", "v", "o"), residual="nf4"), seed=0)
    randomize(model, scale=0.05)
    codes = {n: m.base.packed.clone() for n, m in adapted_modules(model)}
    with torch.no_grad():
        adapted = hidden(model, inputs)
        ta.merge(model)
        torch.testing.assert_close(hidden(model, inputs), adapted, rtol=1e-4, atol=1e-4)
        ta.unmerge(model)
        torch.testing.assert_close(hidden(model, inputs), adapted, rtol=1e-5, atol=1e-5)
    for n, m in adapted_modules(model):
        assert torch.equal(m.base.packed, codes[n]) and m.base._dense is None
    ta.merge_and_unload(model)
    assert not any(isinstance(m, NF4Linear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(hidden(model, inputs), adapted, rtol=1e-4, atol=1e-4)


def test_nf4_base_qlora_style() -> None:
    model = build_model("tiny-bert")
    inputs = model_inputs(model)
    with torch.no_grad():
        base = hidden(model, inputs)
    spec = {"factorization": "tucker", "modes": ["qkv"], "targets": ["q", "k", "v"], "rank": 3}
    ta.inject(model, {**spec, "base": "nf4"}, seed=0)
    mods = adapted_modules(model)
    assert mods and all(isinstance(m.base, NF4Linear) for _, m in mods)
    assert all(not p.requires_grad for _, m in mods for p in m.base.parameters())
    with torch.no_grad():
        out = hidden(model, inputs)
    assert 0 < float((out - base).norm() / base.norm()) < 0.1
    assert ta.trainable_parameters(model) == get_adapter(model).plan.n_params


def test_save_load_rebuilds_residual(tmp_path) -> None:
    spec = _spec("tucker", ["qkv", "depth"], ("q", "k", "v", "o"), residual="nf4")
    model = build_model("tiny-llama")
    inputs = model_inputs(model)
    ta.inject(model, spec, seed=0)
    randomize(model, scale=0.05)  # "trained"
    with torch.no_grad():
        trained = hidden(model, inputs)
    d = ta.save_adapter(model, tmp_path / "a")
    from safetensors.torch import load_file

    from tensadapt.nn import factor_items

    saved = load_file(str(d / "adapter.safetensors"))
    factors = {f"{t}.{f}" for t, f, _ in factor_items(get_adapter(model))}
    assert set(saved) == factors  # the factors only: no residual written
    assert sum(v.numel() for v in saved.values()) == get_adapter(model).plan.n_params
    config = (d / "adapter_config.json").read_text()
    assert '"residual": "nf4"' in config and "checksums" in config

    fresh = build_model("tiny-llama")
    ta.load_adapter(fresh, d)
    with torch.no_grad():
        torch.testing.assert_close(hidden(fresh, inputs), trained, rtol=1e-5, atol=1e-5)

    other = build_model("tiny-llama", seed=7)  # same architecture, other weights
    with pytest.raises(AdapterMismatchError, match="residual of .* differs"):
        ta.load_adapter(other, d)


def test_spec_refuses_pretrained_init_without_residual() -> None:
    with pytest.raises(SpecError, match="residual"):
        ta.load_spec({"factorization": "mpo", "targets": ["q"], "rank": 2, "init": "mpo"})
    with pytest.raises(SpecError, match="supports: zeros, svd"):
        ta.load_spec(
            {
                "factorization": "lora",
                "targets": ["q"],
                "rank": 2,
                "init": "mpo",
                "residual": "frozen",
            }
        )


# -- memory accounting ----------------------------------------------------------------------------
def test_plan_qdota_llama3_8b_memory(capsys) -> None:
    assert cli_main(["plan", "specs/qdota.yaml", "--model", "llama3-8b"]) == 0
    out = capsys.readouterr().out
    assert "trainable parameters:" in out and "frozen residual:" in out and "nf4" in out
    p = plan("specs/qdota.yaml", "llama3-8b")
    mem = p.memory
    assert mem is not None and mem.storage == "nf4"
    assert mem.residual_bytes <= 0.3 * mem.residual_fp16_bytes
    numel = sum(t.in_features * t.out_features for t in p.targets)
    assert mem.residual_fp16_bytes == 2 * numel
    assert mem.residual_bytes == sum(
        t.in_features * t.out_features // 2 + 4 * (t.in_features * t.out_features // 64)
        for t in p.targets
    )
    assert mem.trainable_bytes == 4 * p.n_params
    dota = plan("specs/dota.yaml", "llama3-8b").memory
    assert dota is not None and dota.residual_bytes == 4 * numel  # float32 (config has no dtype)


def test_plan_memory_matches_a_real_model() -> None:
    model = build_model("tiny-bert")
    p = plan(_spec("mpo", [], ("q", "k", "v", "o"), residual="nf4"), model)
    ta.inject(model, p)
    mods = adapted_modules(model)
    assert p.memory is not None
    assert p.memory.residual_bytes == sum(m.base.nbytes for _, m in mods)
    assert p.memory.trainable_bytes == sum(
        x.numel() * x.element_size() for x in get_adapter(model).parameters()
    )


# -- the papers' zero-update initialisers through inject -----------------------------------------
@pytest.mark.parametrize(
    ("init", "fact", "modes", "rank"),
    [
        ("lorta", "cp", ["heads", "qkv", "depth"], 3),
        ("tenslora", "tucker", ["qkv", "depth"], {"in": 4, "out": 3, "qkv": 2, "depth": 2}),
        ("tenslora", "cp", ["heads", "qkv"], 3),
    ],
)
def test_paper_init_through_inject_starts_at_the_base_model(init, fact, modes, rank) -> None:
    spec = {
        "factorization": fact,
        "modes": modes,
        "targets": ["q", "k", "v"],
        "rank": rank,
        "init": init,
    }
    model = build_model("tiny-bert")
    inputs = model_inputs(model)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        base = hidden(model, inputs)
    ta.inject(model, spec, seed=4)
    ad = get_adapter(model)
    for tp in ad.plan.tensors:
        fs = ad.factors[tp.name]
        zero = {"lorta": tp.zero_factor, "tenslora": "core" if fact == "tucker" else "U_in"}[init]
        assert not fs[zero].any()
        others = [p for n, p in fs.items() if n != zero]
        assert others and all(p.abs().sum() > 0 for p in others)
        if init == "lorta":
            r = fs["U_in"].shape[-1]
            assert float(fs["U_in"].abs().max()) <= 1 / r**0.5
    # a zero update and no residual: the base weights are untouched, the output is the base's
    for name, m in adapted_modules(model):
        torch.testing.assert_close(m.weight, w0[f"{name}.weight"], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(hidden(model, inputs), base, rtol=0, atol=0)
    assert ta.trainable_parameters(model) == ad.plan.n_params
