"""The table of known model families: config attribute names and module path templates.

Adding a family is one :class:`Family` entry in :data:`BUILTIN_FAMILIES` (or one passed to
:func:`tensadapt.arch.from_config` by a plugin); nothing else branches on the family name. Every
entry was read off the installed ``transformers`` (5.x) modeling code and is checked against a
model built from a tiny config (``tests/test_families.py``): paths, widths, and for fused modules
that the rows :class:`.base.Fused` selects are the model's own q, k, v.

Layer numbering of several layer lists (encoder-decoder, text and vision towers): the first
list's layers come first, the next list's continue the count (BART with 6 + 6 layers: encoder
0..5, decoder 6..11); ``cross_*`` sites exist only in decoder layers.
"""

from __future__ import annotations

from collections.abc import Iterable

from .family import Experts, Family, Layout, Stack, Variant, first_attr
from .family import _has_attribute as _has_attribute

__all__ = [
    "BUILTIN_FAMILIES",
    "Experts",
    "Family",
    "Layout",
    "Stack",
    "Variant",
    "family_for",
    "first_attr",
    "known_model_types",
]


def _qkvo(attn: str, q: str, k: str, v: str, o: str) -> dict[str, str]:
    return {"q": f"{attn}.{q}", "k": f"{attn}.{k}", "v": f"{attn}.{v}", "o": f"{attn}.{o}"}


def _decoder(prefix: str = "layers", gate: bool = True, mlp: bool = True) -> dict[str, str]:
    """LLaMA-style layer: ``{prefix}.{l}.self_attn.q_proj`` ... ``mlp.down_proj``."""
    paths = _qkvo(f"{prefix}.{{l}}.self_attn", "q_proj", "k_proj", "v_proj", "o_proj")
    if mlp:
        paths |= {"up": f"{prefix}.{{l}}.mlp.up_proj", "down": f"{prefix}.{{l}}.mlp.down_proj"}
        if gate:
            paths["gate"] = f"{prefix}.{{l}}.mlp.gate_proj"
    return paths


def _bert_layer(attn: str, q: str, k: str, v: str) -> dict[str, str]:
    """BERT-style layer: ``{attn}{q}``, ..., ``attention.output.dense``, ``intermediate.dense``."""
    layer = "encoder.layer.{l}"
    return {
        "q": attn + q,
        "k": attn + k,
        "v": attn + v,
        "o": f"{layer}.attention.output.dense",
        "up": f"{layer}.intermediate.dense",
        "down": f"{layer}.output.dense",
    }


def _fused_qkv(module: str) -> dict[str, str]:
    """q, k, v in one module (listed in slot order)."""
    return {"q": module, "k": module, "v": module}


def _clip_layer(prefix: str | None) -> dict[str, str]:
    """CLIP / SigLIP encoder layer ``{prefix}.encoder.layers.{l}`` (no prefix: one tower)."""
    layer = f"{prefix}.encoder.layers.{{l}}" if prefix else "encoder.layers.{l}"
    return _qkvo(f"{layer}.self_attn", "q_proj", "k_proj", "v_proj", "out_proj") | {
        "up": f"{layer}.mlp.fc1",
        "down": f"{layer}.mlp.fc2",
    }


def _bart(stack: str) -> dict[str, str]:
    layer = f"{stack}.layers.{{l}}"
    paths = _qkvo(f"{layer}.self_attn", "q_proj", "k_proj", "v_proj", "out_proj")
    if stack == "decoder":
        cross = _qkvo(f"{layer}.encoder_attn", "q_proj", "k_proj", "v_proj", "out_proj")
        paths |= {f"cross_{p}": t for p, t in cross.items()}
    return paths | {"up": f"{layer}.fc1", "down": f"{layer}.fc2"}


def _t5(stack: str, gated: bool) -> dict[str, str]:
    block = f"{stack}.block.{{l}}.layer"
    paths = _qkvo(f"{block}.0.SelfAttention", "q", "k", "v", "o")
    ff = 1
    if stack == "decoder":
        cross = _qkvo(f"{block}.1.EncDecAttention", "q", "k", "v", "o")
        paths |= {f"cross_{p}": t for p, t in cross.items()}
        ff = 2
    mlp = f"{block}.{ff}.DenseReluDense"
    if gated:
        return paths | {"gate": f"{mlp}.wi_0", "up": f"{mlp}.wi_1", "down": f"{mlp}.wo"}
    return paths | {"up": f"{mlp}.wi", "down": f"{mlp}.wo"}


