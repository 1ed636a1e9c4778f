"""``tensor_ring``: a tensor-ring decomposition of each update tensor, as a tensadapt plugin.

Core ``k`` has legs ``[b_{k-1}, axis_k, b_k]`` with the bond indices taken around the ring, so the
first core's left bond is the last core's right bond (the closing bond). A rank mapping is keyed
by the axis on the left of each bond. The output-side core is zero at init, so the update starts
at exactly 0; everything else (counts, reconstruction, the forward contraction) tensadapt derives
from the network.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from tensadapt.factorizations.base import Axis, Factorization, Network, Rank, make_network, rank_of
from tensadapt.hookspecs import hookimpl

__version__ = "0.1.0"


class TensorRing(Factorization):
    """Tensor ring over the tensor's axes: cores ``[r_{k-1}, axis_k, r_k]``, ring closed."""

    name = "tensor_ring"
    description = "tensor ring: cores [r, axis, r] around a closed ring (plugin)"

    def rank_keys(self, axes: Sequence[str]) -> tuple[str, ...]:
        return tuple(axes)

    def network(self, axes: Sequence[Axis], rank: Rank, options: BaseModel) -> Network:
        n = len(axes)
        bonds = {f"b{k}": rank_of(rank, axes[k].name) for k in range(n)}
        factors = [
            (f"G_{a.name}", (f"b{(k - 1) % n}", a.name, f"b{k}")) for k, a in enumerate(axes)
        ]
        names = [a.name for a in axes]
        zero = next((f"G_{c}" for c in ("out", "head_dim") if c in names), f"G_{names[-1]}")
        return make_network(factors, axes, bonds, zero_factor=zero)


@hookimpl
def tensadapt_register_factorizations() -> list[type[Factorization]]:
    """The ``tensor_ring`` factorization."""
    return [TensorRing]
