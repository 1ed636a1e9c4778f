"""Every forward optimisation keeps outputs and gradients equal to the straightforward contraction
(one einsum of x with every sliced factor per target, then · scaling): shared ``x·P_in``, batched
``P`` matrices with the scaling folded in, the fused in-place ``addmm_`` into the base output, the
block matrix of GPT-2's fused c_attn, one dropout mask per layer input, and the strategy choice by
FLOPs. Not timed: speed lives in ``benchmarks/bench_step.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import build_model, model_inputs
from torch import nn

import tensadapt as ta
from tensadapt.costs import route_path_flops
from tensadapt.executor import Executor
from tensadapt.model import TensadaptModel, get_adapter
from tensadapt.nn import TensorAdapter
from tensadapt.planner import plan

SPECS: dict[str, dict[str, Any]] = {
    "lora": {"factorization": "lora", "targets": ["q", "k", "v"], "rank": 4},
    "lorta": {
        "factorization": "cp",
        "targets": ["q", "k", "v", "o"],
        "modes": ["heads", "qkv", "depth"],
        "rank": 4,
    },
    "tucker-qkv-depth": {
        "factorization": "tucker",
        "targets": ["q", "k", "v"],
        "modes": ["qkv", "depth"],
        "rank": 3,
    },
    "tt-qkv-depth": {
        "factorization": "tt",
        "targets": ["q", "k", "v", "o"],
        "modes": ["qkv", "depth"],
        "rank": 3,
    },
    "tucker-heads-o": {
        "factorization": "tucker",
        "targets": ["v", "o"],
        "modes": ["heads"],
        "rank": 2,
    },
    "lora-qkv-shared": {
        "factorization": "lora",
        "targets": ["q", "v"],
        "modes": ["qkv"],
        "rank": 3,
    },
    "mpo": {"factorization": "mpo", "targets": ["q", "o"], "modes": [], "rank": 2},
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def probe(y: torch.Tensor) -> torch.Tensor:
    w = torch.randn(y.shape[-1], generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    return (y * w.to(y.device)).sum(-1).square().mean()


class ReplayDropout(nn.Module):
    """Dropout whose masks are recorded on the first run and replayed, in call order, after."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.masks: list[torch.Tensor] = []
        self.replay = False
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if self.replay:
            m = self.masks[self.calls]
            self.calls += 1
        else:
            m = (torch.rand_like(x) >= self.p).to(x.dtype) / (1 - self.p)
            self.masks.append(m)
        return x * m


def use_reference(model: nn.Module) -> Callable[[], None]:
    """The straightforward forward: base(x) + Σ reference_update(dropout(x)), one dropout call per
    distinct module input (the first time it is seen), columns placed with ``cat``."""
    ad = get_adapter(model)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # x kept alive: ids stay unique

    def add_updates(
        targets: Any, x: torch.Tensor, y: torch.Tensor, inplace: bool, frame: Any
    ) -> torch.Tensor:
        if id(x) not in seen:
            seen[id(x)] = (x, ad.dropout(x))
        xd = seen[id(x)][1]
        width = y.shape[-1]
        full = torch.zeros_like(y)
        pieces = []
        for t in targets:
            a, b = t.out_slice or (0, width)
            pieces.append((a, b, ad.reference_update(t, xd)))
        for a, b, u in pieces:
            full = full + torch.cat(
                [y.new_zeros(*y.shape[:-1], a), u, y.new_zeros(*y.shape[:-1], width - b)], dim=-1
            )
        return y + full

    ad.add_updates = add_updates  # type: ignore[method-assign]

    def back() -> None:
        del ad.add_updates
        seen.clear()

    return back


