"""The built-in stacking modes and how they shape an update tensor.

Every target matrix is first *oriented*: read-in projections (q, k, v, up, gate and their
cross-attention and expert counterparts) as ``[in, out]``, write-out projections (o, down,
cross_o, expert_down) transposed, so that the model-width side is always the ``in`` axis and the
head-structured side always the ``out`` axis. Then:

- ``heads`` splits the head-structured side into ``head_dim × heads`` (attention targets only;
  MLP targets have no heads and keep ``out``);
- ``qkv`` stacks the targeted projections of the same oriented shape along a ``qkv`` axis;
- ``experts`` stacks the E experts of a mixture-of-experts projection along an ``experts`` axis
  (expert targets only; other targets have no experts and no such axis);
- ``depth`` stacks the selected layers along a ``depth`` axis.

A mode that is not listed splits the update into separate tensors along it (as in TensLoRA):
without ``experts``, each expert's update is its own tensor.

Grouped-query attention: k and v are narrower than q (``kv_heads · head_dim``). Targets are stacked
only when their oriented shapes agree, so q (with o) forms one stack and k with v another, each a
tensor with its own factors; with ``heads`` the kv tensor's heads axis has the kv-head count. No
averaging and no repetition of kv-heads: every entry of every tensor is a real weight update.
"""

from __future__ import annotations

from collections.abc import Sequence

from .factorizations.base import Axis

MODES: tuple[str, ...] = ("heads", "qkv", "experts", "depth")
ALIASES: dict[str, str] = {
    "att": "heads",
    "attention": "heads",
    "layers": "depth",
    "expert": "experts",
    "moe": "experts",
}
#: projections stored transposed so that their model-width side sits on the ``in`` axis
WRITE_PROJECTIONS: frozenset[str] = frozenset({"o", "down", "cross_o", "expert_down"})


def canonical(mode: str) -> str:
    """The canonical name of a mode or alias (``att`` -> ``heads``, ``layers`` -> ``depth``,
    ``moe`` -> ``experts``)."""
    return ALIASES.get(mode, mode)


def tensor_axes(
    modes: Sequence[str],
    n_in: int,
    n_out: int,
    n_heads: int,
    n_projections: int,
    n_layers: int,
    n_experts: int = 0,
) -> tuple[Axis, ...]:
    """Axes of one tensor, in order ``in, out | head_dim, heads, qkv, experts, depth``.

    Args:
        modes: canonical stacking modes.
        n_in: oriented input width (model side).
        n_out: oriented output width (head side).
        n_heads: heads on the head side, 0 when the targets have none (MLP).
        n_projections: projections stacked on ``qkv``.
        n_layers: layers stacked on ``depth``.
        n_experts: experts stacked on ``experts``, 0 when the targets are not expert weights.
    """
    axes = [Axis("in", n_in)]
    if "heads" in modes and n_heads:
        axes += [Axis("head_dim", n_out // n_heads), Axis("heads", n_heads)]
    else:
        axes.append(Axis("out", n_out))
    if "qkv" in modes:
        axes.append(Axis("qkv", n_projections))
    if "experts" in modes and n_experts:
        axes.append(Axis("experts", n_experts))
    if "depth" in modes:
        axes.append(Axis("depth", n_layers))
    return tuple(axes)


def out_side(axes: Sequence[Axis]) -> list[str]:
    """Axis names of the head-structured side in flattening order (heads outer, head_dim inner)."""
    names = [a.name for a in axes]
    return ["heads", "head_dim"] if "heads" in names else ["out"]
