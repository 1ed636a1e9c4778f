"""Fallback for families not in the table: find projections by PEFT-style module name patterns.

Every ``nn.Linear`` (and ``transformers`` ``Conv1D``) whose dotted path holds a layer index is
matched by its last name (``q_proj``, ``query``, ``q_lin``, ``fc1``, ...) and, for ambiguous
names (``q``, ``dense``, ``c_proj``, ``out_proj``, ...), by whether it sits under an attention
or an MLP block of that layer. Fused projections (BLOOM's ``query_key_value``) are not split;
such families need a table entry.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import nn

from ..errors import ArchitectureError
from .base import ATTENTION_PROJECTIONS, PROJECTIONS, Architecture, TargetSite
from .families import first_attr

_ATTN = r"attn|attention"
_MLP = r"mlp|ffn|feed_?forward|output|dense_?relu_?dense"

#: Config attributes tried for the head count of an unknown family.
HEAD_ATTRIBUTES: tuple[str, ...] = (
    "num_attention_heads",
    "n_head",
    "num_heads",
    "n_heads",
    "attention_heads",
    "encoder_attention_heads",
)


@dataclass(frozen=True)
class Rule:
    """Module leaf names that mean one projection.

    Attributes:
        proj: the projection (one of :data:`PROJECTIONS`).
        leaves: last path components that match.
        within: a regex (case-insensitive) the module's path inside its layer must contain
            (before the leaf), or ``None`` for names that are unambiguous on their own.
    """

    proj: str
    leaves: frozenset[str]
    within: str | None = None

    def matches(self, leaf: str, parent: str) -> bool:
        return leaf in self.leaves and (
            self.within is None or re.search(self.within, parent, re.IGNORECASE) is not None
        )


def _rule(proj: str, leaves: str, within: str | None = None) -> Rule:
    return Rule(proj, frozenset(leaves.split()), within)


#: Name rules, first match wins (so ``attention.output.dense`` is o before ``output.dense`` down).
RULES: tuple[Rule, ...] = (
    _rule("q", "q_proj query q_lin query_proj wq"),
    _rule("q", "q", _ATTN),
    _rule("k", "k_proj key k_lin key_proj wk"),
    _rule("k", "k", _ATTN),
    _rule("v", "v_proj value v_lin value_proj wv"),
    _rule("v", "v", _ATTN),
    _rule("o", "o_proj out_lin"),
    _rule("o", "o out_proj dense c_proj proj wo", _ATTN),
    _rule("gate", "gate_proj"),
    _rule("up", "up_proj fc1 lin1 c_fc fc_in wi dense_h_to_4h"),
    _rule("up", "dense", r"intermediate"),
    _rule("down", "down_proj fc2 lin2 fc_out dense_4h_to_h"),
    _rule("down", "c_proj wo dense proj", _MLP),
)


@dataclass(frozen=True)
class _Found:
    stack: str  # path of the layer list, e.g. "model.layers"
    layer: int
    proj: str
    name: str
    in_features: int
    out_features: int
    layout: Literal["linear", "conv1d"]


def weight_layout(module: nn.Module) -> Literal["linear", "conv1d"] | None:
    """``"linear"`` for ``nn.Linear``, ``"conv1d"`` for ``transformers``' ``Conv1D``, else ``None``."""
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return "conv1d"
    return None


def _features(module: nn.Module, layout: str) -> tuple[int, int]:
    """(in, out) of a linear-like module, from its weight shape (works on the meta device)."""
    rows, cols = cast(torch.Tensor, module.weight).shape
    return (int(rows), int(cols)) if layout == "conv1d" else (int(cols), int(rows))


def classify(path_in_layer: str) -> str | None:
    """The projection a module path inside one layer names (``attention.self.query`` -> ``q``)."""
    parent, _, leaf = path_in_layer.rpartition(".")
    for rule in RULES:
        if rule.matches(leaf, parent):
            return rule.proj
    return None


