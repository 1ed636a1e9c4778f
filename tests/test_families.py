"""Every known family, checked against a real model built from a tiny config.

- the family table's facts (widths, heads, kv-heads, fused descriptors) for each case;
- every site resolves to a module of the right shape, no projection of a layer is left out,
  and ``from_model`` agrees with ``from_config``;
- for fused q/k/v modules, the rows :class:`Fused` selects are the model's own q, k, v (its own
  split code, or the tensors its attention receives);
- for experts, the stacked parameters read as the descriptors say reproduce the experts
  module's own forward, gate and up the right way round;
- the fallback scan recognises fused modules, and refuses the ones it cannot read.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from tiny_models import CASES, Case, build, tiny_config
from torch import nn

from tensadapt.arch import (
    BUILTIN_FAMILIES,
    EXPERT_PROJECTIONS,
    Architecture,
    Fused,
    TargetSite,
    from_config,
    from_model,
    resolve_modules,
    scan_model,
)
from tensadapt.arch.scan import weight_layout
from tensadapt.errors import ArchitectureError

IDS = [c.id for c in CASES]
ALL_TYPES = [mt for family in BUILTIN_FAMILIES for mt in family.model_types]


def _first(arch: Architecture, proj: str) -> TargetSite:
    return next(s for s in arch.sites if s.proj == proj)


# --- the table -----------------------------------------------------------------------------------


def test_every_family_has_a_case() -> None:
    assert {f.name for f in BUILTIN_FAMILIES} == {c.family for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_config_facts(case: Case) -> None:
    arch = from_config(case.config())
    assert arch.family == case.family
    assert arch.n_layers == case.layers
    assert (arch.n_heads, arch.n_kv_heads, arch.head_dim) == case.heads
    assert arch.projections == case.projections
    got = {
        s.proj: (s.fused.groups, s.fused.slots, s.fused.unit, s.fused.start, s.fused.stop)
        for s in reversed(arch.sites)
        if s.fused is not None
    }
    assert got == case.fused
    for site in arch.sites:
        if site.fused is not None:  # a projection's rows, read through its descriptor
            assert site.fused.out_features == site.out_features
        if site.head_side is not None:
            assert site.n_heads and site.out_features * site.in_features % site.n_heads == 0


# --- against the real modules --------------------------------------------------------------------


def _linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if weight_layout(m) is not None}


def _assert_fits(model: nn.Module, arch: Architecture, untargeted: str | None) -> None:
    names = resolve_modules(model, arch)  # shape-checked, experts included
    assert set(names) == {(s.layer, s.proj) for s in arch.sites}
    # fused projections of one module tile its output rows exactly once
    rows: dict[str, list[int]] = {}
    for site in arch.sites:
        if site.fused is not None:
            key = names[(site.layer, site.proj)] + (
                "." + site.experts.param if site.experts else ""
            )
            rows.setdefault(key, []).extend(site.fused.rows())
            assert len(site.fused.rows()) == site.out_features
    for key, got in rows.items():
        assert sorted(got) == list(range(len(got))), key
    # no linear module inside a layer is left out (save the ones the case says are not targets)
    layer_paths = {name.rsplit(".", 1)[0] for name in names.values()}
    stacks = {re.sub(r"\.\d+(\..*)?$", "", p) for p in layer_paths}
    covered = set(names.values()) | {
        n for n in _linear_modules(model) if untargeted and re.search(untargeted, n)
    }
    inside = {
        n
        for n in _linear_modules(model)
        if any(re.match(rf"{re.escape(s)}\.\d+\.", n) for s in stacks)
    }
    assert inside <= covered, sorted(inside - covered)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sites_fit_the_real_model(case: Case) -> None:
    config = case.config()
    arch = from_config(config)
    with torch.device("meta"):
        model = build(config)
    _assert_fits(model, arch, case.untargeted)
    assert from_model(model) == arch
    with torch.device("meta"):  # under a task head: the same sites, behind a prefix
        headed = build(config, head=True)
    assert from_model(headed) == arch
    resolve_modules(headed, arch)


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_every_model_type_resolves(model_type: str) -> None:
    """Every model_type the table names builds from a tiny config and fits its family."""
    config = tiny_config(model_type)
    arch = from_config(config)
    with torch.device("meta"):
        model = build(config)
    resolve_modules(model, arch)
    assert from_model(model) == arch
    assert {"q", "k", "v", "o"} <= set(arch.projections)


def test_encoder_only_model_of_an_encoder_decoder_family() -> None:
    """T5EncoderModel has only the encoder list: from_model numbers just its layers."""
    from transformers import T5EncoderModel

    config = tiny_config("t5")
    with torch.device("meta"):
        model = T5EncoderModel(config)
    arch = from_model(model)
    assert arch.n_layers == 2 and [(s.name, s.start) for s in arch.stacks] == [("encoder", 0)]
    assert not any(s.proj.startswith("cross_") for s in arch.sites)
    resolve_modules(model, arch)


def test_decoder_only_model_of_an_encoder_decoder_family() -> None:
    """BartForCausalLM is BART's decoder alone: its layers are numbered from 0."""
    from transformers import BartForCausalLM

    with torch.device("meta"):
        model = BartForCausalLM(tiny_config("bart"))
    arch = from_model(model)
    assert [(s.name, s.start, s.n_layers) for s in arch.stacks] == [("decoder", 0, 2)]
    assert arch.layers_with("cross_q") == (0, 1)
    resolve_modules(model, arch)


