"""``lora`` on BERT gives the same logits as PEFT's LoRA with the same A, B, r and alpha."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, hidden, model_inputs

import tensadapt as ta
from tensadapt.model import get_adapter

peft = pytest.importorskip("peft")


@pytest.mark.parametrize(("r", "alpha"), [(4, 8), (2, 2), (8, 32)])
def test_lora_matches_peft(r: int, alpha: int) -> None:
    # float64: both sides then agree to ~1e-14, so the check is about the maths, not about fp32
    # rounding (which differs: tensadapt accumulates the update inside the base matmul's addmm)
    ours = build_model("tiny-bert", seed=0).double()
    ref = build_model("tiny-bert", seed=0).double()
    inputs = model_inputs(ours)
    cfg = peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=["query", "key", "value"], lora_dropout=0.0
    )
    ref = peft.get_peft_model(ref, cfg)
    ta.inject(
        ours, {"factorization": "lora", "targets": ["q", "k", "v"], "rank": r, "alpha": alpha}
    )
    adapter = get_adapter(ours)
    g = torch.Generator().manual_seed(0)
    proj_name = {"q": "query", "k": "key", "v": "value"}
    with torch.no_grad():
        for t in adapter.plan.targets:
            a = torch.randn(t.in_features, r, generator=g) * 0.3
            b = torch.randn(t.out_features, r, generator=g) * 0.3
            adapter.factors[t.tensor]["A"].copy_(a)
            adapter.factors[t.tensor]["B"].copy_(b)
            mod = ref.get_submodule(
                f"base_model.model.encoder.layer.{t.layer}.attention.self.{proj_name[t.proj]}"
            )
            mod.lora_A["default"].weight.copy_(a.t())
            mod.lora_B["default"].weight.copy_(b)
        torch.testing.assert_close(hidden(ours, inputs), hidden(ref, inputs), rtol=1e-5, atol=1e-5)
    assert ta.trainable_parameters(ours) == sum(
        p.numel() for p in ref.parameters() if p.requires_grad
    )
