"""The GPT-Neo family on a tiny random model: config-only architecture, inject, train, merge."""

from __future__ import annotations

import pytest
import torch
from tensadapt_gpt_neo import GPT_NEO

import tensadapt as ta
from tensadapt.arch import from_config, from_model, scan_model
from tensadapt.testing import single_thread


def _config():
    from transformers import GPTNeoConfig

    return GPTNeoConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        attention_types=[[["global", "local"], 1]],
        max_position_embeddings=32,
        window_size=8,
        bos_token_id=0,
        eos_token_id=0,
    )


def _model() -> torch.nn.Module:
    from transformers import AutoModel

    torch.manual_seed(0)
    return AutoModel.from_config(_config()).eval()


def test_family_is_registered_and_reads_the_config_alone() -> None:
    from tensadapt.plugins import architecture_registry

    entry = architecture_registry().entry("gpt_neo")
    assert entry.obj == GPT_NEO and entry.source == "tensadapt-gpt-neo"
    arch = from_config(_config())
    assert arch.family == "gpt_neo"
    assert (arch.n_layers, arch.hidden_size, arch.n_heads, arch.intermediate_size) == (
        2,
        32,
        4,
        128,
    )
    assert arch.projections == ("q", "k", "v", "o", "up", "down")


def test_sites_match_the_real_modules() -> None:
    model = _model()
    arch = from_model(model)
    assert arch.family == "gpt_neo"
    scanned = scan_model(model, model.config)  # what the core finds by module names alone
    ours = {(s.layer, s.proj): (s.module, s.in_features, s.out_features) for s in arch.sites}
    theirs = {(s.layer, s.proj): (s.module, s.in_features, s.out_features) for s in scanned.sites}
    assert ours == theirs


@pytest.mark.parametrize("modes", [["qkv", "depth"], ["heads", "qkv", "depth"]])
def test_inject_trains_and_merges(modes: list[str]) -> None:
    model = _model()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(input_ids=ids).last_hidden_state
    ta.inject(
        model,
        {"factorization": "cp", "targets": ["q", "k", "v", "o"], "modes": modes, "rank": 4},
        seed=0,
    )
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, base, rtol=0, atol=0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randn_like(base)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(model(input_ids=ids).last_hidden_state, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state
        ta.merge(model)
        torch.testing.assert_close(
            model(input_ids=ids).last_hidden_state, before, rtol=1e-5, atol=1e-5
        )


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread."""
    with single_thread():
        yield
