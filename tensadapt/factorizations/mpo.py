"""``mpo``: matrix product operator (tensor-train matrix) as in DoTA (arXiv 2412.20891).

``in`` and the output side (``out``, or ``head_dim`` with the heads mode) are reshaped into N
sub-dimensions ``I_1..I_N`` and ``J_1..J_N``; core k has legs ``[R̄_{k-1}, I_k, J_k, R̄_k]``
(boundary bonds dropped). Any further axes (heads, qkv, depth) get one tensor-train core
``[R̄, axis, R̄]`` each, appended to the chain.

Bond ranks are DoTA's (Sec. 3.1): the rank threshold ``R`` is capped by the exact MPO rank of Eq. (1),
``R̄_k = min(R, R_k)`` with ``R_k = min(∏_{n≤k} I_n·J_n, ∏_{n>k} I_n·J_n)``: a bond never exceeds the
rank an exact decomposition needs (for the extra stacked cores the same bound runs over the whole
chain). So the parameter count is the paper's ``ρ = Σ_k R̄_{k-1}·I_k·J_k·R̄_k``: a 768 x 768 matrix
at R = 16 has 10,833 parameters (R = 16 on every bond would give 12,688, of which the last bond's
16 - 9 columns can never be reached by any MPO of W0); 1024 x 1024, N = 5, R = 8, I_k = J_k = 4
has 3,328, as in the paper.

Shapes are DoTA's Table 2 for the widths it lists (N = 5), else :func:`balanced_factors`, unless
given in ``options``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from .base import Axis, Factorization, Network, Rank
from .tt import train_network


class MPOOptions(BaseModel):
    """Options of ``mpo``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    # strict ints: YAML's `true` or `5.0` is a mistake, not 1 or 5 cores
    n_cores: StrictInt = Field(
        5, ge=1, le=12, description="N: number of cores the matrix is split into (DoTA: 5)"
    )
    in_shape: tuple[StrictInt, ...] | None = Field(
        None, description="I_1..I_N, product = input width; chosen automatically when omitted"
    )
    out_shape: tuple[StrictInt, ...] | None = Field(
        None,
        description="J_1..J_N, product = output width (head_dim with heads); automatic when omitted",
    )

    @field_validator("in_shape", "out_shape")
    @classmethod
    def _positive(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is not None and any(x < 1 for x in v):
            raise ValueError("every sub-dimension must be >= 1")
        return v


#: DoTA's Table 2: the N = 5 sub-dimensions the paper uses for each width it lists. Taken as data:
#: no single rule produces all of them (11008 keeps its prime factor 43 whole; 14336 and 50400 are
#: not the most balanced splits).
TABLE2: dict[int, tuple[int, ...]] = {
    50400: (5, 10, 14, 12, 6),
    14336: (4, 8, 8, 8, 7),
    11008: (4, 4, 43, 4, 4),
    768: (4, 4, 4, 4, 3),
    3072: (4, 4, 8, 6, 4),
    1024: (4, 4, 4, 4, 4),
    4096: (4, 4, 8, 8, 4),
    2304: (4, 4, 8, 6, 3),
}


def dota_shape(n: int, k: int) -> tuple[int, ...]:
    """Sub-dimensions of a width ``n`` split into ``k`` cores: DoTA's Table 2 when it lists ``n``
    (and ``k = 5``, the paper's N), else :func:`balanced_factors`."""
    if k == 5 and n in TABLE2:
        return TABLE2[n]
    return balanced_factors(n, k)


def capped_bonds(site_sizes: Sequence[int], rank: int) -> tuple[int, ...]:
    """DoTA's bond ranks ``R̄_k = min(R, R_k)`` for a chain of sites (Eq. (1) of the paper).

    Args:
        site_sizes: the size of each core's open legs, in chain order (``I_k·J_k`` for the matrix
            cores, then the size of each stacked axis).
        rank: the threshold ``R``.
    Returns:
        the ``len(site_sizes) - 1`` inner bond ranks.
    """
    return tuple(
        min(rank, math.prod(site_sizes[: k + 1]), math.prod(site_sizes[k + 1 :]))
        for k in range(len(site_sizes) - 1)
    )


@cache
def balanced_factors(n: int, k: int) -> tuple[int, ...]:
    """Split ``n`` into ``k`` integer factors as evenly as possible, arranged as DoTA's Table 2.

    Minimises the largest factor, then the spread of log-factors; the factors are then placed
    largest in the middle, smallest last (768 -> [4, 4, 4, 4, 3], 3072 -> [4, 4, 8, 6, 4],
    4096 -> [4, 4, 8, 8, 4]).
    """
    if k == 1:
        return (n,)
    best: tuple[float, float, tuple[int, ...]] | None = None
    for combo in _factorizations(n, k, 2):
        key = (max(combo), sum((math.log(c) - math.log(n) / k) ** 2 for c in combo), combo)
        if best is None or key[:2] < best[:2]:
            best = key
    assert best is not None
    desc = sorted(best[2], reverse=True)
    order = _table2_order(k)
    out = [0] * k
    for value, pos in zip(desc, order, strict=True):
        out[pos] = value
    return tuple(out)


def _table2_order(k: int) -> list[int]:
    """Positions filled largest-first: middle, right of middle, then leftwards, last slot last."""
    mid = k // 2
    order = [mid] + [p for p in range(mid + 1, k - 1)] + list(range(mid - 1, -1, -1))
    order += [k - 1] if k - 1 not in order else []
    return order[:k]


def _factorizations(n: int, k: int, lo: int) -> list[tuple[int, ...]]:
    """All non-decreasing k-tuples of integers >= lo (1 allowed when needed) with product n."""
    if k == 1:
        return [(n,)] if n >= lo or n == 1 else []
    out = []
    divisors = [d for d in range(1, int(round(n ** (1 / k))) + 2) if n % d == 0]
    for d in divisors:
        if d < lo and d != 1:
            continue
        for rest in _factorizations(n // d, k - 1, max(d, lo) if d > 1 else 1):
            out.append((d, *rest))
    if not out:  # prime-ish n: pad with ones
        out = [tuple([1] * (k - 1) + [n])]
    return list(dict.fromkeys(tuple(sorted(c)) for c in out))


class MPO(Factorization):
    name = "mpo"
    options_model = MPOOptions
    inits = ("zeros", "mpo")
    description = "matrix product operator / TT-matrix of each matrix (DoTA)"

    def shapes(
        self, axes: Sequence[Axis], options: BaseModel
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        assert isinstance(options, MPOOptions)
        d_in = axes[0].size
        d_out = axes[1].size
        i_shape = options.in_shape or dota_shape(d_in, options.n_cores)
        j_shape = options.out_shape or dota_shape(d_out, options.n_cores)
        return tuple(i_shape), tuple(j_shape)

    def check(self, axes: Sequence[Axis], rank: Rank, options: BaseModel) -> list[str]:
        assert isinstance(options, MPOOptions)
        problems = []
        i_shape, j_shape = self.shapes(axes, options)
        for key, shape, ax in (("in_shape", i_shape, axes[0]), ("out_shape", j_shape, axes[1])):
            if math.prod(shape) != ax.size:
                problems.append(
                    f"options.{key}: product {math.prod(shape)} != {ax.name} size {ax.size}"
                )
            if len(shape) != options.n_cores:
                problems.append(
                    f"options.{key}: {len(shape)} entries but n_cores = {options.n_cores}"
                )
        return problems

    def network(self, axes: Sequence[Axis], rank: Rank, options: BaseModel) -> Network:
        i_shape, j_shape = self.shapes(axes, options)
        n = len(i_shape)
        a_in, a_out = axes[0].name, axes[1].name
        sub = {f"{a_in}.{k}": s for k, s in enumerate(i_shape)} | {
            f"{a_out}.{k}": s for k, s in enumerate(j_shape)
        }
        site_legs = [(f"{a_in}.{k}", f"{a_out}.{k}") for k in range(n)] + [
            (a.name,) for a in axes[2:]
        ]
        names = [f"C{k}" for k in range(n)] + [f"G_{a.name}" for a in axes[2:]]
        r = rank if isinstance(rank, int) else max(rank.values())
        sites = [i * j for i, j in zip(i_shape, j_shape, strict=True)] + [a.size for a in axes[2:]]
        bonds = {f"b{k}": b for k, b in enumerate(capped_bonds(sites, r))}
        return train_network(
            axes,
            bonds,
            site_legs,
            names,
            zero=f"C{n - 1}",
            bond_keys=[f"b{k}" for k in range(len(site_legs))],
            axis_legs={
                a_in: tuple(f"{a_in}.{k}" for k in range(n)),
                a_out: tuple(f"{a_out}.{k}" for k in range(n)),
            },
            sub_sizes=sub,
        )


__all__ = ["MPO", "TABLE2", "MPOOptions", "balanced_factors", "capped_bonds", "dota_shape"]