def _t5_layout(gated: bool) -> Layout:
    decoder_layers = {"n_layers": ("num_decoder_layers",)}
    return Layout(
        stacks=(
            Stack("encoder", _t5("encoder", gated)),
            Stack("decoder", _t5("decoder", gated), sizes=decoder_layers),
        )
    )


_BART_SIZES = {
    "encoder": {
        "n_layers": ("encoder_layers",),
        "n_heads": ("encoder_attention_heads",),
        "intermediate_size": ("encoder_ffn_dim",),
    },
    "decoder": {
        "n_layers": ("decoder_layers",),
        "n_heads": ("decoder_attention_heads",),
        "intermediate_size": ("decoder_ffn_dim",),
    },
}


def _towers() -> Layout:
    """A dual encoder: the text tower's layers, then the vision tower's."""
    return Layout(
        stacks=(
            Stack("text", _clip_layer("text_model"), config="text_config"),
            Stack("vision", _clip_layer("vision_model"), config="vision_config"),
        )
    )


#: The built-in families, one entry each.
BUILTIN_FAMILIES: tuple[Family, ...] = (
    # --- encoders ------------------------------------------------------------------------------
    Family(
        "bert",
        ("bert", "roberta", "xlm-roberta", "electra", "camembert"),
        (Layout(_bert_layer("encoder.layer.{l}.attention.self.", "query", "key", "value")),),
    ),
    Family(
        "deberta_v2",
        ("deberta-v2",),
        (
            Layout(
                _bert_layer(
                    "encoder.layer.{l}.attention.self.", "query_proj", "key_proj", "value_proj"
                )
            ),
        ),
    ),
    Family(
        "deberta",
        ("deberta",),
        (
            Layout(
                _bert_layer("encoder.layer.{l}.attention.self.", "in_proj", "in_proj", "in_proj"),
                interleave={"encoder.layer.{l}.attention.self.in_proj": "heads"},
            ),
        ),
        n_kv_heads=(),
    ),
    Family(
        "distilbert",
        ("distilbert",),
        (
            Layout(
                _qkvo("transformer.layer.{l}.attention", "q_lin", "k_lin", "v_lin", "out_lin")
                | {"up": "transformer.layer.{l}.ffn.lin1", "down": "transformer.layer.{l}.ffn.lin2"}
            ),
        ),
        intermediate_size=("hidden_dim",),
    ),
    Family(
        "modernbert",
        ("modernbert",),
        (
            Layout(
                _fused_qkv("layers.{l}.attn.Wqkv")
                # Wi's first half is activated (``act(input) * gate`` in ModernBERT's names):
                # in LLaMA's names that half is the gate and the second the up projection.
                | {
                    "o": "layers.{l}.attn.Wo",
                    "gate": "layers.{l}.mlp.Wi",
                    "up": "layers.{l}.mlp.Wi",
                    "down": "layers.{l}.mlp.Wo",
                }
            ),
        ),
        n_kv_heads=(),
        notes="Wi's activated half is the gate",
    ),
    # --- decoders with fused attention ---------------------------------------------------------
    Family(
        "gpt2",
        ("gpt2",),
        (
            Layout(
                _fused_qkv("h.{l}.attn.c_attn")
                | {"o": "h.{l}.attn.c_proj", "up": "h.{l}.mlp.c_fc", "down": "h.{l}.mlp.c_proj"}
            ),
        ),
        weight_layout="conv1d",
        intermediate_size=("n_inner",),
        intermediate_multiple=4,
        notes="Conv1D weights [in, out]",
    ),
    Family(
        "gpt_bigcode",
        ("gpt_bigcode",),
        (
            Layout(
                _fused_qkv("h.{l}.attn.c_attn")
                | {"o": "h.{l}.attn.c_proj", "up": "h.{l}.mlp.c_fc", "down": "h.{l}.mlp.c_proj"},
                interleave={"h.{l}.attn.c_attn": "kv_heads"},
            ),
        ),
        n_kv_heads=(),
        intermediate_size=("n_inner",),
        intermediate_multiple=4,
        variants=(Variant({"multi_query": True}, {"kv_heads": 1}),),
        notes="multi_query: one kv-head",
    ),
    Family(
        "gpt_neox",
        ("gpt_neox",),
        (
            Layout(
                _fused_qkv("layers.{l}.attention.query_key_value")
                | {
                    "o": "layers.{l}.attention.dense",
                    "up": "layers.{l}.mlp.dense_h_to_4h",
                    "down": "layers.{l}.mlp.dense_4h_to_h",
                },
                interleave={"layers.{l}.attention.query_key_value": "heads"},
            ),
        ),
        n_kv_heads=(),
    ),
    Family(
        "persimmon",
        ("persimmon",),
        (
            Layout(
                _fused_qkv("layers.{l}.self_attn.query_key_value")
                | {
                    "o": "layers.{l}.self_attn.dense",
                    "up": "layers.{l}.mlp.dense_h_to_4h",
                    "down": "layers.{l}.mlp.dense_4h_to_h",
                },
                interleave={"layers.{l}.self_attn.query_key_value": "heads"},
            ),
        ),
        n_kv_heads=(),
    ),
    Family(
        "bloom",
        ("bloom",),
        (
            Layout(
                _fused_qkv("h.{l}.self_attention.query_key_value")
                | {
                    "o": "h.{l}.self_attention.dense",
                    "up": "h.{l}.mlp.dense_h_to_4h",
                    "down": "h.{l}.mlp.dense_4h_to_h",
                },
                interleave={"h.{l}.self_attention.query_key_value": "heads"},
            ),
        ),
        n_kv_heads=(),
        intermediate_size=(),
        intermediate_multiple=4,
    ),
    Family(
        "falcon",
        ("falcon",),
        (
            Layout(
                _fused_qkv("h.{l}.self_attention.query_key_value")
                | {
                    "o": "h.{l}.self_attention.dense",
                    "up": "h.{l}.mlp.dense_h_to_4h",
                    "down": "h.{l}.mlp.dense_4h_to_h",
                },
                interleave={"h.{l}.self_attention.query_key_value": "kv_heads"},
            ),
        ),
        n_kv_heads=(),
        head_dim=(),  # FalconAttention uses hidden_size // num_attention_heads
        intermediate_size=("ffn_hidden_size",),
        intermediate_multiple=4,
        variants=(
            Variant({"new_decoder_architecture": True}, {"n_kv_heads": ("num_kv_heads",)}),
            Variant({"multi_query": True}, {"kv_heads": 1}),
        ),
        notes="kv-heads: num_kv_heads (new_decoder_architecture), 1 (multi_query), else all",
    ),
    Family(
        "codegen",
        ("codegen",),
        (
            Layout(
                # slot order q, v, k in each of the 4 model-parallel shards CodeGen was trained in
                {
                    "q": "h.{l}.attn.qkv_proj",
                    "v": "h.{l}.attn.qkv_proj",
                    "k": "h.{l}.attn.qkv_proj",
                    "o": "h.{l}.attn.out_proj",
                    "up": "h.{l}.mlp.fc_in",
                    "down": "h.{l}.mlp.fc_out",
                },
                interleave={"h.{l}.attn.qkv_proj": 4},
            ),
        ),
        n_kv_heads=(),
        head_dim=(),
        intermediate_size=("n_inner",),
        intermediate_multiple=4,
        notes="the 4 model-parallel shards CodeGen was trained in",
    ),
    # --- decoders with separate projections ----------------------------------------------------
    Family(
        "gptj",
        ("gptj",),
        (
            Layout(
                _qkvo("h.{l}.attn", "q_proj", "k_proj", "v_proj", "out_proj")
                | {"up": "h.{l}.mlp.fc_in", "down": "h.{l}.mlp.fc_out"}
            ),
        ),
        intermediate_size=("n_inner",),
        intermediate_multiple=4,
    ),
    Family(
        "llama",
        (
            "llama",
            "mistral",
            "ministral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "vaultgemma",
            "olmo",
            "olmo2",
            "olmo3",
            "stablelm",
            "cohere",
            "cohere2",
            "granite",
            "helium",
            "smollm3",
            "exaone4",
            "seed_oss",
            "internlm3",
            "hunyuan_v1_dense",
            "ernie4_5",
            "bitnet",
        ),
        (Layout(_decoder()),),
    ),
    Family(
        "nemotron",
        ("nemotron", "arcee", "apertus", "jais2"),
        (Layout(_decoder(gate=False)),),
        notes="LLaMA layout, ungated MLP (up, down)",
    ),
    Family(
        "phi3",
        ("phi3",),
        (
            Layout(
                _fused_qkv("layers.{l}.self_attn.qkv_proj")
                | {
                    "o": "layers.{l}.self_attn.o_proj",
                    "gate": "layers.{l}.mlp.gate_up_proj",
                    "up": "layers.{l}.mlp.gate_up_proj",
                    "down": "layers.{l}.mlp.down_proj",
                }
            ),
        ),
    ),
    Family(
        "glm",
        ("glm", "glm4"),
        (
            Layout(
                _decoder(mlp=False)
                | {
                    "gate": "layers.{l}.mlp.gate_up_proj",
                    "up": "layers.{l}.mlp.gate_up_proj",
                    "down": "layers.{l}.mlp.down_proj",
                }
            ),
        ),
    ),
    Family(
        "phi",
        ("phi",),
        (
            Layout(
                _qkvo("layers.{l}.self_attn", "q_proj", "k_proj", "v_proj", "dense")
                | {"up": "layers.{l}.mlp.fc1", "down": "layers.{l}.mlp.fc2"}
            ),
        ),
    ),
    Family(
        "starcoder2",
        ("starcoder2",),
        (
            Layout(
                _decoder(mlp=False) | {"up": "layers.{l}.mlp.c_fc", "down": "layers.{l}.mlp.c_proj"}
            ),
        ),
    ),
    Family(
        "opt",
        ("opt",),
        (
            Layout(
                _qkvo("decoder.layers.{l}.self_attn", "q_proj", "k_proj", "v_proj", "out_proj")
                | {"up": "decoder.layers.{l}.fc1", "down": "decoder.layers.{l}.fc2"}
            ),
        ),
        intermediate_size=("ffn_dim",),
    ),
    # --- mixture of experts --------------------------------------------------------------------
    Family(
        "mixtral",
        ("mixtral", "olmoe", "flex_olmo"),
        (Layout(_decoder(mlp=False)),),
        experts=Experts("layers.{l}.mlp.experts", "layers.{l}.mlp.gate"),
    ),
    Family(
        "phimoe",
        ("phimoe",),
        (Layout(_decoder(mlp=False)),),
        experts=Experts("layers.{l}.mlp.experts", "layers.{l}.mlp.router"),
        notes="the router (an nn.Linear) is not a target",
    ),
    Family(
        "granitemoe",
        ("granitemoe",),
        (Layout(_decoder(mlp=False)),),
        experts=Experts(
            "layers.{l}.block_sparse_moe.experts", "layers.{l}.block_sparse_moe.router"
        ),
    ),
    Family(
        "qwen2_moe",
        ("qwen2_moe",),
        (Layout(_decoder()),),
        experts=Experts(
            "layers.{l}.mlp.experts",
            "layers.{l}.mlp.gate",
            width=("moe_intermediate_size",),
            shared={
                "gate": "layers.{l}.mlp.shared_expert.gate_proj",
                "up": "layers.{l}.mlp.shared_expert.up_proj",
                "down": "layers.{l}.mlp.shared_expert.down_proj",
            },
            shared_width=("shared_expert_intermediate_size",),
            sparse_step=("decoder_sparse_step",),
            dense_layers=("mlp_only_layers",),
        ),
        notes="up/gate/down: the shared expert in sparse layers, the MLP in mlp_only_layers",
    ),
    Family(
        "qwen3_moe",
        ("qwen3_moe",),
        (Layout(_decoder()),),
        experts=Experts(
            "layers.{l}.mlp.experts",
            "layers.{l}.mlp.gate",
            width=("moe_intermediate_size",),
            sparse_step=("decoder_sparse_step",),
            dense_layers=("mlp_only_layers",),
        ),
        notes="up/gate/down only in mlp_only_layers",
    ),
    Family(
        "gpt_oss",
        ("gpt_oss",),
        (Layout(_decoder(mlp=False)),),
        experts=Experts(
            "layers.{l}.mlp.experts",
            "layers.{l}.mlp.router",
            interleaved=True,
            layout="conv1d",
            bias=True,
        ),
        notes="clamped SwiGLU in experts._apply_gate",
    ),
    # --- encoder-decoder -----------------------------------------------------------------------
    Family(
        "bart",
        (
            "bart",
            "mbart",
            "plbart",
            "pegasus",
            "marian",
            "blenderbot",
            "blenderbot-small",
            "m2m_100",
            "whisper",
        ),
        (
            Layout(
                stacks=tuple(
                    Stack(name, _bart(name), sizes=_BART_SIZES[name])
                    for name in ("encoder", "decoder")
                )
            ),
        ),
        hidden_size=("d_model",),
        n_kv_heads=(),
        head_dim=(),
        notes="cross_*: the decoder's encoder_attn",
    ),
    Family(
        "t5",
        ("t5", "mt5", "umt5"),
        (_t5_layout(gated=False),),
        n_layers=("num_layers",),
        hidden_size=("d_model",),
        n_heads=("num_heads",),
        n_kv_heads=(),
        head_dim=("d_kv",),
        intermediate_size=("d_ff",),
        variants=(Variant({"is_gated_act": True}, {"layouts": (_t5_layout(gated=True),)}),),
        notes="cross_*: EncDecAttention; gated FFN: wi_0 gate, wi_1 up",
    ),
    # --- vision and dual encoders --------------------------------------------------------------
    Family(
        "vit",
        ("vit",),
        (
            # transformers 5.x rewrote ViT in the "modular" style (ViTAttention + ViTMLP).
            Layout(
                _qkvo("layers.{l}.attention", "q_proj", "k_proj", "v_proj", "o_proj")
                | {"up": "layers.{l}.mlp.fc1", "down": "layers.{l}.mlp.fc2"},
                marker=("transformers.models.vit.modeling_vit", "ViTMLP"),
            ),
            # transformers 4.x: ViTSelfAttention / ViTSelfOutput / ViTIntermediate / ViTOutput.
            Layout(_bert_layer("encoder.layer.{l}.attention.attention.", "query", "key", "value")),
        ),
    ),
    Family(
        "clip",
        ("clip", "siglip", "siglip2"),
        (_towers(),),
        n_kv_heads=(),
        notes="pooling heads are not targets",
    ),
    Family(
        "clip_text",
        ("clip_text_model", "siglip_text_model", "siglip2_text_model"),
        # transformers 5 flattens the tower (``encoder.layers``); 4.x nests it under
        # ``text_model.``, which the suffix lookup resolves as well.
        (Layout(_clip_layer(None)),),
        n_kv_heads=(),
    ),
    Family(
        "clip_vision",
        ("clip_vision_model", "siglip_vision_model", "siglip2_vision_model"),
        (Layout(_clip_layer(None)),),
        n_kv_heads=(),
    ),
    # --- vision-language models: the language model -----------------------------------------------
    Family(
        "llava",
        ("llava", "llava_next", "mistral3", "gemma3", "paligemma"),
        (
            Layout(
                stacks=(Stack("language", _decoder("language_model.layers"), config="text_config"),)
            ),
        ),
        notes="the language model (LLaMA layout); the vision tower is not a target",
    ),
)


def family_for(model_type: str, families: Iterable[Family] | None = None) -> Family | None:
    """The family covering ``model_type``, or ``None`` if no family in ``families`` does.

    Args:
        model_type: a config's ``model_type``.
        families: families to search; default: every registered family, looked up in the plugin
            registry (built-ins first; plugins are loaded only if no built-in covers it).
    """
    if families is None:
        from ..plugins import family_for as registered_family_for

        return registered_family_for(model_type)
    for family in families:
        if model_type in family.model_types:
            return family
    return None


def known_model_types(families: Iterable[Family] | None = None) -> list[str]:
    """Every ``model_type`` a family in ``families`` (default: every registered one) covers."""
    if families is None:
        from ..plugins import families as registered_families

        families = registered_families()
    return [mt for family in families for mt in family.model_types]
