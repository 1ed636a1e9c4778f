"""``cp``: canonical polyadic decomposition, one factor ``[axis, r]`` per axis (LoRTA).

Parameters: ``r · Σ axis sizes``; for roberta-base q, k, v, o with heads+qkv+depth at r = 8 that is
``8 · (768 + 64 + 12 + 4 + 12) = 6,880``.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from .base import Axis, Factorization, Network, Rank, make_network, rank_of


class CP(Factorization):
    name = "cp"
    inits = ("zeros", "svd")
    description = "CP / PARAFAC: one [axis, r] factor per axis (LoRTA)"

    def network(self, axes: Sequence[Axis], rank: Rank, options: BaseModel) -> Network:
        r = rank_of(rank, "r")
        factors = [(f"U_{a.name}", (a.name, "r")) for a in axes]
        return make_network(factors, axes, {"r": r}, zero_factor=f"U_{_out_axis(axes)}")


def _out_axis(axes: Sequence[Axis]) -> str:
    """The axis whose factor is zeroed: the output side (``out`` or ``head_dim``)."""
    names = [a.name for a in axes]
    for cand in ("out", "head_dim"):
        if cand in names:
            return cand
    return names[-1]