def _adapted(preset: str, spec: dict[str, Any], dropout: float = 0.0) -> nn.Module:
    """A :class:`TensadaptModel` (its forward opens the executor's frame: the fast path)."""
    base = build_model(preset, seed=0)
    # base dropout off: only the adapter's dropout is random (and replayed)
    for mod in base.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    model = TensadaptModel(base, {**spec, "dropout": dropout}, seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in get_adapter(model).parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _compare(model: nn.Module, inputs: dict[str, torch.Tensor], train: bool) -> None:
    ad = get_adapter(model)
    model.train(train)
    params = [p for p in model.parameters() if p.requires_grad]
    if isinstance(ad.dropout, ReplayDropout):
        ad.dropout.replay = False
    y = model(**inputs).last_hidden_state
    g = torch.autograd.grad(probe(y), params)
    back = use_reference(model)
    if isinstance(ad.dropout, ReplayDropout):
        ad.dropout.replay, ad.dropout.calls = True, 0
    try:
        y_ref = model(**inputs).last_hidden_state
        g_ref = torch.autograd.grad(probe(y_ref), params)
    finally:
        back()
    assert rel(y.detach(), y_ref.detach()) <= 1e-5
    for a, b in zip(g, g_ref, strict=True):
        assert rel(a, b) <= 1e-5


@pytest.mark.parametrize("preset", ["tiny-bert", "tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("name", list(SPECS))
def test_fast_forward_equals_straightforward_contraction(preset: str, name: str) -> None:
    model = _adapted(preset, SPECS[name]).double()
    _compare(model, model_inputs(model, batch=2, seq=6), train=True)


@pytest.mark.parametrize("preset", ["tiny-bert", "tiny-gpt2"])
@pytest.mark.parametrize("name", ["lora", "lorta", "tucker-qkv-depth", "mpo"])
def test_dropout_one_mask_per_input_equals_reference(preset: str, name: str) -> None:
    """Same seed, same masks: one mask per module input, shared by its targets (q, k, v)."""
    model = _adapted(preset, SPECS[name], dropout=0.1).double()
    ad = get_adapter(model)
    ad.dropout = ReplayDropout(0.1)
    torch.manual_seed(0)
    _compare(model, model_inputs(model, batch=2, seq=6), train=True)
    n_inputs = len({(t.layer, t.proj in ("o",)) for t in ad.plan.targets})
    assert len(ad.dropout.masks) == n_inputs  # q, k, v of a layer share one mask


def test_fast_forward_fp32_and_inference_and_merge() -> None:
    model = _adapted("tiny-bert", SPECS["lorta"])
    inputs = model_inputs(model)
    _compare(model, inputs, train=False)
    with torch.inference_mode():
        unmerged = model(**inputs).last_hidden_state.clone()
        ta.merge(model)
        merged = model(**inputs).last_hidden_state
        ta.unmerge(model)
    assert rel(merged, unmerged) <= 1e-5


def test_shared_input_product_computed_once_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """q, k and v of a BERT layer receive the same tensor object, so ``x·P_in`` runs once."""
    model = _adapted("tiny-bert", SPECS["lorta"])
    calls: list[int] = []
    orig = Executor.side

    def counting(self: Executor, t: Any, side: str, frame: Any) -> torch.Tensor:
        if side == "in":  # asked for only when x·P_in is computed
            calls.append(t.layer)
        return orig(self, t, side, frame)

    monkeypatch.setattr(Executor, "side", counting)
    model(**model_inputs(model))
    n_layers = model.config.num_hidden_layers
    assert len(calls) == 2 * n_layers  # one for q/k/v, one for o, per layer
    assert model.hub.frame is None  # the frame lives for one forward only
    calls.clear()
    model.base_model(**model_inputs(model))  # used in place, without the frame: no sharing
    assert len(calls) == 4 * n_layers


def test_update_outside_a_forward_is_not_cached_across_graphs() -> None:
    p = plan(SPECS["lorta"], build_model("tiny-bert"))
    ad = TensorAdapter(p)
    t = p.targets[0]
    x = torch.randn(3, t.in_features)
    for _ in range(2):  # a second backward on fresh graphs works
        ad.update(t, x).sum().backward()


@pytest.mark.parametrize("name", list(SPECS))
def test_planner_flops_match_optimal(name: str) -> None:
    p = plan(SPECS[name], build_model("tiny-bert"))
    for t in p.targets:
        ours, opt = route_path_flops(t, p.tensor(t.tensor), 1024)
        assert ours <= opt * 1.01 + 1e-9, (t.key, ours, opt)


def test_strategy_prefers_rebuild_only_where_cheaper() -> None:
    p = plan(SPECS["lorta"], build_model("tiny-bert"))
    t = p.targets[0]
    for tokens in (1, 16, 1024):
        costs = t.costs(tokens)  # "stages" is only an estimate, used where no route exists
        assert costs[t.strategy(tokens)] <= 1.01 * min(costs["route"], costs["rebuild"])
    assert p.targets[0].strategy(1024) == "route"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["lora", "lorta", "tucker-qkv-depth", "tt-qkv-depth"])
def test_cuda_bf16_runs_unchanged(name: str) -> None:
    model = _adapted("tiny-bert", SPECS[name]).cuda().to(torch.bfloat16)
    inputs = {k: v.cuda() for k, v in model_inputs(model).items()}
    model.train()
    y = model(**inputs).last_hidden_state
    assert y.dtype == torch.bfloat16
    probe(y.float()).backward()
    assert all(p.grad is not None for p in get_adapter(model).parameters())
    ref = _adapted("tiny-bert", SPECS[name]).double()
    with torch.no_grad():
        want = ref(**model_inputs(ref)).last_hidden_state
    assert rel(y.detach().double().cpu(), want) <= 5e-2
