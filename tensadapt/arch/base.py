"""What an architecture adapter knows about a model family, as pure data.

An :class:`Architecture` is computed from a ``transformers`` config alone (no weights), so plans for
70B-sized models cost nothing. Each adaptable weight matrix is a :class:`TargetSite`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

#: Projection names, in stacking order. Attention: q, k, v, o. MLP: up, gate, down.
PROJECTIONS: tuple[str, ...] = ("q", "k", "v", "o", "up", "gate", "down")
ATTENTION_PROJECTIONS: tuple[str, ...] = ("q", "k", "v", "o")


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
        layout: ``"linear"`` (weight ``[out, in]``) or ``"conv1d"`` (GPT-2 style, weight ``[in, out]``).
        head_side: which side is head-structured: ``"out"`` for q/k/v, ``"in"`` for o,
            ``None`` for MLP projections.
        n_heads: number of heads on the head side (H for q/o, the kv-heads for k/v); 0 if none.
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

    @property
    def out_slice(self) -> tuple[int, int] | None:
        """The contiguous output columns of a column-block fused projection, else ``None``."""
        return self.fused.columns if self.fused is not None else None


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
        raise KeyError(
            f"{self.family} has no projection {proj!r} in layer {layer}; "
            f"projections: {', '.join(self.projections)}; layers: 0..{self.n_layers - 1}"
        )

    def fingerprint(self) -> dict[str, Any]:
        """A JSON-able summary used to check that a saved adapter fits a model."""
        return {
            "family": self.family,
            "model_type": self.model_type,
            "n_layers": self.n_layers,
            "hidden_size": self.hidden_size,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