def test_encoder_decoder_numbering() -> None:
    """Encoder layers first, decoder layers continue the count; cross-attention only there."""
    arch = from_config(tiny_config("bart", encoder_layers=3, decoder_layers=2))
    assert [(s.name, s.start, s.n_layers) for s in arch.stacks] == [
        ("encoder", 0, 3),
        ("decoder", 3, 2),
    ]
    assert arch.layers_with("cross_q") == (3, 4) and arch.layers_with("q") == (0, 1, 2, 3, 4)
    assert arch.site(3, "q").module == "decoder.layers.0.self_attn.q_proj"
    assert arch.site(4, "cross_k").module == "decoder.layers.1.encoder_attn.k_proj"
    assert arch.site(2, "o").module == "encoder.layers.2.self_attn.out_proj"
    with pytest.raises(KeyError, match=r"'cross_q' is only in layers 3\.\.4"):
        arch.site(0, "cross_q")
    assert arch.fingerprint()["stacks"] == [["encoder", 0, 3], ["decoder", 3, 2]]


def test_dual_tower_sizes_come_from_each_sub_config() -> None:
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=40)
    vision = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=6, intermediate_size=96)
    arch = from_config(tiny_config("clip", text_config=text, vision_config=vision))
    assert [(s.name, s.start, s.n_layers) for s in arch.stacks] == [
        ("text", 0, 1),
        ("vision", 1, 2),
    ]
    assert (arch.site(0, "up").out_features, arch.site(2, "up").out_features) == (40, 96)
    assert (arch.site(0, "q").n_heads, arch.site(1, "q").n_heads) == (4, 6)
    assert arch.site(1, "q").module == "vision_model.encoder.layers.0.self_attn.q_proj"


