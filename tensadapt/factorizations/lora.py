"""``lora``: the matrix baseline. The tensor is unfolded as ``in`` x (all other axes):
``ΔT = A ∘ B`` with ``A: [in, r]`` and ``B: [*other axes, r]``. With no stacking modes this is
exactly LoRA's ``ΔW = B·A`` per matrix; with ``qkv`` it is a LoRA whose ``A`` is shared by q, k, v.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from .base import Axis, Factorization, Network, Rank, make_network, rank_of


class LoRA(Factorization):
    name = "lora"
    inits = ("zeros", "svd")
    description = "matrix B·A (in × rest), the LoRA baseline"

    def network(self, axes: Sequence[Axis], rank: Rank, options: BaseModel) -> Network:
        r = rank_of(rank, "r")
        rest = [a.name for a in axes if a.name != "in"]
        return make_network(
            [("A", ("in", "r")), ("B", (*rest, "r"))], axes, {"r": r}, zero_factor="B"
        )
