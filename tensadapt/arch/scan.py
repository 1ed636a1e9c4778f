"""Fallback for families not in the table: find projections by PEFT-style module name patterns.

Every ``nn.Linear`` (and ``transformers`` ``Conv1D``) whose dotted path holds a layer index is
matched by its last name (``q_proj``, ``query``, ``q_lin``, ``fc1``, ...) and, for ambiguous
names (``q``, ``dense``, ``c_proj``, ``out_proj``, ...), by whether it sits under an attention
or an MLP block of that layer.

Fused modules are recognised too. A fused q/k/v module is one whose leaf name is in
:data:`FUSED_QKV`, or any linear module under an attention block of a layer without separate
q, k, v whose output is ``(H + 2·KV)·head_dim`` wide (head counts from the config). Its rows are
split by the layout its name stands for in every ``transformers`` family that uses the name
(audited against the installed modeling code): ``query_key_value`` is interleaved per key/value
group (GPT-NeoX, BLOOM, Persimmon ``[H, (q, k, v), hd]``; Falcon ``[KV, (H/KV q, k, v), hd]``);
``qkv``, ``Wqkv``, ``W_pack`` hold column blocks ``q | k | v``. A module that looks fused but
whose name stands for no known layout (``c_attn`` is blocks in GPT-2 but per head in
GPT-BigCode) is refused with an error saying so, unless one key/value head makes both readings
the same. ``gate_up_proj`` holds ``[gate | up]``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, cast

import torch
from torch import nn

from ..errors import ArchitectureError
from .base import (
    ATTENTION_PROJECTIONS,
    HEAD_SIDES,
    PROJECTIONS,
    Architecture,
    Fused,
    TargetSite,
    pack,
)
from .family import first_attr

if TYPE_CHECKING:
    from transformers import PretrainedConfig

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
#: Config attributes tried for the key/value head count (absent: every head has its own).
KV_HEAD_ATTRIBUTES: tuple[str, ...] = ("num_key_value_heads", "num_kv_heads", "n_head_kv")

#: Fused q/k/v leaf names -> how q, k, v sit in the output: ``"kv_heads"`` (interleaved per
#: key/value group, per head without grouped-query attention) or ``"blocks"`` (q | k | v).
FUSED_QKV: dict[str, Literal["kv_heads", "blocks"]] = {
    "query_key_value": "kv_heads",
    "qkv": "blocks",
    "Wqkv": "blocks",
    "W_pack": "blocks",
}
#: Fused gate/up leaf names (``[gate | up]`` column blocks).
FUSED_GATE_UP: frozenset[str] = frozenset({"gate_up_proj"})

_QKV = "qkv"  # internal marker: a fused q/k/v module
_GATE_UP = "gate_up"  # internal marker: a fused gate/up module


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
    proj: str  # a projection, or _QKV / _GATE_UP for a fused module
    name: str
    in_features: int
    out_features: int
    layout: Literal["linear", "conv1d"]


def _conv1d_class() -> type[nn.Module] | None:
    """``transformers``' ``Conv1D`` (GPT-2's ``[in, out]`` linear), if transformers is installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # the scan also works on plain torch models
        return None
    return cast(type[nn.Module], Conv1D)


def weight_layout(module: nn.Module) -> Literal["linear", "conv1d"] | None:
    """``"linear"`` for ``nn.Linear``, ``"conv1d"`` for ``transformers``' ``Conv1D``, else ``None``."""
    if isinstance(module, nn.Linear):
        return "linear"
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
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


def _classify_fused(path_in_layer: str) -> str | None:
    leaf = path_in_layer.rpartition(".")[2]
    if leaf in FUSED_QKV:
        return _QKV
    if leaf in FUSED_GATE_UP:
        return _GATE_UP
    return None