def test_moe_layer_kinds() -> None:
    """Sparse layers have experts (and Qwen2-MoE's shared expert as up/gate/down); layers in
    mlp_only_layers have the dense MLP instead, with its own width."""
    arch = from_config(tiny_config("qwen2_moe", mlp_only_layers=[1], num_hidden_layers=3))
    assert arch.layers_with("expert_up") == (0, 2) and arch.layers_with("up") == (0, 1, 2)
    assert arch.site(0, "up").module == "layers.0.mlp.shared_expert.up_proj"
    assert arch.site(0, "up").out_features == 24  # shared_expert_intermediate_size
    assert arch.site(1, "up").module == "layers.1.mlp.up_proj"
    assert arch.site(1, "up").out_features == 64  # intermediate_size
    e = arch.site(2, "expert_down")
    assert (e.module, e.in_features, e.out_features, e.n_experts) == (
        "layers.2.mlp.experts",
        16,
        32,
        4,
    )
    assert e.experts is not None and e.experts.router == "layers.2.mlp.gate"
    assert arch.n_experts == 4 and arch.fingerprint()["n_experts"] == 4


# --- fused q/k/v: the selected rows are the model's own q, k, v -----------------------------------


@contextmanager
def _attention_probe(model: nn.Module) -> Iterator[list[tuple[nn.Module, torch.Tensor, ...]]]:
    """Capture (module, query, key, value) of every attention call that goes through
    ``transformers``' attention interface."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls: list[Any] = []

    def probe(module: nn.Module, query: Any, key: Any, value: Any, *args: Any, **kw: Any) -> Any:
        calls.append((module, query.detach(), key.detach(), value.detach()))
        return sdpa_attention_forward(module, query, key, value, *args, **kw)

    AttentionInterface.register("tensadapt_probe", probe)
    before = model.config._attn_implementation
    model.set_attn_implementation("tensadapt_probe")
    try:
        yield calls
    finally:
        model.set_attn_implementation(before)


def _heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """One token's q/k/v, ``[B=1, H, T=1, hd]`` or ``[B=1, T=1, H, hd]``, as ``[H, hd]``."""
    return t.reshape(-1, head_dim)


def _models_qkv(
    model: nn.Module, fused_name: str, arch: Architecture
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fused output y [W], q, k, v [heads, hd]) for one token at position 0 (rotary = identity),
    as the model's own code splits them."""
    fused = model.get_submodule(fused_name)
    attn = model.get_submodule(fused_name.rpartition(".")[0])
    seen: dict[str, torch.Tensor] = {}
    handle = fused.register_forward_hook(lambda m, a, out: seen.setdefault("y", out.detach()))
    with torch.no_grad():
        if hasattr(attn, "_split_heads") or hasattr(attn, "_reshape"):  # Falcon, Persimmon; BLOOM
            model(input_ids=torch.tensor([[3]]))
            split = getattr(attn, "_split_heads", None) or attn._reshape
            q, k, v = split(seen["y"])
        elif hasattr(attn, "transpose_for_scores"):  # DeBERTa: transpose_for_scores(qp).chunk(3)
            model(input_ids=torch.tensor([[3]]))
            q, k, v = attn.transpose_for_scores(seen["y"]).chunk(3, dim=-1)
        else:
            with _attention_probe(model) as calls:
                model(input_ids=torch.tensor([[3]]))
            _, q, k, v = next(c for c in calls if c[0] is attn)
    handle.remove()
    hd = arch.head_dim
    return seen["y"].reshape(-1), _heads(q, hd), _heads(k, hd), _heads(v, hd)


FUSED_QKV_CASES = [c for c in CASES if "q" in c.fused]


