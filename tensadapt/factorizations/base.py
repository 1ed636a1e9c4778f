"""The small interface every factorization implements, and the generic operations built on it.

A factorization turns the *axes* of one update tensor (e.g. ``in=768, head_dim=64, heads=12,
qkv=3, depth=12``) and a rank into a :class:`Network`: a list of factors, each a list of named
*legs*. Legs named like an axis carry that axis; every other leg is a bond shared by the factors
that name it. Everything else -- parameter counts, reconstruction, the einsum that maps an input to
a target's output, the default initialisation -- is derived from the network here, once, for all
formats (built-in or plugin).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # torch is imported where tensors are made: validating a spec needs no torch
    import torch

Rank = int | Mapping[str, int]


@dataclass(frozen=True)
class Axis:
    """One axis of an update tensor: ``in``, ``out``, ``head_dim``, ``heads``, ``qkv`` or ``depth``."""

    name: str
    size: int


@dataclass(frozen=True)
class FactorSpec:
    """One trainable factor: its name, its legs (axis names or bond names) and its shape."""

    name: str
    legs: tuple[str, ...]
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Network:
    """A tensor network that reconstructs one update tensor.

    Attributes:
        factors: the trainable factors.
        axis_legs: for each tensor axis, the legs that compose it in row-major order (one leg for
            most formats; MPO splits ``in``/``out`` into several sub-legs).
        leg_sizes: size of every leg (axis legs and bonds).
        zero_factor: the factor the default init sets to zero, so the update starts at exactly 0.
    """

    factors: tuple[FactorSpec, ...]
    axis_legs: tuple[tuple[str, tuple[str, ...]], ...]
    leg_sizes: tuple[tuple[str, int], ...]
    zero_factor: str

    @property
    def n_params(self) -> int:
        """Parameter count, from the factor shapes (never a hand-written formula)."""
        return sum(f.numel for f in self.factors)

    def legs_of(self, axis: str) -> tuple[str, ...]:
        return dict(self.axis_legs)[axis]

    def factor(self, name: str) -> FactorSpec:
        for f in self.factors:
            if f.name == name:
                return f
        raise KeyError(name)


class NoOptions(BaseModel):
    """A factorization without options."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def make_network(
    factors: Sequence[tuple[str, Sequence[str]]],
    axes: Sequence[Axis],
    bonds: Mapping[str, int],
    zero_factor: str,
    axis_legs: Mapping[str, Sequence[str]] | None = None,
    sub_sizes: Mapping[str, int] | None = None,
) -> Network:
    """Build a :class:`Network`, deriving every factor's shape from its legs.

    Args:
        factors: ``(name, legs)`` per factor.
        axes: the tensor's axes.
        bonds: size of each bond leg.
        zero_factor: the factor to zero in the default init.
        axis_legs: composite axes (axis -> sub-legs); by default each axis is one leg of its name.
        sub_sizes: sizes of composite sub-legs.
    """
    sizes: dict[str, int] = {a.name: a.size for a in axes}
    sizes.update(bonds)
    sizes.update(sub_sizes or {})
    legs_map = {
        a.name: tuple(axis_legs[a.name]) if axis_legs and a.name in axis_legs else (a.name,)
        for a in axes
    }
    specs = tuple(
        FactorSpec(n, tuple(legs), tuple(sizes[leg] for leg in legs)) for n, legs in factors
    )
    used = {leg for _, legs in factors for leg in legs}
    return Network(
        factors=specs,
        axis_legs=tuple(legs_map.items()),
        leg_sizes=tuple((k, v) for k, v in sizes.items() if k in used),
        zero_factor=zero_factor,
    )


