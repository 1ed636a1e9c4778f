"""Export an adapter for other tools: a standard PEFT LoRA adapter, or full merged weights.

**PEFT LoRA.** A target's update is a slice ``S[in, out]`` of a factorized tensor (see
:meth:`~tensadapt.nn.TensorAdapter.delta_slice`). With the stacked axes (qkv, depth) indexed away,
the factors of a slice form a small network whose input legs and output legs are joined through a
few bonds; cutting those bonds writes ``S = A·Bᵀ`` exactly, with ``A[in, r]`` the contraction of
the input-side factors and ``B[out, r]`` that of the output-side ones. The cut is found from the
network's legs, so it works for every format that has one (and for plugins):

- ``lora``: ``A``, ``B`` themselves (rank r);
- ``cp`` (LoRTA): ``A = U_in``, ``B = (U_head_dim ⊙ U_heads)·diag(Π sliced rows)`` (rank r);
- ``tucker`` (TensLoRA): ``A = U_in``, ``B`` = the core contracted with the other factors (rank
  ``r_in``, or the smaller output-side bond when that is smaller);
- ``tt``: cutting the bond next to the ``in`` core (rank of that bond).

``mpo`` splits both ``in`` and ``out`` across every core, so no bond separates them: it is exported
only through a truncated SVD of ``S`` at a requested ``rank``, and the relative error is reported
(without ``rank`` the export is refused). A requested ``rank`` below a target's exact rank
likewise truncates by SVD and reports the error.

The scaling (``alpha / r``) is folded into ``B`` and the PEFT config is written with
``lora_alpha == r`` (per-target ``rank_pattern``/``alpha_pattern`` where ranks differ), so PEFT's
own scale is 1. Target module names are the model's full module names, as PEFT matches them.

GPT-2's fused ``c_attn`` holds q, k and v as three column blocks of one module, and PEFT can put
only one LoRA on a module: its targets are exported as one combined LoRA whose ``B`` stacks the
three blocks (block-diagonal in the rank), rank ``r_q + r_k + r_v`` -- exact; when all targets of
the module share the same ``A`` (LoRA with ``qkv``, CP, Tucker) the rank is that shared ``A``'s.

**Merged.** :func:`export_merged` writes ``base + update`` as ordinary weights with
``save_pretrained`` (safetensors), loadable by ``from_pretrained`` with no tensadapt installed.

The exported adapter is a LoRA of the *same base model* the tensadapt adapter was trained on:
load it on that base (same weights), or the result is meaningless.
"""

from __future__ import annotations

