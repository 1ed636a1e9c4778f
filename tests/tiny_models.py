"""Tiny models of every known family, built from configs (no downloads), and their inputs.

``tiny_config(model_type)`` sets the usual size attributes the config class has (2 layers per
list, width 32, 4 heads, 2 key/value heads where the family has grouped-query attention, head
width 8, MLP width 64, 4 experts of width 64 or 16, top-2) plus the per-type settings in
:data:`OVERRIDES`. ``CASES`` names one configuration per family and per layout variant.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*eos_token_id.*|.*bos_token_id.*")

#: size attributes set where the config class has them
BASE: dict[str, Any] = dict(
    num_hidden_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    vocab_size=100,
    max_position_embeddings=64,
    head_dim=8,
    pad_token_id=0,
    bos_token_id=0,
    eos_token_id=0,
    decoder_start_token_id=0,
    n_layer=2,
    n_embd=32,
    n_head=4,
    n_positions=64,
    n_inner=64,
    d_model=32,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    d_ff=64,
    d_kv=8,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    ffn_dim=64,
    hidden_dim=64,
    ffn_hidden_size=64,
    num_local_experts=4,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=24,
)
_TEXT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    vocab_size=100,
    max_position_embeddings=64,
)
_VISION = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=16,
    patch_size=8,
)
_LM = dict(_TEXT, num_key_value_heads=2, head_dim=8, pad_token_id=0)

#: per-type settings on top of :data:`BASE`
OVERRIDES: dict[str, dict[str, Any]] = {
    "whisper": dict(
        num_mel_bins=8,
        max_source_positions=8,
        max_target_positions=32,
    ),
    "clip": dict(text_config=_TEXT, vision_config=_VISION),
    "siglip": dict(text_config=_TEXT, vision_config=_VISION),
    "siglip2": dict(text_config=_TEXT, vision_config=dict(_VISION, num_patches=4)),
    "clip_vision_model": dict(image_size=16, patch_size=8),
    "siglip_vision_model": dict(image_size=16, patch_size=8),
    "siglip2_vision_model": dict(num_patches=4, patch_size=8),
    "vit": dict(image_size=16, patch_size=8),
    "llava": dict(text_config=dict(_LM, model_type="llama"), vision_config=_VISION),
    "llava_next": dict(text_config=dict(_LM, model_type="llama"), vision_config=_VISION),
    "mistral3": dict(text_config=dict(_LM, model_type="mistral"), vision_config=_VISION),
    "gemma3": dict(text_config=_LM, vision_config=_VISION, mm_tokens_per_image=4),
    "paligemma": dict(text_config=dict(_LM, model_type="gemma"), vision_config=_VISION),
    "gpt_bigcode": dict(multi_query=False),
    "codegen": dict(rotary_dim=4),
    "gptj": dict(rotary_dim=4),
}
#: model types ``AutoModel`` does not build: the class to use
MODEL_CLASS: dict[str, str] = {
    "siglip_text_model": "SiglipTextModel",
    "siglip2_text_model": "Siglip2TextModel",
}


def tiny_config(model_type: str, **overrides: Any) -> Any:
    """A tiny ``PretrainedConfig`` of ``model_type`` (see the module docstring)."""
    from transformers import AutoConfig

    cls = type(AutoConfig.for_model(model_type))
    probe = cls()
    mapped = getattr(cls, "attribute_map", {})
    kwargs = {
        k: v
        for k, v in BASE.items()
        if (hasattr(probe, k) or k in mapped) and not isinstance(getattr(cls, k, None), property)
    }
    explicit = OVERRIDES.get(model_type, {}) | overrides
    kwargs |= explicit
    for alias, target in mapped.items():  # an alias must not override the attribute it maps to
        if alias in kwargs and target in kwargs and alias not in explicit:
            del kwargs[alias]
    return AutoConfig.for_model(model_type, **kwargs)


def build(config: Any, seed: int = 0, head: bool = False) -> nn.Module:
    """A model of ``config`` with seeded random weights, in eval mode (a task head if ``head``)."""
    import transformers
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSpeechSeq2Seq,
    )

    torch.manual_seed(seed)
    name = MODEL_CLASS.get(config.model_type)
    if name is not None:
        return getattr(transformers, name)(config).eval()
    if head:
        for auto in (AutoModelForSeq2SeqLM, AutoModelForSpeechSeq2Seq, AutoModelForCausalLM):
            try:
                return auto.from_config(config).eval()
            except ValueError:
                continue
    return AutoModel.from_config(config).eval()


def model_inputs(model: nn.Module, batch: int = 2, seq: int = 5, seed: int = 1) -> dict[str, Any]:
    """Inputs for ``model``'s forward: token ids, pixels, mel features as its config asks."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    text = getattr(cfg, "text_config", cfg)
    vision = getattr(cfg, "vision_config", cfg)
    vocab = int(getattr(text, "vocab_size", 100) or 100)

    def ids(n: int = seq) -> torch.Tensor:
        return torch.randint(1, min(vocab, 100), (batch, n), generator=g)

    def pixels() -> torch.Tensor:
        size = int(getattr(vision, "image_size", 16) or 16)
        channels = int(getattr(vision, "num_channels", 3) or 3)
        return torch.randn(batch, channels, size, size, generator=g)

    mt = cfg.model_type
    if mt in ("vit", "clip_vision_model", "siglip_vision_model"):
        return {"pixel_values": pixels()}
    if mt == "siglip2_vision_model":
        patch = cfg.patch_size
        n = cfg.num_patches
        return {
            "pixel_values": torch.randn(batch, n, 3 * patch * patch, generator=g),
            "pixel_attention_mask": torch.ones(batch, n, dtype=torch.long),
            "spatial_shapes": torch.tensor([[2, 2]] * batch),
        }
    if mt in ("clip", "siglip"):
        return {"input_ids": ids(), "pixel_values": pixels()}
    if mt == "whisper":
        frames = 2 * cfg.max_source_positions
        return {
            "input_features": torch.randn(batch, cfg.num_mel_bins, frames, generator=g),
            "decoder_input_ids": ids(),
        }
    if getattr(cfg, "is_encoder_decoder", False):
        return {"input_ids": ids(), "decoder_input_ids": ids(4)}
    return {"input_ids": ids()}


