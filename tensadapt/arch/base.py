"""What an architecture adapter knows about a model family, as pure data.

An :class:`Architecture` is computed from a ``transformers`` config alone (no weights), so plans for
70B-sized models cost nothing. Each adaptable weight matrix is a :class:`TargetSite`; a
mixture-of-experts projection is one site whose weight is a stack of ``n_experts`` matrices
(:class:`ExpertWeights`).

Layers of models with several layer lists (encoder-decoder, text and vision towers) are numbered
through: the first list's layers ``0 .. n0-1``, the next list's ``n0 .. n0+n1-1``, and so on
(:attr:`Architecture.stacks` gives each list's span). A projection has a site only in the layers
that have it: ``cross_*`` only in decoder layers, ``expert_*`` only in sparse layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import reduce
from math import gcd
from typing import Any, Literal

#: Projection names, in stacking order. Attention: q, k, v, o. MLP: up, gate, down. Decoder
#: cross-attention (queries from the decoder, keys/values from the encoder): cross_q, cross_k,
#: cross_v, cross_o. Mixture-of-experts: expert_up, expert_gate, expert_down (stacked experts).
PROJECTIONS: tuple[str, ...] = (
    "q",
    "k",
    "v",
    "o",
    "up",
    "gate",
    "down",
    "cross_q",
    "cross_k",
    "cross_v",
    "cross_o",
    "expert_up",
    "expert_gate",
    "expert_down",
)
ATTENTION_PROJECTIONS: tuple[str, ...] = ("q", "k", "v", "o")
CROSS_PROJECTIONS: tuple[str, ...] = ("cross_q", "cross_k", "cross_v", "cross_o")
MLP_PROJECTIONS: tuple[str, ...] = ("up", "gate", "down")
EXPERT_PROJECTIONS: tuple[str, ...] = ("expert_up", "expert_gate", "expert_down")
#: which side of each head-structured projection carries the heads
HEAD_SIDES: dict[str, Literal["out", "in"]] = {
    "q": "out",
    "k": "out",
    "v": "out",
    "o": "in",
    "cross_q": "out",
    "cross_k": "out",
    "cross_v": "out",
    "cross_o": "in",
}


@dataclass(frozen=True)
class Fused:
    """Where one projection's output rows sit inside a fused module's output.

    The fused output dimension, read row-major as ``[groups, slots, unit]``, gives this projection
    the slots ``start:stop`` of every group; the projection's own output index
    ``(group, slot - start, i)``, flattened row-major, is the model's own order (head-major for
    q, k and v). One description covers every fused layout:

    - column blocks (GPT-2's ``c_attn`` = q | k | v, each d wide; Phi-3's ``gate_up_proj``):
      ``groups=1, slots=3, unit=d``, q ``0:1``, k ``1:2``, v ``2:3``;
    - per-head interleaving (BLOOM, GPT-NeoX: ``[H, (q, k, v), head_dim]``):
      ``groups=H, slots=3, unit=head_dim``;
    - grouped / multi-query per group (``[G, (H/G queries, k, v), head_dim]``):
      ``groups=G, slots=H/G + 2, unit=head_dim``, q ``0:H/G``, k ``H/G:H/G+1``, v the last slot;
    - unequal column blocks (multi-query q | k | v with one kv-head):
      ``groups=1, slots=H + 2, unit=head_dim``, q ``0:H``, k ``H:H+1``, v ``H+1:H+2``.

    Attributes:
        groups, slots, unit: the fused output dimension as ``[groups, slots, unit]``.
        start, stop: this projection's slots in every group.
    """

    groups: int
    slots: int
    unit: int
    start: int
    stop: int

    @property
    def width(self) -> int:
        """The fused module's whole output width."""
        return self.groups * self.slots * self.unit

    @property
    def out_features(self) -> int:
        """This projection's output width."""
        return self.groups * (self.stop - self.start) * self.unit

    @property
    def columns(self) -> tuple[int, int] | None:
        """The contiguous output columns ``(start, stop)`` of this projection when it has one
        block (``groups == 1``), else ``None``."""
        if self.groups != 1:
            return None
        return (self.start * self.unit, self.stop * self.unit)

    def rows(self) -> list[int]:
        """This projection's output rows in the fused output, in the projection's own order
        (``len == out_features``). For tests and small tools; executors should use views."""
        per = (self.stop - self.start) * self.unit
        first = self.start * self.unit
        return [
            g * self.slots * self.unit + first + i for g in range(self.groups) for i in range(per)
        ]


