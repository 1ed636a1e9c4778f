"""Rows of fused modules: read, write and assemble a projection's rows inside a fused weight or
output, following its :class:`~tensadapt.arch.base.Fused` description (column blocks, per-head
interleaving, grouped layouts alike). The executor, merge, the pretrained inits and PEFT export
all go through these three functions, so no family needs code of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    ref = pieces[0][1]
    dim = dim % ref.dim()
    if len(pieces) == 1 and (pieces[0][0] is None or pieces[0][0].out_features == width):
        return ref
    fused0 = next(f for f, _ in pieces if f is not None)
    groups, unit = fused0.groups, fused0.unit
    lead, tail = ref.shape[:dim], ref.shape[dim + 1 :]
    parts: list[torch.Tensor] = []
    pos = 0
    for f, m in sorted(pieces, key=lambda fm: fm[0].start if fm[0] is not None else 0):
        assert f is not None and (f.groups, f.unit) == (groups, unit)
        if f.start > pos:
            parts.append(ref.new_zeros(*lead, groups, f.start - pos, unit, *tail))
        parts.append(m.reshape(*lead, groups, f.stop - f.start, unit, *tail))
        pos = f.stop
    if pos < fused0.slots:
        parts.append(ref.new_zeros(*lead, groups, fused0.slots - pos, unit, *tail))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim + 1)
    return out.reshape(*lead, width, *tail)


__all__ = ["add_into", "gather", "place"]
