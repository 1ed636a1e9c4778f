"""The GPT-Neo family (``model_type: gpt_neo``) as a tensadapt architecture plugin."""

from __future__ import annotations

from tensadapt.arch import Family, Layout
from tensadapt.hookspecs import hookimpl

__version__ = "0.1.0"

#: GPT-Neo: separate q/k/v/out projections (no bias on q/k/v), GELU MLP ``c_fc`` / ``c_proj``;
#: ``intermediate_size=None`` means 4 x hidden_size.
GPT_NEO = Family(
    "gpt_neo",
    ("gpt_neo",),
    (
        Layout(
            {
                "q": "h.{l}.attn.attention.q_proj",
                "k": "h.{l}.attn.attention.k_proj",
                "v": "h.{l}.attn.attention.v_proj",
                "o": "h.{l}.attn.attention.out_proj",
                "up": "h.{l}.mlp.c_fc",
                "down": "h.{l}.mlp.c_proj",
            }
        ),
    ),
    n_layers=("num_layers", "num_hidden_layers"),
    hidden_size=("hidden_size",),
    n_heads=("num_heads", "num_attention_heads"),
    intermediate_size=("intermediate_size",),
    intermediate_multiple=4,
)


@hookimpl
def tensadapt_register_architectures() -> list[Family]:
    """The GPT-Neo family."""
    return [GPT_NEO]
