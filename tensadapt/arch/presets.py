"""Named configs of well-known models (facts from their public ``config.json``), and tiny ones.

A preset is config facts only: ``preset_config("llama3-70b")`` builds a ``PretrainedConfig``
offline in microseconds, from which :func:`tensadapt.arch.from_config` plans without weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ArchitectureError

_BERT_BASE = dict(
    model_type="bert",
    num_hidden_layers=12,
    hidden_size=768,
    num_attention_heads=12,
    intermediate_size=3072,
    vocab_size=30522,
    max_position_embeddings=512,
)
_ROBERTA = dict(
    model_type="roberta",
    vocab_size=50265,
    max_position_embeddings=514,
    type_vocab_size=1,
    layer_norm_eps=1e-5,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
)
_LLAMA2 = dict(
    model_type="llama", vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5
)
_LLAMA3 = dict(
    model_type="llama",
    vocab_size=128256,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    bos_token_id=128000,
    eos_token_id=128001,
)
_TINY_TEXT = dict(vocab_size=1000, max_position_embeddings=128)

#: name -> ``model_type`` plus the config attributes that differ from that type's defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # --- encoders -------------------------------------------------------------------------
    "bert-base": _BERT_BASE,
    "bert-large": {
        **_BERT_BASE,
        "num_hidden_layers": 24,
        "hidden_size": 1024,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
    },
    "roberta-base": {
        **_ROBERTA,
        "num_hidden_layers": 12,
        "hidden_size": 768,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
    "roberta-large": {
        **_ROBERTA,
        "num_hidden_layers": 24,
        "hidden_size": 1024,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
    },
    "distilbert-base": dict(
        model_type="distilbert", n_layers=6, dim=768, n_heads=12, hidden_dim=3072, vocab_size=30522
    ),
    "minilm": {
        **_BERT_BASE,
        "num_hidden_layers": 6,
        "hidden_size": 384,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
    },
    # --- decoders -------------------------------------------------------------------------
    "gpt2": dict(
        model_type="gpt2", n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024
    ),
    "gpt2-medium": dict(
        model_type="gpt2", n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, n_positions=1024
    ),
    "opt-125m": dict(
        model_type="opt",
        num_hidden_layers=12,
        hidden_size=768,
        num_attention_heads=12,
        ffn_dim=3072,
        word_embed_proj_dim=768,
        vocab_size=50272,
        max_position_embeddings=2048,
    ),
    "llama2-7b": {
        **_LLAMA2,
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "intermediate_size": 11008,
    },
    "llama2-70b": {
        **_LLAMA2,
        "num_hidden_layers": 80,
        "hidden_size": 8192,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "intermediate_size": 28672,
    },
    "llama3-8b": {
        **_LLAMA3,
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
    },
    "llama3-70b": {
        **_LLAMA3,
        "num_hidden_layers": 80,
        "hidden_size": 8192,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "intermediate_size": 28672,
    },
    "mistral-7b": dict(
        model_type="mistral",
        num_hidden_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=32000,
        max_position_embeddings=32768,
        sliding_window=4096,
        rms_norm_eps=1e-5,
    ),
    "qwen2-0.5b": dict(
        model_type="qwen2",
        num_hidden_layers=24,
        hidden_size=896,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    "gemma-2b": dict(
        model_type="gemma",
        num_hidden_layers=18,
        hidden_size=2048,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
        intermediate_size=16384,
        vocab_size=256000,
        max_position_embeddings=8192,
    ),
    # --- vision ---------------------------------------------------------------------------
    "vit-base": dict(
        model_type="vit",
        num_hidden_layers=12,
        hidden_size=768,
        num_attention_heads=12,
        intermediate_size=3072,
        image_size=224,
        patch_size=16,
        qkv_bias=True,
    ),
    # --- tiny, for tests and demos (random weights only) --------------------------------------
    "tiny-bert": dict(
        model_type="bert",
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        **_TINY_TEXT,
    ),
    "tiny-gpt2": dict(
        model_type="gpt2",
        n_layer=2,
        n_embd=32,
        n_head=4,
        vocab_size=1000,
        n_positions=128,
        bos_token_id=999,
        eos_token_id=999,
        pad_token_id=999,
    ),
    "tiny-llama": dict(
        model_type="llama",
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        pad_token_id=0,
        **_TINY_TEXT,
    ),
    "tiny-vit": dict(
        model_type="vit",
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    ),
}


def _unknown(name: str) -> ArchitectureError:
    return ArchitectureError(
        f"unknown preset {name!r} (and no such local config path); presets: {', '.join(PRESETS)}"
    )


def preset_config(name: str) -> Any:
    """A fresh ``PretrainedConfig`` for the preset ``name`` (offline, no weights).

    Raises:
        ArchitectureError: ``name`` is not a preset; the message lists the presets.
    """
    try:
        facts = dict(PRESETS[name])
    except KeyError:
        raise _unknown(name) from None
    from transformers import AutoConfig

    return AutoConfig.for_model(facts.pop("model_type"), **facts)


def load_config(name_or_path: str | os.PathLike[str]) -> Any:
    """A preset name, or a local model directory or ``config.json`` path, as a ``PretrainedConfig``.

    Never downloads: local paths load with ``local_files_only=True``.

    Raises:
        ArchitectureError: neither a preset nor a readable local config; lists the presets.
    """
    if isinstance(name_or_path, str) and name_or_path in PRESETS:
        return preset_config(name_or_path)
    path = Path(name_or_path)
    if not path.exists():
        raise _unknown(str(name_or_path))
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise ArchitectureError(
            f"cannot read a transformers config from {str(path)!r}: {exc}"
        ) from exc