class Factorization(abc.ABC):
    """Base class of every format. Subclasses set ``name`` and implement :meth:`network`.

    Class attributes:
        name: the name used in specs (``factorization: <name>``).
        options_model: pydantic model validating ``options:`` for this format.
        rank_keys_allowed: whether ``rank`` may be a mapping; see :meth:`rank_keys`.
        inits: initialisers this format supports (``zeros`` always).
        description: one line for ``tensadapt plugins``.
    """

    name: ClassVar[str] = ""
    options_model: ClassVar[type[BaseModel]] = NoOptions
    inits: ClassVar[tuple[str, ...]] = ("zeros",)
    description: ClassVar[str] = ""

    # -- the part a format implements -------------------------------------------------------
    def rank_keys(self, axes: Sequence[str]) -> tuple[str, ...]:
        """Keys a ``rank:`` mapping may use for a tensor with these axis names; ``()`` = int only."""
        return ()

    @abc.abstractmethod
    def network(self, axes: Sequence[Axis], rank: Rank, options: BaseModel) -> Network:
        """The tensor network for one tensor with these axes. Shapes: see :class:`Network`."""

    def check(self, axes: Sequence[Axis], rank: Rank, options: BaseModel) -> list[str]:
        """Problems with this rank/options for these axes (empty when fine). Override to add."""
        return []

    # -- derived, shared by all formats ------------------------------------------------------
    def n_params(self, axes: Sequence[Axis], rank: Rank, options: BaseModel | None = None) -> int:
        return self.network(axes, rank, options or self.options_model()).n_params

    def parse_options(self, options: Mapping[str, Any] | None) -> BaseModel:
        return self.options_model.model_validate(dict(options or {}))


def rank_of(rank: Rank, key: str) -> int:
    """The rank for ``key``: the int itself, or ``rank[key]`` falling back to ``rank['default']``."""
    if isinstance(rank, int):
        return rank
    if key in rank:
        return int(rank[key])
    if "default" in rank:
        return int(rank["default"])
    raise KeyError(f"rank has no entry for {key!r} and no 'default'")


def nominal_rank(rank: Rank) -> int:
    """One number standing for the rank (used for ``alpha / r`` scaling and LoRA comparisons)."""
    return rank if isinstance(rank, int) else max(int(v) for v in rank.values())


def equation(network: Network, out_legs: Sequence[str]) -> tuple[str, list[str]]:
    """An einsum equation contracting every factor into ``out_legs``; symbols from opt_einsum."""
    import opt_einsum as oe  # here, not at the top: `validate` and `schema` never contract

    sym: dict[str, str] = {}

    def s(leg: str) -> str:
        if leg not in sym:
            sym[leg] = oe.get_symbol(len(sym))
        return sym[leg]

    ins = ["".join(s(leg) for leg in f.legs) for f in network.factors]
    out = "".join(s(leg) for leg in out_legs)
    return ",".join(ins) + "->" + out, [f.name for f in network.factors]


def reconstruct(network: Network, factors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The full update tensor, shape ``[axis sizes...]`` in axis order.

    Args:
        network: the network.
        factors: factor name -> tensor of the factor's shape.
    Returns:
        tensor of shape ``tuple(axis.size for axis in axes)``.
    """
    out_legs = [leg for _, legs in network.axis_legs for leg in legs]
    eq, names = equation(network, out_legs)
    import opt_einsum as oe
    import torch  # noqa: F401  (the torch backend of opt_einsum)

    full = oe.contract(eq, *[factors[n] for n in names], backend="torch")
    sizes = dict(network.leg_sizes)
    axis_sizes = [math.prod(sizes[leg] for leg in legs) for _, legs in network.axis_legs]
    return full.reshape(axis_sizes)


def default_init(
    network: Network, in_axis: str = "in", generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Zero-update init: the zero factor is 0; the factor holding ``in`` is LoRA-A-like uniform
    ``±1/sqrt(in)``; every other factor is normal with std ``1/sqrt(fan)``, fan being the product
    of its bond sizes but the largest, so products of factors keep unit scale. Update == 0 exactly.
    """
    import torch

    axis_leg_names = {leg for _, legs in network.axis_legs for leg in legs}
    in_legs = set(dict(network.axis_legs).get(in_axis, ()))
    sizes = dict(network.leg_sizes)
    out: dict[str, torch.Tensor] = {}
    for f in network.factors:
        if f.name == network.zero_factor:
            out[f.name] = torch.zeros(f.shape)
        elif in_legs and in_legs <= set(f.legs) and f.name != network.zero_factor:
            fan_in = math.prod(sizes[leg] for leg in in_legs)
            bound = 1.0 / math.sqrt(fan_in)
            out[f.name] = (torch.rand(f.shape, generator=generator) * 2 - 1) * bound
        else:
            bonds = sorted(
                (sizes[leg] for leg in f.legs if leg not in axis_leg_names), reverse=True
            )
            fan = math.prod(bonds[1:]) if len(bonds) > 1 else 1
            out[f.name] = torch.randn(f.shape, generator=generator) / math.sqrt(fan)
    return out