def backbone_prefix(model: nn.Module) -> str:
    """``"bert."`` for ``BertForSequenceClassification`` and the like; ``""`` for a backbone."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if isinstance(prefix, str) and prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return prefix + "."
    return ""


def scan_model(
    model: nn.Module, config: PretrainedConfig | None = None, family: str = "generic"
) -> Architecture:
    """The :class:`Architecture` of ``model`` found from its module names alone.

    Layers are the numeric path components (the first one in each path). When several layer lists
    hold attention projections (encoder and decoder), the one with the most distinct (layer,
    projection) pairs is used, the first on a tie; within one layer, the first module matching a
    projection wins (self- before cross-attention). Head counts come from ``config`` when given;
    head width and kv-heads are then inferred from the q and k widths. Paths are recorded below
    the backbone (a task model's ``base_model_prefix`` is dropped). Fused modules are split as
    the module docstring says.

    Args:
        model: any ``nn.Module`` (the ``meta`` device is fine).
        config: the model's config, or ``None``.
        family: the name to record as :attr:`Architecture.family`.

    Raises:
        ArchitectureError: no attention projection was found (the message says what was), or a
            fused module's layout cannot be inferred or does not fit the config's head counts.
    """
    config = config if config is not None else getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", "") or type(model).__name__)
    prefix = backbone_prefix(model)

    found: list[_Found] = []
    unmatched: list[_Found] = []  # linear modules under an attention block, for fused detection
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
        inside = ".".join(parts[idx + 1 :])
        proj = classify(inside) or _classify_fused(inside)
        d_in, d_out = _features(module, layout)
        f = _Found(".".join(parts[:idx]), int(parts[idx]), proj or "", short, d_in, d_out, layout)
        if proj is not None:
            found.append(f)
        elif re.search(_ATTN, inside.rpartition(".")[0], re.IGNORECASE):
            unmatched.append(f)

    def has_attention(proj: str) -> bool:
        return proj in ATTENTION_PROJECTIONS or proj == _QKV

    attention = Counter(
        f.stack
        for f in {(f.stack, f.layer, f.proj): f for f in found}.values()
        if has_attention(f.proj)
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
    any_attn = q or k or next(f for f in chosen.values() if has_attention(f.proj))
    hidden = int(first_attr(config, ("hidden_size",)) or any_attn.in_features)
    head_dim = int(first_attr(config, ("head_dim",)) or 0)
    if not head_dim and n_heads:
        head_dim = q.out_features // n_heads if q is not None else hidden // n_heads
    n_kv = int(first_attr(config, KV_HEAD_ATTRIBUTES) or 0)
    if not n_kv:
        n_kv = k.out_features // head_dim if k is not None and head_dim else n_heads

    heads = _Heads(n_heads, n_kv, head_dim, hidden, model_type)
    layers_with_qkv = {layer for (layer, p) in chosen if p in ("q", "k", "v")}
    for f in unmatched:  # a fused q/k/v under a name that says nothing about its layout
        if f.stack == stack and f.layer not in layers_with_qkv and heads.fits_qkv(f):
            chosen.setdefault((f.layer, _QKV), replace(f, proj=_QKV))
    sites: list[TargetSite] = []
    for f in sorted(chosen.values(), key=lambda f: (f.layer, f.name)):
        if f.proj == _QKV:
            if any((f.layer, p) in chosen for p in ("q", "k", "v")):
                continue  # separate q/k/v win over a second fused module in the same layer
            sites += heads.split_qkv(f)
        elif f.proj == _GATE_UP:
            if not any((f.layer, p) in chosen for p in ("gate", "up")):
                sites += _split_gate_up(f)
        else:
            side = HEAD_SIDES.get(f.proj)
            n = n_heads if f.proj in ("q", "o") else n_kv if side else 0
            sites.append(_site(f, f.proj, f.out_features, None, n))
    sites.sort(key=lambda s: (s.layer, PROJECTIONS.index(s.proj)))
    gate_up = first(_GATE_UP)
    inter = (
        up.out_features
        if up is not None
        else gate_up.out_features // 2
        if gate_up is not None
        else first_attr(config, ("intermediate_size",))
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
        sites=tuple(sites),
    )


def _site(f: _Found, proj: str, out: int, fused: Fused | None, n_heads: int) -> TargetSite:
    return TargetSite(
        layer=f.layer,
        proj=proj,
        module=f.name,
        in_features=f.in_features,
        out_features=out,
        fused=fused,
        layout=f.layout,
        head_side=HEAD_SIDES.get(proj),
        n_heads=n_heads,
    )


def _split_gate_up(f: _Found) -> list[TargetSite]:
    if f.out_features % 2:
        raise ArchitectureError(
            f"{f.name}: a fused gate/up projection of odd width {f.out_features} cannot be split"
        )
    half = f.out_features // 2
    gate, up = pack([half, half])
    return [_site(f, "gate", half, gate, 0), _site(f, "up", half, up, 0)]


@dataclass(frozen=True)
class _Heads:
    """The head counts of a scanned model, and how they split a fused q/k/v module."""

    n_heads: int
    n_kv: int
    head_dim: int
    hidden: int
    model_type: str

    def width(self) -> int:
        return (self.n_heads + 2 * self.n_kv) * self.head_dim

    def fits_qkv(self, f: _Found) -> bool:
        return (
            bool(self.n_heads) and f.in_features == self.hidden and f.out_features == self.width()
        )

    def split_qkv(self, f: _Found) -> list[TargetSite]:
        """q, k, v sites of the fused module ``f``."""
        leaf = f.name.rpartition(".")[2]
        if not self.n_heads or not self.head_dim:
            raise ArchitectureError(
                f"{f.name} looks like a fused q/k/v projection of {self.model_type!r}, but its "
                f"config gives no head count ({', '.join(HEAD_ATTRIBUTES)}), so it cannot be "
                "split; add a tensadapt.arch.Family entry for this family"
            )
        if f.out_features != self.width():
            if f.out_features == 3 * self.hidden and self.n_kv != self.n_heads:
                full = replace(self, n_kv=self.n_heads, head_dim=self.hidden // self.n_heads)
                return full.split_qkv(f)  # a config without kv-heads: every head has k, v
            raise ArchitectureError(
                f"{f.name} looks like a fused q/k/v projection, but its width {f.out_features} "
                f"is neither 3 x {self.hidden} nor (heads {self.n_heads} + 2 x kv-heads "
                f"{self.n_kv}) x head_dim {self.head_dim} = {self.width()}"
            )
        kind = FUSED_QKV.get(leaf)
        if kind is None and self.n_kv == 1:
            kind = "blocks"  # one kv group: per-group interleaving *is* q | k | v
        if kind is None:
            raise ArchitectureError(
                f"{f.name} looks like a fused q/k/v projection (width {f.out_features} = "
                f"({self.n_heads} + 2 x {self.n_kv}) x {self.head_dim}), but how q, k and v "
                f"are laid out in it (column blocks q | k | v, or interleaved per head "
                f"[heads, (q, k, v), head_dim]) cannot be inferred from the name {leaf!r} or "
                f"the config; known names: {', '.join(FUSED_QKV)}. Add a tensadapt.arch.Family "
                "entry whose Layout says interleave=... for this module"
            )
        groups = self.n_kv if kind == "kv_heads" else 1
        q_w, kv_w = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        try:
            fq, fk, fv = pack([q_w, kv_w, kv_w], groups)
        except ValueError as exc:
            raise ArchitectureError(f"{f.name}: {exc}") from None
        return [
            _site(f, "q", q_w, fq, self.n_heads),
            _site(f, "k", kv_w, fk, self.n_kv),
            _site(f, "v", kv_w, fv, self.n_kv),
        ]