import copy
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import contract, fused
from .atomic import atomic_write
from .errors import ExportError
from .inplace import adapted_modules, get_adapter, hub_of, merge_and_unload, saved_modules
from .io import load_base_model
from .nn import AdaptedLinear, TensorAdapter
from .planner import TargetPlan

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class TargetExport:
    """How one target was exported.

    Attributes:
        key: the target (``q.3``).
        module: the full module name in the model.
        rank: the rank of its LoRA.
        exact: whether ``A·Bᵀ`` equals the update (up to float rounding).
        rel_error: ``‖S − A·Bᵀ‖_F / ‖S‖_F`` (0 when exact; ``0`` for a zero update).
    """

    key: str
    module: str
    rank: int
    exact: bool
    rel_error: float


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_peft_lora` wrote.

    Attributes:
        directory: the output directory.
        targets: one entry per target.
        module_ranks: full module name -> rank of its (possibly combined) LoRA.
    """

    directory: Path
    targets: tuple[TargetExport, ...]
    module_ranks: dict[str, int] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        return all(t.exact for t in self.targets)

    @property
    def max_rel_error(self) -> float:
        return max((t.rel_error for t in self.targets), default=0.0)

    def __str__(self) -> str:
        ranks = Counter(self.module_ranks.values())
        shown = ", ".join(f"{n}x r={r}" for r, n in sorted(ranks.items()))
        head = f"wrote a PEFT LoRA adapter to {self.directory}: {len(self.module_ranks)} modules ({shown})"
        if self.exact:
            return head + "; exact (every update is exactly low rank)"
        worst = max(self.targets, key=lambda t: t.rel_error)
        return (
            head + f"; truncated SVD: max relative error {worst.rel_error:.3e} "
            f"(target {worst.key}), mean "
            f"{sum(t.rel_error for t in self.targets) / len(self.targets):.3e}"
        )


# -- exact low-rank form of one target --------------------------------------------------------


def _legs(adapter: TensorAdapter, t: TargetPlan) -> tuple[list[str], list[str], list[list[str]]]:
    """The target's input legs, output legs and each factor's legs once sliced (plan order)."""
    tp = adapter.plan.tensor(t.tensor)
    return list(t.x_legs), list(t.y_legs), [list(t.sliced_legs(f)) for f in tp.factors]


def _contract(
    ops: Sequence[torch.Tensor], legs: Sequence[Sequence[str]], out: Sequence[str]
) -> torch.Tensor:
    run = contract.contraction(legs, out, [tuple(o.shape) for o in ops])
    return run(*ops)


def exact_lowrank(
    adapter: TensorAdapter, t: TargetPlan
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The target's update as ``S = A·Bᵀ`` exactly, or ``None`` when no bond cut separates them.

    Two cuts are tried -- the input-side factors against the rest, and the output-side factors
    against the rest -- and the one with the smaller rank (product of the cut bonds) is kept.
    Computed in float64.

    Args:
        adapter: the model's adapter.
        t: one of its targets.
    Returns:
        ``(A[in_features, r], B[out_features, r])`` with the scaling folded into ``B``, or ``None``.
    """
    x_legs, y_legs, flegs = _legs(adapter, t)
    tp = adapter.plan.tensor(t.tensor)
    ops = [o.detach().double() for o in adapter.factor_operands(t, [f.name for f in tp.factors])]
    sizes = dict(tp.leg_sizes)
    best: tuple[int, list[int], list[int], list[str]] | None = None
    for side in (set(x_legs), set(y_legs)):
        g1 = [i for i, ls in enumerate(flegs) if side & set(ls)]
        g2 = [i for i in range(len(flegs)) if i not in g1]
        legs1 = {leg for i in g1 for leg in flegs[i]}
        legs2 = {leg for i in g2 for leg in flegs[i]}
        if (legs1 & set(x_legs)) and (legs1 & set(y_legs)):
            continue  # one factor group holds both sides: no cut here
        if not g2:
            continue
        cut = sorted(legs1 & legs2 - set(x_legs) - set(y_legs))
        rank = 1
        for leg in cut:
            rank *= sizes[leg]
        if side == set(y_legs):
            g1, g2 = g2, g1  # keep g1 on the input side
        if best is None or rank < best[0]:
            best = (rank, g1, g2, cut)
    if best is None:
        return None
    rank, g1, g2, cut = best
    a = _contract([ops[i] for i in g1], [flegs[i] for i in g1], [*x_legs, *cut])
    b = _contract([ops[i] for i in g2], [flegs[i] for i in g2], [*y_legs, *cut])
    a = a.reshape(t.in_features, rank)
    b = b.reshape(t.out_features, rank) * adapter.scaling
    return a, b


def lowrank(
    adapter: TensorAdapter, t: TargetPlan, rank: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A[in, r], B[out, r], relative error)`` for one target, in float64.

    Exact when the format has a bond cut and ``rank`` is ``None`` or at least the exact rank;
    otherwise a truncated SVD of the update at ``rank``.

    Raises:
        ExportError: no exact form and no ``rank`` given.
    """
    ex = exact_lowrank(adapter, t)
    if ex is not None and (rank is None or rank >= ex[0].shape[1]):
        return ex[0], ex[1], 0.0
    fmt = adapter.plan.spec.factorization
    if rank is None:
        raise ExportError(
            f"target {t.key}: a {fmt!r} update is not exactly low rank in a way a LoRA can hold "
            "(no bond separates its input and output sides); pass rank=R (CLI: --rank R) to "
            "export a truncated SVD at rank R -- the relative error is reported"
        )
    s = adapter.delta_slice(t).detach().double()
    u, sv, vh = torch.linalg.svd(s, full_matrices=False)
    r = min(rank, sv.numel())
    a = u[:, :r] * sv[:r]
    b = vh[:r].t()
    total = float(sv.square().sum())
    err = float(sv[r:].square().sum() / total) ** 0.5 if total > 0 else 0.0
    return a, b, err


# -- PEFT LoRA -----------------------------------------------------------------------------------


def _check_exportable(adapter: TensorAdapter) -> None:
    spec = adapter.plan.spec
    if spec.residual != "none":
        raise ExportError(
            f"the adapter has a {spec.residual!r} residual (init {spec.init!r}): its base "
            "weights were replaced by W0 - init, so a LoRA on the original base model would be "
            "wrong; export full weights instead (--to merged)"
        )
    if spec.base != "fp":
        raise ExportError(
            f"the adapter keeps its base weights as {spec.base!r}; export full weights instead "
            "(--to merged) or quantize the base yourself"
        )


def _module_factors(
    module: AdaptedLinear, adapter: TensorAdapter, rank: int | None, name: str
) -> tuple[torch.Tensor, torch.Tensor, list[TargetExport]]:
    """``(lora_A [r, in], lora_B [out, r])`` for one module (several targets for fused modules)."""
    parts = []
    reports = []
    hub = hub_of_module(module)
    for t in module.adapter_targets[hub]:
        a, b, err = lowrank(adapter, t, rank)
        parts.append((t, a, b))
        reports.append(TargetExport(t.key, name, a.shape[1], err == 0.0, err))
    n_out = module.out_width
    if len(parts) == 1 and parts[0][0].fused is None:
        _, a, b = parts[0]
        return a.t(), b, reports
    shared = all(p[1].shape == parts[0][1].shape and torch.equal(p[1], parts[0][1]) for p in parts)
    if shared:  # one A for every block: B just places the blocks at their rows
        a_full = parts[0][1].t()
        b_full = fused.place([(t.fused, b) for t, _, b in parts], n_out, dim=0)
    else:  # block-diagonal in the rank: rank = sum of ranks
        a_full = torch.cat([a.t() for _, a, _ in parts], dim=0)
        total = a_full.shape[0]
        pieces = []
        col = 0
        for t, _, b in parts:
            wide = b.new_zeros(b.shape[0], total)
            wide[:, col : col + b.shape[1]] = b
            pieces.append((t.fused, wide))
            col += b.shape[1]
        b_full = fused.place(pieces, n_out, dim=0)
    reports = [
        TargetExport(r.key, r.module, a_full.shape[0], r.exact, r.rel_error) for r in reports
    ]
    return a_full, b_full, reports


def export_peft_lora(
    model: nn.Module,
    directory: str | os.PathLike[str],
    rank: int | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> ExportReport:
    """Write the model's adapter as a standard PEFT LoRA adapter.

    ``directory`` gets ``adapter_config.json`` and ``adapter_model.safetensors``;
    ``peft.PeftModel.from_pretrained(base_model, directory)`` then reproduces the adapted model
    (same base model, same weights). ``modules_to_save`` are written too.

    Args:
        model: a model with a tensadapt adapter (not merged).
        directory: output directory (created if needed; files replaced atomically).
        rank: ``None`` for the exact export (refused for formats without an exact low-rank form,
            e.g. ``mpo``); an int caps every target's rank, truncating by SVD where the exact
            rank is larger (the error is in the report).
        dtype: dtype of the written tensors (default: the factors' dtype).
    Returns:
        an :class:`ExportReport` (ranks, exactness, relative errors).
    Raises:
        ExportError: the adapter cannot be exported this way (and why); peft is not installed.
    """
    try:
        import peft
    except ImportError:
        raise ExportError("exporting to PEFT needs the peft package: pip install peft") from None
    from safetensors.torch import save_file

    if rank is not None and rank < 1:
        raise ExportError(f"rank must be >= 1, got {rank}")
    adapter = get_adapter(model)
    _check_exportable(adapter)
    mods = adapted_modules(_unwrap(model))
    if any(m.merged for _, m in mods):
        raise ExportError("the adapter is merged into the base weights; unmerge(model) first")
    ref = next(iter(adapter.parameters()), None)
    out_dtype = dtype or (ref.dtype if ref is not None else torch.float32)
    tensors: dict[str, torch.Tensor] = {}
    targets: list[TargetExport] = []
    ranks: dict[str, int] = {}
    conv1d = False
    active = _active(model)
    for name, m in mods:
        if active not in m.adapter_targets:
            continue
        if not isinstance(m, AdaptedLinear):
            raise ExportError(
                f"{name}: mixture-of-experts targets live in stacked 3-D weights, which a PEFT LoRA "
                "adapter cannot hold; export full weights instead (--to merged)"
            )
        a, b, reps = _module_factors(m, adapter, rank, name)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(out_dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.to(out_dtype).contiguous()
        ranks[name] = a.shape[0]
        targets += reps
        conv1d |= m.layout == "conv1d"
    for n, sm in saved_modules(_unwrap(model)):
        if active in sm.copies:
            for pn, p in sm.copies[active].named_parameters():
                tensors[f"base_model.model.{n}.{pn}"] = p.detach().cpu().contiguous()
    common = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    pattern = {n: r for n, r in ranks.items() if r != common}
    config = peft.LoraConfig(
        r=common,
        lora_alpha=common,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=list(ranks),
        lora_dropout=float(adapter.plan.spec.dropout),
        fan_in_fan_out=conv1d,
        bias="none",
        modules_to_save=list(adapter.plan.spec.modules_to_save) or None,
        base_model_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None)
        or None,
    )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().cpu() for k, v in tensors.items()}
    atomic_write(out / PEFT_WEIGHTS, lambda tmp: save_file(cpu, tmp, metadata={"format": "pt"}))
    config_dict = {
        k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()
    }  # as peft's own save_pretrained writes it (sets as lists)
    config_text = json.dumps(config_dict, indent=2, sort_keys=True, default=str)
    atomic_write(out / PEFT_CONFIG, lambda tmp: Path(tmp).write_text(config_text, encoding="utf-8"))
    return ExportReport(out, tuple(targets), ranks)


# -- merged ----------------------------------------------------------------------------------------


def export_merged(
    model: nn.Module, directory: str | os.PathLike[str], *, inplace: bool = False
) -> Path:
    """Write ``base + update`` as full weights with ``save_pretrained`` (safetensors).

    The result loads with ``<ModelClass>.from_pretrained(directory)`` and needs no tensadapt.

    Args:
        model: a ``transformers`` model with a tensadapt adapter.
        directory: output directory.
        inplace: merge and unload ``model`` itself (saves memory for large models); by default a
            copy is merged and ``model`` is left as it was.
    Returns:
        the directory.
    Raises:
        ExportError: the model cannot ``save_pretrained``.
    """
    get_adapter(model)
    if not hasattr(_unwrap(model), "save_pretrained"):
        raise ExportError(
            f"{type(model).__name__} has no save_pretrained(); merge_and_unload(model) and save "
            "its state_dict with safetensors yourself"
        )
    target: Any = _unwrap(model) if inplace else _copy(_unwrap(model))
    merge_and_unload(target)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    target.save_pretrained(str(out))
    return out


def _copy(model: nn.Module) -> Any:
    return copy.deepcopy(model)


def _unwrap(model: nn.Module) -> nn.Module:
    from .model import TensadaptModel

    return model.base_model if isinstance(model, TensadaptModel) else model


def _active(model: nn.Module) -> str:
    hub = hub_of(_unwrap(model))
    assert hub is not None and hub.active is not None
    return hub.active


def hub_of_module(module: AdaptedLinear) -> str:
    """The active adapter's name, as seen by one wrapped module."""
    active = module.hub.active
    assert active is not None
    return active


__all__ = [
    "ExportReport",
    "TargetExport",
    "exact_lowrank",
    "load_base_model",
    "export_merged",
    "export_peft_lora",
    "lowrank",
]