@pytest.mark.parametrize("case", FUSED_QKV_CASES, ids=[c.id for c in FUSED_QKV_CASES])
def test_fused_rows_are_the_models_own_qkv(case: Case) -> None:
    config = case.config()
    model = build(config)
    arch = from_config(config)
    layer = arch.n_layers - 1  # the last layer: the template's index is used
    q_site = arch.site(layer, "q")
    name = resolve_modules(model, arch)[(layer, "q")]
    y, q, k, v = _models_qkv(model, name, arch)
    hd = arch.head_dim
    for got, proj in ((q, "q"), (k, "k"), (v, "v")):
        site = arch.site(layer, proj)
        assert site.module == q_site.module and site.fused is not None
        ours = y[site.fused.rows()].reshape(site.n_heads, hd)
        if got.shape[0] != site.n_heads:  # k, v repeated per query head (Falcon's new layout)
            ours = ours.repeat_interleave(got.shape[0] // site.n_heads, dim=0)
        torch.testing.assert_close(ours, got, rtol=0, atol=0)
    assert len(set(y.tolist())) == y.numel()  # distinct values: a wrong row could not match


def test_fused_gate_up_order_is_the_models() -> None:
    """Phi-3's gate_up_proj: the half the descriptor calls gate is the one the MLP activates."""
    config = tiny_config("phi3")
    model = build(config)
    arch = from_config(config)
    mlp = model.layers[0].mlp
    gate, up = arch.site(0, "gate").fused, arch.site(0, "up").fused
    assert gate is not None and up is not None
    x = torch.randn(3, 32)
    with torch.no_grad():
        y = mlp.gate_up_proj(x)
        ours = mlp.down_proj(mlp.activation_fn(y[:, gate.rows()]) * y[:, up.rows()])
        torch.testing.assert_close(ours, mlp(x), rtol=1e-6, atol=1e-6)


# --- experts: the stacked parameters reproduce the experts' own forward ---------------------------

MOE_CASES = [c for c in CASES if "expert_up" in c.projections]


def _matrix(module: nn.Module, site: TargetSite, expert: int) -> tuple[torch.Tensor, Any]:
    """Expert ``expert``'s whole ``[out_total, in]`` matrix of ``site``'s parameter, and bias."""
    assert site.experts is not None
    w = getattr(module, site.experts.param)[expert]
    w = w.t() if site.layout == "conv1d" else w
    bias = getattr(module, site.experts.bias)[expert] if site.experts.bias else 0.0
    return w, bias


@pytest.mark.parametrize("case", MOE_CASES, ids=[c.id for c in MOE_CASES])
def test_expert_weights_reproduce_the_experts_forward(case: Case) -> None:
    config = case.config()
    model = build(config)
    arch = from_config(config)
    layer = max(arch.layers_with("expert_up"))
    sites = {p: arch.site(layer, p) for p in EXPERT_PROJECTIONS}
    experts = model.get_submodule(resolve_modules(model, arch)[(layer, "expert_up")])
    gate, up, down = sites["expert_gate"], sites["expert_up"], sites["expert_down"]
    assert gate.fused is not None and up.fused is not None and gate.experts is not None
    width = gate.fused.width
    # what transformers' @use_experts_implementation records about the layout agrees
    assert experts.is_transposed == (gate.layout == "conv1d")
    assert experts.is_concatenated == (gate.fused.groups == 1)
    assert experts.has_bias == (gate.experts.bias is not None)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0)) * 0.5

    def ours(e: int, gate_rows: torch.Tensor, up_rows: torch.Tensor) -> torch.Tensor:
        z = torch.zeros(x.shape[0], width)
        z[:, gate.fused.rows()] = gate_rows
        z[:, up.fused.rows()] = up_rows
        w, b = _matrix(experts, down, e)
        return experts._apply_gate(z) @ w.t() + b

    with torch.no_grad():
        for e in range(gate.experts.n_experts):
            w, b = _matrix(experts, gate, e)
            zg = (x @ w.t() + b)[:, gate.fused.rows()]
            zu = (x @ w.t() + b)[:, up.fused.rows()]
            index = torch.full((x.shape[0], 1), e)
            theirs = experts(x, index, torch.ones(x.shape[0], 1))
            torch.testing.assert_close(ours(e, zg, zu), theirs, rtol=1e-5, atol=1e-5)
            # the up rows enter linearly (gate fixed) and the gate rows do not: not swapped
            a, b = zg / zg.std(), zu  # gate values of order one, where the activation bends
            base = ours(e, a, torch.zeros_like(b))
            torch.testing.assert_close(
                ours(e, a, 2 * b) - base, 2 * (ours(e, a, b) - base), rtol=1e-4, atol=1e-6
            )
            at_zero = ours(e, torch.zeros_like(a), b)
            bent = (ours(e, 2 * a, b) - at_zero) - 2 * (ours(e, a, b) - at_zero)
            assert bent.abs().max() > 1e-3 * (ours(e, a, b) - at_zero).abs().max()
    router = model.get_submodule(
        next(n for n, _ in model.named_modules() if n.endswith(gate.experts.router))
    )
    assert getattr(router, "top_k", None) == gate.experts.top_k
    with torch.no_grad():
        *_, top_index = router(x)
    assert top_index.shape == (x.shape[0], gate.experts.top_k)