def backbone_prefix(model: nn.Module) -> str:
    """``"bert."`` for ``BertForSequenceClassification`` and the like; ``""`` for a backbone."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if isinstance(prefix, str) and prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return prefix + "."
    return ""


def scan_model(model: nn.Module, config: Any = None, family: str = "generic") -> Architecture:
    """The :class:`Architecture` of ``model`` found from its module names alone.

    Layers are the numeric path components (the first one in each path). When several layer lists
    hold attention projections (encoder and decoder), the one with the most distinct (layer,
    projection) pairs is used, the first on a tie; within one layer, the first module matching a
    projection wins (self- before cross-attention). Head counts come from ``config`` when given;
    head width and kv-heads are then inferred from the q and k widths. Paths are recorded below
    the backbone (a task model's ``base_model_prefix`` is dropped).

    Args:
        model: any ``nn.Module`` (the ``meta`` device is fine).
        config: the model's config, or ``None``.
        family: the name to record as :attr:`Architecture.family`.

    Raises:
        ArchitectureError: no attention projection was found; the message says what was.
    """
    config = config if config is not None else getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", "") or type(model).__name__)
    prefix = backbone_prefix(model)

    found: list[_Found] = []
    linear_names: list[str] = []
    for name, module in model.named_modules():
        layout = weight_layout(module)
        if layout is None:
            continue
        linear_names.append(name)
        short = name[len(prefix) :] if prefix and name.startswith(prefix) else name
        parts = short.split(".")
        idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if idx is None or idx == len(parts) - 1:
            continue
        proj = classify(".".join(parts[idx + 1 :]))
        if proj is None:
            continue
        d_in, d_out = _features(module, layout)
        stack = ".".join(parts[:idx])
        found.append(_Found(stack, int(parts[idx]), proj, short, d_in, d_out, layout))

    attention = Counter(
        f.stack
        for f in {(f.stack, f.layer, f.proj): f for f in found}.values()
        if f.proj in ATTENTION_PROJECTIONS
    )
    if not attention:
        examples = ", ".join(linear_names[:6]) or "none"
        matched = sorted({f.proj for f in found})
        raise ArchitectureError(
            f"cannot adapt model_type {model_type!r} ({type(model).__name__}): no attention "
            f"projection found among its {len(linear_names)} linear modules "
            f"(examples: {examples})"
            + (f"; only MLP projections {matched}" if matched else "")
            + ". Known families need no scan; add a tensadapt.arch.Family entry for this one."
        )
    stack = attention.most_common(1)[0][0]

    chosen: dict[tuple[int, str], _Found] = {}
    for f in found:
        if f.stack == stack:
            chosen.setdefault((f.layer, f.proj), f)

    def first(proj: str) -> _Found | None:
        return next((f for (_, p), f in sorted(chosen.items()) if p == proj), None)

    q, k, up = first("q"), first("k"), first("up")
    n_heads = int(first_attr(config, HEAD_ATTRIBUTES) or 0)
    head_dim = int(first_attr(config, ("head_dim",)) or 0)
    if not head_dim and n_heads and q is not None:
        head_dim = q.out_features // n_heads
    n_kv = int(first_attr(config, ("num_key_value_heads",)) or 0)
    if not n_kv:
        n_kv = k.out_features // head_dim if k is not None and head_dim else n_heads
    any_attn = q or k or next(f for f in chosen.values() if f.proj in ATTENTION_PROJECTIONS)
    hidden = int(first_attr(config, ("hidden_size",)) or any_attn.in_features)
    inter = up.out_features if up is not None else first_attr(config, ("intermediate_size",))

    heads_of = {"q": n_heads, "o": n_heads, "k": n_kv, "v": n_kv}
    side_of: dict[str, Literal["out", "in"]] = {"q": "out", "k": "out", "v": "out", "o": "in"}
    sites = tuple(
        TargetSite(
            layer=f.layer,
            proj=f.proj,
            module=f.name,
            in_features=f.in_features,
            out_features=f.out_features,
            layout=f.layout,
            head_side=side_of.get(f.proj),
            n_heads=heads_of.get(f.proj, 0),
        )
        for f in sorted(chosen.values(), key=lambda f: (f.layer, PROJECTIONS.index(f.proj)))
    )
    return Architecture(
        family=family,
        model_type=model_type,
        n_layers=max(f.layer for f in chosen.values()) + 1,
        hidden_size=hidden,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=None if inter is None else int(inter),
        sites=sites,
    )
