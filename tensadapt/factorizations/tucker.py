"""``tucker``: a core ``[r_1, ..., r_N]`` and one factor ``[axis, r_a]`` per axis (TensLoRA).

Ranks are per axis (``rank: {in: 8, qkv: 3, ...}``) or one int for all. As in TensLoRA, a rank may
exceed a small axis (qkv = 3); the enumerator flags such rows.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from .base import Axis, Factorization, Network, Rank, make_network, rank_of
from .cp import _out_axis


class Tucker(Factorization):
    name = "tucker"
    inits = ("zeros", "svd")
    description = "Tucker: core × one factor per axis, per-axis ranks (TensLoRA)"

    def rank_keys(self, axes: Sequence[str]) -> tuple[str, ...]:
        return tuple(axes)

    def network(self, axes: Sequence[Axis], rank: Rank, options: BaseModel) -> Network:
        bonds = {f"r_{a.name}": rank_of(rank, a.name) for a in axes}
        factors = [("core", tuple(bonds))] + [
            (f"U_{a.name}", (a.name, f"r_{a.name}")) for a in axes
        ]
        return make_network(factors, axes, bonds, zero_factor=f"U_{_out_axis(axes)}")