def pack(widths: Sequence[int], groups: int = 1) -> tuple[Fused, ...]:
    """The :class:`Fused` of projections sharing one output, each group holding every
    projection's ``width / groups`` rows in the listed order.

    The unit is the largest that tiles every per-group block (their gcd): column blocks of equal
    width give ``slots = len(widths)``; q | k | v of grouped-query attention give a head-width
    unit; per-head interleaving (``groups = heads``) gives ``unit = head_dim, slots = 3``.

    Args:
        widths: each projection's whole output width, in slot order.
        groups: how many times the slot pattern repeats (1 for column blocks).

    Raises:
        ValueError: a width is not a multiple of ``groups``.
    """
    if groups < 1 or any(w <= 0 or w % groups for w in widths):
        raise ValueError(f"widths {list(widths)} cannot be split into {groups} equal groups")
    per = [w // groups for w in widths]
    unit = reduce(gcd, per)
    slots = sum(per) // unit
    fused = []
    start = 0
    for width in per:
        fused.append(Fused(groups, slots, unit, start, start + width // unit))
        start += width // unit
    return tuple(fused)


@dataclass(frozen=True)
class ExpertWeights:
    """Where a mixture-of-experts projection's weights live: one stacked parameter of a module.

    ``transformers`` 5 keeps the experts of one layer as 3-D parameters of an experts module
    (``MixtralExperts.gate_up_proj [E, 2I, d]``, ``down_proj [E, d, I]``); expert ``e``'s matrix
    is ``param[e]``, oriented as the site's ``layout`` says (``"linear"``: ``[out, in]``,
    ``"conv1d"``: ``[in, out]``), and a fused gate/up parameter is cut by the site's
    :attr:`TargetSite.fused` along its output side.

    Attributes:
        param: the parameter's name on the site's module (``gate_up_proj``, ``down_proj``).
        n_experts: E, the leading dimension.
        top_k: experts each token is routed to.
        router: module path (below the backbone, like :attr:`TargetSite.module`) of the router
            that picks them: called on ``[tokens, d]``, it returns ``(logits, top_k_weights,
            top_k_index)``.
        bias: name of the ``[E, out]`` bias parameter added after this projection, or ``None``.
    """

    param: str
    n_experts: int
    top_k: int
    router: str
    bias: str | None = None


@dataclass(frozen=True)
class TargetSite:
    """One weight matrix of one layer.

    Attributes:
        layer: layer index, 0-based.
        proj: projection name (one of :data:`PROJECTIONS`).
        module: dotted module path *below the model root's backbone*, e.g.
            ``encoder.layer.3.attention.self.query``; resolved at inject time as the unique module
            whose full name equals it or ends with ``"." + module``.
        in_features: input width of this projection.
        out_features: output width of this projection (the slice width for fused modules).
        fused: for a fused module (GPT-2 ``c_attn``, BLOOM ``query_key_value``), where this
            projection's rows sit in its output (:class:`Fused`); ``None`` when the module is this
            projection alone.
        layout: ``"linear"`` (weight ``[out, in]``) or ``"conv1d"`` (GPT-2 style, weight ``[in, out]``);
            for experts, the orientation of each expert's matrix.
        head_side: which side is head-structured: ``"out"`` for q/k/v, ``"in"`` for o,
            ``None`` for MLP projections.
        n_heads: number of heads on the head side (H for q/o, the kv-heads for k/v); 0 if none.
        experts: for a mixture-of-experts projection, the stacked parameter that holds every
            expert's matrix (:class:`ExpertWeights`); ``in_features``/``out_features`` are one
            expert's. ``None`` for an ordinary module weight.
    """

    layer: int
    proj: str
    module: str
    in_features: int
    out_features: int
    fused: Fused | None = None
    layout: Literal["linear", "conv1d"] = "linear"
    head_side: Literal["out", "in"] | None = None
    n_heads: int = 0
    experts: ExpertWeights | None = None

    @property
    def n_experts(self) -> int:
        """Experts stacked in this site's weight (0 for an ordinary weight)."""
        return self.experts.n_experts if self.experts is not None else 0

    @property
    def out_slice(self) -> tuple[int, int] | None:
        """The contiguous output columns of a column-block fused projection, else ``None``."""
        return self.fused.columns if self.fused is not None else None


@dataclass(frozen=True)
class StackSpan:
    """One list of layers in the through-numbering of :attr:`Architecture.stacks`.

    Attributes:
        name: ``"encoder"``, ``"decoder"``, ``"text"``, ``"vision"``, ...
        start: the through-number of its first layer.
        n_layers: how many layers it has.
    """

    name: str
    start: int
    n_layers: int


@dataclass(frozen=True)
class Architecture:
    """Facts about a model family instance, enough to plan adapters without weights.

    Attributes:
        family: family name, e.g. ``bert``, ``gpt2``, ``llama``, ``vit``.
        model_type: the config's ``model_type``.
        n_layers: number of transformer layers.
        hidden_size: model width d.
        n_heads: attention heads H.
        n_kv_heads: key/value heads (== n_heads without grouped-query attention).
        head_dim: width of one head.
        intermediate_size: MLP width, or ``None`` if unknown.
        sites: every adaptable (layer, projection) matrix, ordered by layer then projection.
        stacks: the layer lists of a model with several (encoder then decoder, text then
            vision), as spans of the through-numbered layers; empty for one list. The widths and
            head counts above are the first list's; each site carries its own.
        n_experts: experts per sparse layer (0 without mixture-of-experts).
    """

    family: str
    model_type: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int | None
    sites: tuple[TargetSite, ...] = field(default_factory=tuple)
    stacks: tuple[StackSpan, ...] = ()
    n_experts: int = 0

    @property
    def projections(self) -> tuple[str, ...]:
        """Projection names this architecture has, in :data:`PROJECTIONS` order."""
        have = {s.proj for s in self.sites}
        return tuple(p for p in PROJECTIONS if p in have)

    def site(self, layer: int, proj: str) -> TargetSite:
        """The site of ``(layer, proj)``; raises ``KeyError`` naming what exists."""
        for s in self.sites:
            if s.layer == layer and s.proj == proj:
                return s
        where = self.layers_with(proj)
        if where:
            have = f"{proj!r} is only in layers {_spans(where)}"
        else:
            have = f"projections: {', '.join(self.projections)}"
        raise KeyError(
            f"{self.family} has no projection {proj!r} in layer {layer}; "
            f"{have}; layers: 0..{self.n_layers - 1}"
        )

    def layers_with(self, proj: str) -> tuple[int, ...]:
        """The layers that have projection ``proj`` (every layer for most; ``cross_*`` only in
        decoder layers, ``expert_*`` only in sparse layers)."""
        return tuple(s.layer for s in self.sites if s.proj == proj)

    def fingerprint(self) -> dict[str, Any]:
        """A JSON-able summary used to check that a saved adapter fits a model."""
        extra: dict[str, Any] = {}
        if self.stacks:
            extra["stacks"] = [[s.name, s.start, s.n_layers] for s in self.stacks]
        if self.n_experts:
            extra["n_experts"] = self.n_experts
        return {
            "family": self.family,
            "model_type": self.model_type,
            "n_layers": self.n_layers,
            "hidden_size": self.hidden_size,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            **extra,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _spans(layers: Sequence[int]) -> str:
    """``0..3, 6, 8..9`` for ``[0, 1, 2, 3, 6, 8, 9]``."""
    parts: list[str] = []
    run: list[int] = []
    for n in sorted(layers):
        if run and n != run[-1] + 1:
            parts.append(f"{run[0]}..{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(n)
    if run:
        parts.append(f"{run[0]}..{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(parts)
