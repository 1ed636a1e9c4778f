"""Numerics of every registered factorization's contraction: float64 ``gradcheck`` through
``TensorAdapter.update``; bf16/fp16 forwards within the tolerances documented in
``tensadapt.numerics.TOLERANCES``; the same seed gives the same factors and outputs."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, model_inputs
from test_contraction import synthetic_arch

import tensadapt as ta
from tensadapt.model import get_adapter
from tensadapt.nn import TensorAdapter
from tensadapt.numerics import TOLERANCES, relative_error
from tensadapt.planner import Plan, plan
from tensadapt.plugins import factorization_registry

BUILTIN = ["lora", "cp", "tucker", "tt", "mpo"]
MODES = [[], ["qkv", "depth"], ["heads", "qkv", "depth"]]


def registered() -> list[str]:
    names = list(factorization_registry().names())
    assert set(BUILTIN) <= set(names)
    return names


def make_plan(name: str, modes: list[str]) -> Plan:
    """A plan on a small synthetic architecture (2 layers, 2 heads of 2, 1 kv head, d = 4)."""
    arch = synthetic_arch(n_layers=2, n_heads=2, n_kv=1, head_dim=2, d=4)
    spec = {
        "factorization": name,
        "modes": modes,
        "targets": ["q", "k", "v", "o"],
        "rank": 2,
        "alpha": 3.0,
    }
    if name == "mpo":
        spec["options"] = {"n_cores": 2}
    return plan(spec, arch)  # every registered format must plan this case: an error fails


def random_factors(
    adapter: TensorAdapter, dtype: torch.dtype, seed: int = 0, scale: float = 0.7
) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_((torch.randn(p.shape, generator=g, dtype=torch.float64) * scale).to(dtype))


def inputs(p: Plan, tokens: int, dtype: torch.dtype, seed: int = 1) -> dict[int, torch.Tensor]:
    """One input per distinct input width (q/k/v read d; o reads heads·head_dim)."""
    g = torch.Generator().manual_seed(seed)
    widths = sorted({t.in_features for t in p.targets})
    return {w: torch.randn(tokens, w, generator=g, dtype=torch.float64).to(dtype) for w in widths}


@pytest.mark.parametrize("modes", MODES, ids=["none", "qkv-depth", "heads-qkv-depth"])
@pytest.mark.parametrize("name", registered())
def test_gradcheck_float64(name: str, modes: list[str]) -> None:
    """d(update)/d(x) and d(update)/d(every factor), numeric vs analytic, in float64."""
    p = make_plan(name, modes)
    adapter = TensorAdapter(p, dtype=torch.float64)
    random_factors(adapter, torch.float64)
    xs = inputs(p, tokens=3, dtype=torch.float64)
    widths = list(xs)
    params = list(adapter.parameters())
    x_leaves = [xs[w].clone().requires_grad_(True) for w in widths]

    def f(*args: torch.Tensor) -> torch.Tensor:
        adapter.clear_cache()  # gradcheck perturbs .data in place: no stale shared stage
        xmap = dict(zip(widths, args[: len(widths)], strict=True))
        return torch.cat([adapter.update(t, xmap[t.in_features]).reshape(-1) for t in p.targets])

    assert torch.autograd.gradcheck(f, (*x_leaves, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", registered())
def test_reduced_precision_forward_within_tolerance(name: str, dtype: torch.dtype) -> None:
    """The update with factors and input in bf16/fp16 vs float32: relative Frobenius error within
    the documented tolerance, and well above zero (the test really ran in low precision)."""
    p = make_plan(name, ["heads", "qkv", "depth"])
    ref = TensorAdapter(p, dtype=torch.float32)
    random_factors(ref, torch.float32)
    low = TensorAdapter(p, dtype=dtype)
    low.load_state_dict(ref.state_dict())
    xs = inputs(p, tokens=16, dtype=torch.float32)
    tol = TOLERANCES[str(dtype).removeprefix("torch.")]
    worst = 0.0
    for t in p.targets:
        want = ref.update(t, xs[t.in_features])
        got = low.update(t, xs[t.in_features].to(dtype))
        assert got.dtype == dtype
        worst = max(worst, relative_error(got.float(), want))
        ref.clear_cache()
        low.clear_cache()
    assert 0 < worst <= tol, (name, str(dtype), worst)


def test_reduced_precision_adapted_model_merged_equals_unmerged() -> None:
    """bf16 end to end on tiny-bert: the adapted forward and the merged forward agree to bf16
    precision (merging adds the update into bf16 weights)."""
    model = build_model("tiny-bert")
    ta.inject(
        model,
        {
            "factorization": "cp",
            "targets": ["q", "k", "v", "o"],
            "modes": ["heads", "qkv", "depth"],
            "rank": 4,
        },
    )
    random_factors(get_adapter(model), torch.float32, scale=0.3)
    x = model_inputs(model)
    with torch.no_grad():
        want = model(**x).last_hidden_state
        model.to(torch.bfloat16)
        got = model(**x).last_hidden_state
        ta.merge(model)
        merged = model(**x).last_hidden_state
    assert relative_error(got.float(), want) < 5e-2
    assert relative_error(merged.float(), want) < 5e-2


@pytest.mark.parametrize("name", registered())
def test_same_seed_same_factors_and_outputs(name: str) -> None:
    spec = {"factorization": name, "modes": ["qkv", "depth"], "rank": 2, "dropout": 0.1}
    if name == "mpo":
        spec = {**spec, "modes": [], "targets": ["q"], "options": {"n_cores": 2}}
    runs = []
    for seed in (7, 7, 8):
        model = build_model("tiny-bert")
        ta.inject(model, spec, seed=seed)  # an error fails the test, never skips it
        facs = {k: v.detach().clone() for k, v in get_adapter(model).state_dict().items()}
        if seed == 8:  # another seed: only its init is compared
            runs.append((facs, None, None))
            continue
        # two training steps with adapter dropout: same torch seed -> same masks, same result
        torch.manual_seed(seed)
        model.train()
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2)
        for _ in range(2):
            h = model(**model_inputs(model)).last_hidden_state
            (h @ torch.linspace(-1, 1, h.shape[-1])).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        with torch.no_grad():
            out = model(**model_inputs(model, seed=5)).last_hidden_state
        trained = {k: v.detach().clone() for k, v in get_adapter(model).state_dict().items()}
        assert any(not torch.equal(trained[k], facs[k]) for k in facs), "training did nothing"
        runs.append((facs, out, trained))
    (f1, o1, t1), (f2, o2, t2), (f3, _, _) = runs
    assert f1.keys() == f2.keys()
    assert all(torch.equal(f1[k], f2[k]) for k in f1)
    assert all(torch.equal(t1[k], t2[k]) for k in t1)
    assert torch.equal(o1, o2)
    assert any(not torch.equal(f1[k], f3[k]) for k in f1), "the seed does not reach the init"
