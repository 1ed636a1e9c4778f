"""Named legs -> einsum: the one place where tensadapt turns leg names into einsum subscripts,
prices a contraction and runs it.

Everything in tensadapt names tensor legs (``in``, ``head_dim``, ``r``, ``in.3`` …). A
:class:`Contraction` is built from the legs of its operands and of its result plus the operand
shapes: opt_einsum chooses the path (``contract_path``) and prices it; the contraction then runs as
that path's pairwise steps, each one ``torch.einsum`` of two operands.

Why not ``opt_einsum.contract_expression`` to run it: its call dispatches through Python-level
backend lookups that ``torch.compile`` cannot trace (a graph break in every adapted module), while a
fixed list of ``torch.einsum`` calls traces into one graph. Why symbols are assigned here rather than
with opt_einsum's interleaved (named) input: opt_einsum 3.4's ``contract_path(..., shapes=True)``
fails on interleaved input (it pops from a tuple), and tensadapt prices paths from shapes alone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import opt_einsum as oe

if TYPE_CHECKING:
    import torch

Legs = tuple[str, ...]
Shape = tuple[int, ...]


def equation(inputs: Sequence[Sequence[str]], output: Sequence[str]) -> str:
    """The einsum equation contracting operands with legs ``inputs`` into legs ``output``.

    Symbols come from :func:`opt_einsum.get_symbol`, assigned in first-seen order, so any number
    of legs with any names works. ``equation([("in", "r"), ("out", "r")], ("in", "out"))`` is
    ``"ab,cb->ac"``.
    """
    sym: dict[str, str] = {}

    def term(legs: Sequence[str]) -> str:
        for leg in legs:
            if leg not in sym:
                sym[leg] = oe.get_symbol(len(sym))
        return "".join(sym[leg] for leg in legs)

    ins = [term(legs) for legs in inputs]
    return ",".join(ins) + "->" + term(output)


@dataclass(frozen=True)
class Contraction:
    """One contraction with its path fixed for given operand shapes.

    Attributes:
        equation: the whole einsum equation.
        shapes: the operand shapes it was planned for.
        steps: the pairwise path: ``(positions, equation)`` per step. ``positions`` (descending)
            are popped from the operand list, contracted with ``equation``, and the result is
            appended (opt_einsum's own convention).
        flops: opt_einsum's FLOP count on that path.
    """

    equation: str
    shapes: tuple[Shape, ...]
    steps: tuple[tuple[tuple[int, ...], str], ...]
    flops: float

    def __call__(self, *operands: torch.Tensor) -> torch.Tensor:
        """Run the contraction on tensors of (any) shapes with these ranks.

        Returns:
            the result, legs in the order of the equation's output.
        """
        import torch

        if len(self.steps) == 0:  # pragma: no cover - contract_path always gives one step
            return operands[0]
        ops = list(operands)
        for positions, eq in self.steps:
            picked = [ops.pop(i) for i in positions]
            ops.append(torch.einsum(eq, *picked))
        return ops[0]


def contraction(
    inputs: Sequence[Sequence[str]],
    output: Sequence[str],
    shapes: Sequence[Sequence[int]],
    optimize: str | None = None,
) -> Contraction:
    """The :class:`Contraction` of operands with legs ``inputs`` and shapes ``shapes`` into
    ``output``, on opt_einsum's best path (``optimal`` up to 6 operands, else ``auto-hq``).

    Cached by (equation, shapes): the targets of one tensor share a handful of equations.
    """
    eq = equation(inputs, output)
    return _build(eq, tuple(tuple(int(d) for d in s) for s in shapes), optimize)


@functools.lru_cache(maxsize=8192)
def _build(eq: str, shapes: tuple[Shape, ...], optimize: str | None) -> Contraction:
    how = optimize or ("optimal" if len(shapes) <= 6 else "auto-hq")
    _, info = oe.contract_path(eq, *shapes, shapes=True, optimize=how)
    steps = tuple(
        (tuple(int(i) for i in entry[0]), str(entry[2])) for entry in info.contraction_list
    )
    return Contraction(eq, shapes, steps, float(info.opt_cost))


def flops(inputs: Sequence[Sequence[str]], output: Sequence[str], sizes: dict[str, int]) -> float:
    """opt_einsum's FLOPs for contracting operands with legs ``inputs`` into ``output``, leg sizes
    from ``sizes`` (0 for a single operand that only needs a reshape)."""
    if len(inputs) < 2:
        return 0.0
    shapes = [tuple(sizes[leg] for leg in legs) for legs in inputs]
    return contraction(inputs, output, shapes).flops


def size_of(legs: Sequence[str], sizes: dict[str, int]) -> int:
    """The product of the sizes of ``legs``."""
    return math.prod(sizes[leg] for leg in legs)


__all__ = ["Contraction", "Legs", "contraction", "equation", "flops", "size_of"]
