"""Mixture-of-experts (issue 13 item 3): the ``experts`` stacking mode over the experts' stacked
3-D weights, with every factorization and with the other modes; exact counts; the routed forward
pays only for the experts tokens are routed to; the shipped spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT
from tiny_models import build, model_inputs, outputs, tiny_config

import tensadapt as ta
from tensadapt.executor import Executor
from tensadapt.experts import AdaptedExperts
from tensadapt.model import TensadaptModel

EXPERT_TARGETS = ["expert_gate", "expert_up", "expert_down"]


def mixtral(**kw: Any) -> torch.nn.Module:
    return build(tiny_config("mixtral", **kw))


def test_cp_over_experts_and_depth_counts_from_factor_shapes() -> None:
    model = mixtral()
    cfg = model.config
    d, inter, n_exp, n_layers = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_local_experts,
        cfg.num_hidden_layers,
    )
    r = 4
    p = ta.plan(
        {
            "factorization": "cp",
            "targets": EXPERT_TARGETS,
            "modes": ["experts", "depth"],
            "rank": r,
        },
        model,
    )
    # gate and up are [d -> I] matrices, down is [I -> d]: oriented alike (down transposed),
    # they form one shape; without qkv each projection is its own tensor over (in, out, experts,
    # depth): r * (d + I + E + L) parameters each
    assert {tp.name for tp in p.tensors} == set(EXPERT_TARGETS)
    for tp in p.tensors:
        assert [a.name for a in tp.axes] == ["in", "out", "experts", "depth"]
        assert tp.n_params == r * (d + inter + n_exp + n_layers)
    assert p.n_params == 3 * r * (d + inter + n_exp + n_layers)
    # one target per expert matrix, LoRA's count per matrix
    assert len(p.targets) == 3 * n_exp * n_layers
    assert p.lora_params == 3 * n_exp * n_layers * r * (d + inter)
    ta.inject(model, p)
    assert ta.trainable_parameters(model) == p.n_params


def test_without_the_experts_mode_each_expert_has_its_own_tensor() -> None:
    model = mixtral()
    p = ta.plan({"factorization": "lora", "targets": ["expert_down"], "rank": 2}, model)
    n = model.config.num_local_experts * model.config.num_hidden_layers
    assert len(p.tensors) == n and len({tp.name for tp in p.tensors}) == n


@pytest.mark.parametrize("fact", ["lora", "cp", "tucker", "tt", "mpo"])
@pytest.mark.parametrize("modes", [["experts"], ["experts", "depth"], ["qkv", "experts", "depth"]])
def test_every_factorization_with_the_experts_mode(fact: str, modes: list[str]) -> None:
    model = mixtral()
    inputs = model_inputs(model)
    with torch.no_grad():
        base = outputs(model, inputs)
    tm = TensadaptModel(
        model, {"factorization": fact, "targets": EXPERT_TARGETS, "modes": modes, "rank": 2}, seed=0
    )
    with torch.no_grad():
        torch.testing.assert_close(outputs(tm, inputs), base, rtol=0, atol=0)
        g = torch.Generator().manual_seed(0)
        for prm in tm.adapter().parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.2)
        adapted = outputs(tm, inputs)
        assert (adapted - base).abs().max() > 1e-4
        tm.merge_adapter()  # into the stacked 3-D expert weights
        torch.testing.assert_close(outputs(tm, inputs), adapted, rtol=1e-4, atol=1e-4)
        tm.unmerge_adapter()


def test_routed_forward_pays_only_for_routed_experts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route every token to experts 0 and 1: the adapter contracts nothing for experts 2 and 3,
    and the updates it does compute use only those experts' tokens."""
    model = mixtral()
    tm = TensadaptModel(
        model, {"factorization": "cp", "targets": EXPERT_TARGETS, "modes": ["experts"], "rank": 2}
    )
    experts = next(m for m in tm.base_model.modules() if isinstance(m, AdaptedExperts))
    seen: list[tuple[int, int]] = []
    real = Executor.add_updates

    def spy(self: Executor, targets: Any, x: torch.Tensor, *a: Any) -> torch.Tensor:
        seen.extend((t.expert, x.shape[0]) for t in targets)
        return real(self, targets, x, *a)

    monkeypatch.setattr(Executor, "add_updates", spy)
    hidden = torch.randn(6, model.config.hidden_size)
    index = torch.tensor([[0, 1], [1, 0], [0, 1], [0, 1], [1, 0], [0, 1]])
    weights = torch.full((6, 2), 0.5)
    with torch.no_grad():
        got = experts(hidden, index, weights)
        want = experts.base(hidden, index, weights)  # zero update: the base experts
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert {e for e, _ in seen} == {0, 1}
    assert all(n == 6 for _, n in seen)  # each expert saw its 6 routed tokens, no more


def test_shipped_moe_spec_plans_on_a_mixtral_shape() -> None:
    path = ROOT / "specs" / "moe-cp-experts-depth.yaml"
    spec = ta.load_spec(path)
    assert spec.factorization == "cp" and set(spec.modes) == {"experts", "depth"}
    assert Path(path).read_text().startswith("#")
    p = ta.plan(spec, mixtral())
    assert p.n_params > 0 and all(t.proj in EXPERT_TARGETS for t in p.targets)