# --- the fallback scan ---------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", ["gpt_neox", "falcon-new-decoder", "bloom", "modernbert"])
def test_scan_recognises_fused_layouts(case_id: str) -> None:
    """Without the family table, the scan splits a known fused name exactly as the table does."""
    case = next(c for c in CASES if c.id == case_id)
    config = case.config()
    with torch.device("meta"):
        model = build(config)
    table = from_config(config)
    scanned = scan_model(model, config)
    assert scanned.family == "generic"
    for proj in ("q", "k", "v"):
        a, b = table.site(1, proj), scanned.site(1, proj)
        assert (a.module, a.fused, a.n_heads, a.out_features) == (
            b.module,
            b.fused,
            b.n_heads,
            b.out_features,
        )


def test_scan_refuses_qkv_proj_and_splits_gate_up() -> None:
    """Phi-3's qkv_proj is q | k | v but CodeGen's is 4 shards of (q, v, k): the name says
    nothing, so the scan refuses it with the reason; Phi-3's gate_up_proj it splits."""
    config = tiny_config("phi3")
    with torch.device("meta"):
        model = build(config)
    with pytest.raises(ArchitectureError, match=r"qkv_proj.*cannot be inferred from the name"):
        scan_model(model, config)
    del model.layers[0].self_attn.qkv_proj, model.layers[1].self_attn.qkv_proj
    arch = scan_model(model, config)
    assert arch.site(1, "gate").fused == from_config(config).site(1, "gate").fused
    assert arch.projections == ("o", "up", "gate", "down")


class _Block(nn.Module):
    def __init__(self, leaf: str, width: int) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.add_module(leaf, nn.Linear(32, width))
        self.attn.o_proj = nn.Linear(32, 32)


class _Tiny(nn.Module):
    def __init__(self, leaf: str, width: int, heads: int, kv: int) -> None:
        from transformers import PretrainedConfig

        super().__init__()
        self.layers = nn.ModuleList(_Block(leaf, width) for _ in range(2))
        self.config = PretrainedConfig(
            hidden_size=32, num_attention_heads=heads, num_key_value_heads=kv
        )


def test_scan_refuses_a_fused_module_it_cannot_read() -> None:
    """An unknown name whose width says q/k/v is refused with the reason, not guessed."""
    with pytest.raises(ArchitectureError, match=r"layers\.0\.attn\.wqkv.*cannot be inferred"):
        scan_model(_Tiny("wqkv", 64, heads=4, kv=2))
    with pytest.raises(ArchitectureError, match=r"width 80 is neither 3 x 32"):
        scan_model(_Tiny("query_key_value", 80, heads=4, kv=2))
    # one kv head: every reading is q | k | v, so the scan can split it
    arch = scan_model(_Tiny("wqkv", 48, heads=4, kv=1))
    assert arch.site(1, "k").fused == Fused(1, 6, 8, 4, 5) and arch.site(1, "k").n_heads == 1
    # a known name splits by its layout: query_key_value per kv group
    arch = scan_model(_Tiny("query_key_value", 64, heads=4, kv=2))
    assert arch.site(0, "q").fused == Fused(2, 4, 8, 0, 2)
