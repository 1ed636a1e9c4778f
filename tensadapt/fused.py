"""Rows of fused modules: read, write and assemble a projection's rows inside a fused weight or
output, following its :class:`~tensadapt.arch.base.Fused` description (column blocks, per-head
interleaving, grouped layouts alike). The executor, merge, the pretrained inits and PEFT export
all go through these functions, so no family needs code of its own.

Assembling is split in two: :func:`layout` (pure Python, once per module) decides where each piece
and each block of zeros goes; :func:`assemble` (tensor work only, traceable by ``torch.compile``)
follows it. :func:`place` does both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .arch.base import Fused


def _split(t: torch.Tensor, fused: Fused, dim: int) -> torch.Tensor:
    """A view of ``t`` whose ``dim`` (the fused width) is read as ``[groups, slots, unit]`` and
    narrowed to the projection's slots: shape ``[..., groups, stop - start, unit, ...]``."""
    dim = dim % t.dim()
    shape = [*t.shape[:dim], fused.groups, fused.slots, fused.unit, *t.shape[dim + 1 :]]
    return t.view(shape).narrow(dim + 1, fused.start, fused.stop - fused.start)


def gather(t: torch.Tensor, fused: Fused | None, dim: int) -> torch.Tensor:
    """The projection's rows of ``t`` along ``dim`` (a copy when they are not contiguous).

    Args:
        t: e.g. a fused weight ``[width, in]`` (``dim=0``) or an output ``[n, width]`` (``dim=-1``).
        fused: the projection's place, or ``None`` (the whole dimension is the projection).
        dim: the fused dimension of ``t``.
    Returns:
        ``t`` with ``dim`` of size ``fused.out_features``.
    """
    if fused is None:
        return t
    dim = dim % t.dim()
    part = _split(t, fused, dim)
    return part.reshape(*t.shape[:dim], fused.out_features, *t.shape[dim + 1 :])


def add_into(t: torch.Tensor, fused: Fused | None, dim: int, delta: torch.Tensor) -> None:
    """``t[projection rows along dim] += delta`` in place (``delta`` has ``out_features`` there)."""
    if fused is None:
        t.add_(delta)
        return
    part = _split(t, fused, dim)
    part.add_(delta.reshape(part.shape))


@dataclass(frozen=True)
class Layout:
    """Where the pieces of one fused output go (see :func:`layout`).

    Attributes:
        width: the fused width.
        groups, unit: the fused dimension read as ``[groups, slots, unit]``.
        segments: along the slots, in order: ``(piece index, slots)`` for a piece, ``(-1, slots)``
            for zeros. Empty when a single piece covers the whole width (it is used as is).
    """

    width: int
    groups: int
    unit: int
    segments: tuple[tuple[int, int], ...]


def layout(fuseds: Sequence[Fused | None], width: int) -> Layout:
    """The :class:`Layout` of pieces at places ``fuseds`` (all of one module: same ``groups``,
    ``slots`` and ``unit``) in a fused width ``width``."""
    if len(fuseds) == 1 and (fuseds[0] is None or fuseds[0].out_features == width):
        return Layout(width, 1, width, ())
    fused0 = next(f for f in fuseds if f is not None)
    segments: list[tuple[int, int]] = []
    pos = 0
    for i in sorted(range(len(fuseds)), key=lambda k: _start(fuseds[k])):
        f = fuseds[i]
        assert f is not None and (f.groups, f.unit) == (fused0.groups, fused0.unit)
        if f.start > pos:
            segments.append((-1, f.start - pos))
        segments.append((i, f.stop - f.start))
        pos = f.stop
    if pos < fused0.slots:
        segments.append((-1, fused0.slots - pos))
    return Layout(width, fused0.groups, fused0.unit, tuple(segments))


def _start(f: Fused | None) -> int:
    return f.start if f is not None else 0


def assemble(lay: Layout, pieces: Sequence[torch.Tensor], dim: int = -1) -> torch.Tensor:
    """One tensor of width ``lay.width`` along ``dim`` holding ``pieces[i]`` at its slots and
    zeros elsewhere, following ``lay`` (no copy for a single piece that covers the whole width)."""
    ref = pieces[0]
    if not lay.segments:
        return ref
    dim = dim % ref.dim()
    lead, tail = ref.shape[:dim], ref.shape[dim + 1 :]
    parts: list[torch.Tensor] = []
    for i, slots in lay.segments:
        if i < 0:
            parts.append(ref.new_zeros(*lead, lay.groups, slots, lay.unit, *tail))
        else:
            parts.append(pieces[i].reshape(*lead, lay.groups, slots, lay.unit, *tail))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim + 1)
    return out.reshape(*lead, lay.width, *tail)


def place(
    pieces: Sequence[tuple[Fused | None, torch.Tensor]], width: int, dim: int = -1
) -> torch.Tensor:
    """One tensor of width ``width`` along ``dim`` holding each piece at its projection's rows and
    zeros elsewhere (no copy for a single piece that covers the whole width).

    Args:
        pieces: ``(fused, tensor)`` with ``tensor`` of size ``fused.out_features`` along ``dim``;
            all pieces of one module share ``groups``, ``slots`` and ``unit``.
        width: the fused width.
        dim: the dimension to assemble along.
    """
    lay = layout([f for f, _ in pieces], width)
    return assemble(lay, [m for _, m in pieces], dim)


__all__ = ["Layout", "add_into", "assemble", "gather", "layout", "place"]
