"""``tt``: tensor train over the tensor's axes, cores ``[r_{k-1}, axis_k, r_k]`` (boundary ranks 1
dropped). A rank mapping is keyed by the axis on the *left* of each bond.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from .base import Axis, Factorization, Network, Rank, make_network, rank_of
from .cp import _out_axis


class TensorTrain(Factorization):
    name = "tt"
    inits = ("zeros", "svd")
    description = "tensor train over the axes, cores [r, axis, r]"

    def rank_keys(self, axes: Sequence[str]) -> tuple[str, ...]:
        return tuple(axes[:-1])

    def network(self, axes: Sequence[Axis], rank: Rank, options: BaseModel) -> Network:
        return train_network(
            axes,
            rank,
            [(a.name,) for a in axes],
            [f"G_{a.name}" for a in axes],
            zero=f"G_{_out_axis(axes)}",
        )


def train_network(
    axes: Sequence[Axis],
    rank: Rank,
    site_legs: Sequence[tuple[str, ...]],
    names: Sequence[str],
    zero: str,
    bond_keys: Sequence[str] | None = None,
    axis_legs: dict[str, tuple[str, ...]] | None = None,
    sub_sizes: dict[str, int] | None = None,
) -> Network:
    """A chain of cores; core k has legs ``(b_{k-1}, *site_legs[k], b_k)`` without boundary bonds."""
    n = len(site_legs)
    keys = list(bond_keys) if bond_keys is not None else [a.name for a in axes]
    bonds = {f"b{k}": rank_of(rank, keys[k]) for k in range(n - 1)}
    factors = []
    for k in range(n):
        legs = (
            ((f"b{k - 1}",) if k > 0 else ())
            + tuple(site_legs[k])
            + ((f"b{k}",) if k < n - 1 else ())
        )
        factors.append((names[k], legs))
    return make_network(
        factors, axes, bonds, zero_factor=zero, axis_legs=axis_legs, sub_sizes=sub_sizes
    )