def outputs(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """Every floating tensor the forward returns (hidden states, logits, ...), flattened."""
    out = model(**inputs)
    found: list[torch.Tensor] = []

    def collect(value: Any) -> None:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            found.append(value.reshape(-1))
        elif isinstance(value, dict):
            for v in value.values():
                collect(v)
        elif isinstance(value, (tuple, list)):
            for v in value:
                collect(v)

    collect(dict(out.items()) if hasattr(out, "items") else out)
    assert found, f"{type(model).__name__} returned no floating tensor"
    return torch.cat(found)


@dataclass(frozen=True)
class Case:
    """One tiny configuration to test a family (or one of its layout variants) on.

    Attributes:
        id: test id.
        model_type: the config's ``model_type``.
        overrides: config settings on top of :func:`tiny_config`'s.
        family: the expected :attr:`Architecture.family`.
        layers: expected through-numbered layer count.
        heads: expected (heads, kv-heads, head_dim) of the first layer list.
        projections: expected :attr:`Architecture.projections`.
        fused: expected ``(groups, slots, unit, start, stop)`` per fused projection (first layer
            that has it).
        untargeted: regex of linear modules inside layers that are deliberately not sites.
    """

    id: str
    model_type: str
    family: str
    layers: int
    heads: tuple[int, int, int]
    projections: tuple[str, ...]
    overrides: dict[str, Any] = field(default_factory=dict)
    fused: dict[str, tuple[int, int, int, int, int]] = field(default_factory=dict)
    untargeted: str | None = None

    def config(self) -> Any:
        return tiny_config(self.model_type, **self.overrides)


QKVO = ("q", "k", "v", "o")
MLP2 = QKVO + ("up", "down")
GATED = QKVO + ("up", "gate", "down")
EXPERTS = ("expert_up", "expert_gate", "expert_down")
CROSS = ("cross_q", "cross_k", "cross_v", "cross_o")


def _qkv(groups: int, slots: int, unit: int, q: int, kv: int) -> dict[str, Any]:
    """q, k, v fused with ``q`` then ``kv`` then ``kv`` slots per group."""
    return {
        "q": (groups, slots, unit, 0, q),
        "k": (groups, slots, unit, q, q + kv),
        "v": (groups, slots, unit, q + kv, q + 2 * kv),
    }


def _pair(a: str, b: str, groups: int, slots: int, unit: int) -> dict[str, Any]:
    return {a: (groups, slots, unit, 0, 1), b: (groups, slots, unit, 1, 2)}


CASES: list[Case] = [
    Case("bert", "bert", "bert", 2, (4, 4, 8), MLP2),
    Case("deberta-v2", "deberta-v2", "deberta_v2", 2, (4, 4, 8), MLP2),
    Case("deberta", "deberta", "deberta", 2, (4, 4, 8), MLP2, fused=_qkv(4, 3, 8, 1, 1)),
    Case("distilbert", "distilbert", "distilbert", 2, (4, 4, 8), MLP2),
    Case(
        "modernbert",
        "modernbert",
        "modernbert",
        2,
        (4, 4, 8),
        GATED,
        fused=_qkv(1, 3, 32, 1, 1) | _pair("gate", "up", 1, 2, 64),
    ),
    Case("gpt2", "gpt2", "gpt2", 2, (4, 4, 8), MLP2, fused=_qkv(1, 3, 32, 1, 1)),
    Case(
        "gpt_bigcode",
        "gpt_bigcode",
        "gpt_bigcode",
        2,
        (4, 4, 8),
        MLP2,
        fused=_qkv(4, 3, 8, 1, 1),
    ),
    Case(
        "gpt_bigcode-mq",
        "gpt_bigcode",
        "gpt_bigcode",
        2,
        (4, 1, 8),
        MLP2,
        overrides=dict(multi_query=True),
        fused=_qkv(1, 6, 8, 4, 1),
    ),
    Case("gpt_neox", "gpt_neox", "gpt_neox", 2, (4, 4, 8), MLP2, fused=_qkv(4, 3, 8, 1, 1)),
    Case("persimmon", "persimmon", "persimmon", 2, (4, 4, 8), MLP2, fused=_qkv(4, 3, 8, 1, 1)),
    Case("bloom", "bloom", "bloom", 2, (4, 4, 8), MLP2, fused=_qkv(4, 3, 8, 1, 1)),
    Case(
        "falcon-per-head",
        "falcon",
        "falcon",
        2,
        (4, 4, 8),
        MLP2,
        overrides=dict(multi_query=False),
        fused=_qkv(4, 3, 8, 1, 1),
    ),
    Case(
        "falcon-multi-query",
        "falcon",
        "falcon",
        2,
        (4, 1, 8),
        MLP2,
        overrides=dict(multi_query=True),
        fused=_qkv(1, 6, 8, 4, 1),
    ),
    Case(
        "falcon-new-decoder",
        "falcon",
        "falcon",
        2,
        (4, 2, 8),
        MLP2,
        overrides=dict(new_decoder_architecture=True, num_kv_heads=2),
        fused=_qkv(2, 4, 8, 2, 1),
    ),
    Case(
        "codegen",
        "codegen",
        "codegen",
        2,
        (4, 4, 8),
        MLP2,
        fused={"q": (4, 3, 8, 0, 1), "v": (4, 3, 8, 1, 2), "k": (4, 3, 8, 2, 3)},
    ),
    Case("gptj", "gptj", "gptj", 2, (4, 4, 8), MLP2),
    Case("llama", "llama", "llama", 2, (4, 2, 8), GATED),
    Case("mistral", "mistral", "llama", 2, (4, 2, 8), GATED),
    Case("qwen2", "qwen2", "llama", 2, (4, 2, 8), GATED),
    Case("qwen3", "qwen3", "llama", 2, (4, 2, 8), GATED),
    Case("gemma2", "gemma2", "llama", 2, (4, 2, 8), GATED),
    Case("gemma3_text", "gemma3_text", "llama", 2, (4, 2, 8), GATED),
    Case("olmo", "olmo", "llama", 2, (4, 2, 8), GATED),
    Case("olmo2", "olmo2", "llama", 2, (4, 2, 8), GATED),
    Case("stablelm", "stablelm", "llama", 2, (4, 2, 8), GATED),
    Case("nemotron", "nemotron", "nemotron", 2, (4, 2, 8), MLP2),
    Case(
        "phi3",
        "phi3",
        "phi3",
        2,
        (4, 2, 8),
        GATED,
        fused=_qkv(1, 4, 16, 2, 1) | _pair("gate", "up", 1, 2, 64),
    ),
    Case("glm4", "glm4", "glm", 2, (4, 2, 8), GATED, fused=_pair("gate", "up", 1, 2, 64)),
    Case("phi", "phi", "phi", 2, (4, 2, 8), MLP2),
    Case("starcoder2", "starcoder2", "starcoder2", 2, (4, 2, 8), MLP2),
    Case("opt", "opt", "opt", 2, (4, 4, 8), MLP2),
    Case(
        "mixtral",
        "mixtral",
        "mixtral",
        2,
        (4, 2, 8),
        QKVO + EXPERTS,
        fused=_pair("expert_gate", "expert_up", 1, 2, 64),
    ),
    Case(
        "olmoe",
        "olmoe",
        "mixtral",
        2,
        (4, 2, 8),
        QKVO + EXPERTS,
        fused=_pair("expert_gate", "expert_up", 1, 2, 64),
    ),
    Case(
        "phimoe",
        "phimoe",
        "phimoe",
        2,
        (4, 2, 8),
        QKVO + EXPERTS,
        fused=_pair("expert_gate", "expert_up", 1, 2, 64),
        untargeted=r"mlp\.router$",  # the router (an nn.Linear) is not a target
    ),
    Case(
        "granitemoe",
        "granitemoe",
        "granitemoe",
        2,
        (4, 2, 8),
        QKVO + EXPERTS,
        fused=_pair("expert_gate", "expert_up", 1, 2, 64),
    ),
    Case(
        "qwen2_moe",
        "qwen2_moe",
        "qwen2_moe",
        2,
        (4, 2, 8),
        GATED + EXPERTS,
        overrides=dict(mlp_only_layers=[1]),
        fused=_pair("expert_gate", "expert_up", 1, 2, 16),
        untargeted=r"shared_expert_gate$",  # the shared expert's [d -> 1] sigmoid gate
    ),
    Case(
        "qwen3_moe",
        "qwen3_moe",
        "qwen3_moe",
        2,
        (4, 2, 8),
        GATED + EXPERTS,
        overrides=dict(mlp_only_layers=[0]),
        fused=_pair("expert_gate", "expert_up", 1, 2, 16),
    ),
    Case(
        "gpt_oss",
        "gpt_oss",
        "gpt_oss",
        2,
        (4, 2, 8),
        QKVO + EXPERTS,
        fused=_pair("expert_gate", "expert_up", 64, 2, 1),
    ),
    Case("bart", "bart", "bart", 4, (4, 4, 8), MLP2 + CROSS),
    Case("whisper", "whisper", "bart", 4, (4, 4, 8), MLP2 + CROSS),
    Case("t5", "t5", "t5", 4, (4, 4, 8), MLP2 + CROSS),
    Case(
        "t5-gated",
        "t5",
        "t5",
        4,
        (4, 4, 8),
        GATED + CROSS,
        overrides=dict(feed_forward_proj="gated-gelu"),
    ),
    Case("vit", "vit", "vit", 2, (4, 4, 8), MLP2),
    Case("clip", "clip", "clip", 4, (4, 4, 8), MLP2),
    Case("siglip", "siglip", "clip", 4, (4, 4, 8), MLP2),
    Case("clip_text_model", "clip_text_model", "clip_text", 2, (4, 4, 8), MLP2),
    Case("siglip_vision_model", "siglip_vision_model", "clip_vision", 2, (4, 4, 8), MLP2),
    Case(
        "llava",
        "llava",
        "llava",
        2,
        (4, 2, 8),
        GATED,
        untargeted=r"vision_tower|multi_modal_projector",  # the vision side is not a target
    ),
    Case(
        "gemma3",
        "gemma3",
        "llava",
        2,
        (4, 2, 8),
        GATED,
        untargeted=r"vision_tower|multi_modal_projector",
    ),
]
