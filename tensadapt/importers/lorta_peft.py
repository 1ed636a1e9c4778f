"""Adapters saved by the LoRTA authors' PEFT tuner (their fork of PEFT, ``peft_type: "LORTA"``).

Their checkpoint (``adapter_config.json`` + ``adapter_model.safetensors``) holds one CP tensor for
the whole model, as five factors on the model object (``tuners/lorta/model.py``)::

    lora_A   [d, r]      lora_C_h [H, r]      lora_C_l [L, r]
    lora_B   [r, d/H]    lora_C_m [4, r]      (rows: q, k, v, o, whatever the targets)

and every module ``m`` of layer ``l`` adds ``scaling · x @ ΔWᵀ`` with
``ΔW[o, h·d/H + j] = Σ_r A[o, r] C_h[h, r] C_m[m, r] C_l[l, r] B[r, j]`` and
``scaling = lora_alpha / r`` (``/ √r`` with ``use_rslora``). The head structure sits on each
matrix's *input* side, for q, k and v as for o: tensadapt's ``orientation: lorta`` with the
contiguous head layout, where the same function is the CP tensor over
``(in, head_dim, heads, qkv, depth)`` with

    U_in = A,  U_head_dim = Bᵀ,  U_heads = C_h,  U_qkv = C_m[rows of the targets],  U_depth = C_l

(:func:`lorta_factor_map`). The classifier and any other ``modules_to_save`` are copied as they
are. ``tests/test_papers.py`` checks the result against outputs of the authors' code.

A foreign or malformed checkpoint raises :class:`~tensadapt.errors.AdapterMismatchError` naming the
file and what is wrong.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AdapterMismatchError, first_line

if TYPE_CHECKING:
    import torch

    from ..planner import Plan

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
#: prefix PEFT's save_pretrained puts before every key
PEFT_PREFIX = "base_model.model."
#: the authors' row of each projection on ``lora_C_m`` (fixed, whatever the targets)
QKVO_ROW: dict[str, int] = {"q": 0, "k": 1, "v": 2, "o": 3}
#: the authors' target_modules names (RoBERTa, LLaMA) -> tensadapt projection
MODULE_TO_PROJ: dict[str, str] = {
    "query": "q",
    "key": "k",
    "value": "v",
    "attention.output.dense": "o",
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
}
FACTOR_KEYS = ("lora_A", "lora_B", "lora_C_h", "lora_C_m", "lora_C_l")
#: modules PEFT saves with a sequence-classification adapter when the config names none
SEQ_CLS_MODULES = ("classifier", "score")


@dataclass(frozen=True)
class LortaCheckpoint:
    """A checkpoint of the authors' tuner, read and checked.

    Attributes:
        source: the directory it was read from.
        config: ``adapter_config.json`` as a dict.
        factors: ``lora_A``, ``lora_B``, ``lora_C_h``, ``lora_C_m``, ``lora_C_l`` (shapes above).
        saved: every other tensor (``modules_to_save``), keyed by its parameter name in the model
            (``classifier.dense.weight``).
    """

    source: str
    config: dict[str, Any]
    factors: dict[str, torch.Tensor]
    saved: dict[str, torch.Tensor]

    @property
    def rank(self) -> int:
        return int(self.factors["lora_A"].shape[1])

    @property
    def scaling(self) -> float:
        """``lora_alpha / r``, or ``/ √r`` with ``use_rslora`` (their ``update_layer``)."""
        alpha = float(self.config.get("lora_alpha", 8))
        r = self.rank
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    @property
    def projections(self) -> tuple[str, ...]:
        """The adapted projections, in tensadapt's order."""
        mods = self.config.get("target_modules") or ()
        return tuple(p for p in ("q", "k", "v", "o") if p in {MODULE_TO_PROJ[m] for m in mods})

    @property
    def modules_to_save(self) -> tuple[str, ...]:
        """Top-level names of the fully trained modules whose tensors the checkpoint holds."""
        return tuple(dict.fromkeys(k.split(".", 1)[0] for k in self.saved))


def _bad(source: str, what: str) -> AdapterMismatchError:
    return AdapterMismatchError(
        f"{source}: not a LoRTA-PEFT checkpoint this importer can read: {what}"
    )


def read_checkpoint(directory: str | os.PathLike[str]) -> LortaCheckpoint:
    """Read and check an adapter directory written by the authors' ``save_pretrained``.

    Raises:
        AdapterMismatchError: a file is missing or unreadable, ``peft_type`` is not ``LORTA``, a
            factor is missing or has an inconsistent shape or non-finite values, a target module
            is not q/k/v/o, or the config uses per-module ranks/alphas (not one CP tensor).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    src = str(d)
    cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise _bad(src, f"no {p.name}")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(src, f"{CONFIG_FILE} is not valid JSON ({first_line(e)})") from None
    if not isinstance(config, dict):
        raise _bad(src, f"{CONFIG_FILE} is not a JSON object")
    if config.get("peft_type") != "LORTA":
        raise _bad(
            src, f"{CONFIG_FILE} has peft_type {config.get('peft_type')!r}, expected 'LORTA'"
        )
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise _bad(src, f"{CONFIG_FILE}: {key} is set; one CP tensor has one rank and scale")
    mods = config.get("target_modules") or []
    if isinstance(mods, str) or not mods:
        raise _bad(
            src, f"{CONFIG_FILE}: target_modules must be a list of module names, got {mods!r}"
        )
    unknown = [m for m in mods if m not in MODULE_TO_PROJ]
    if unknown:
        raise _bad(src, f"target_modules {unknown} are not q/k/v/o ({', '.join(MODULE_TO_PROJ)})")
    try:
        state = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise _bad(src, f"{WEIGHTS_FILE} cannot be read ({first_line(e)})") from None
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}
    missing = [k for k in FACTOR_KEYS if k not in state]
    if missing:
        raise _bad(src, f"{WEIGHTS_FILE} lacks {missing}")
    factors = {k: state.pop(k) for k in FACTOR_KEYS}
    _check_factors(src, factors, config)
    for k, v in state.items():
        if not v.is_floating_point() or not bool(v.isfinite().all()):
            raise _bad(src, f"tensor {k!r} is not finite floating point")
    return LortaCheckpoint(src, config, factors, state)


def _check_factors(src: str, f: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> None:
    a, b, ch, cm, cl = (f[k] for k in FACTOR_KEYS)
    if any(t.dim() != 2 for t in (a, b, ch, cm, cl)):
        raise _bad(src, "every lora_* factor must be a matrix: " + _shapes(f))
    r = a.shape[1]
    if b.shape[0] != r or any(t.shape[1] != r for t in (ch, cm, cl)):
        raise _bad(src, f"factor ranks disagree: {_shapes(f)}")
    if cm.shape[0] != 4:
        raise _bad(src, f"lora_C_m must have 4 rows (q, k, v, o), has {cm.shape[0]}")
    if a.shape[0] != ch.shape[0] * b.shape[1]:
        raise _bad(
            src, f"lora_A rows {a.shape[0]} != heads x head_dim {ch.shape[0]} x {b.shape[1]}"
        )
    if "r" in config and config["r"] != r:
        raise _bad(src, f"{CONFIG_FILE} says r = {config['r']}, the factors have rank {r}")
    for k, t in f.items():
        if not t.is_floating_point() or not bool(t.isfinite().all()):
            raise _bad(src, f"{k} is not finite floating point")


def _shapes(f: Mapping[str, torch.Tensor]) -> str:
    return ", ".join(f"{k} {list(t.shape)}" for k, t in f.items())


def spec_for(ckpt: LortaCheckpoint) -> dict[str, Any]:
    """The tensadapt spec computing the authors' function for this checkpoint.

    ``alpha`` is chosen so that tensadapt's ``alpha / rank`` equals their scaling (also with
    ``use_rslora``); ``init: lorta`` is their initialisation (it matters only to retrain).
    """
    return {
        "name": "lorta-peft-import",
        "factorization": "cp",
        "modes": ["heads", "qkv", "depth"],
        "targets": list(ckpt.projections),
        "rank": ckpt.rank,
        "alpha": ckpt.scaling * ckpt.rank,
        "dropout": float(ckpt.config.get("lora_dropout", 0.0)),
        "orientation": "lorta",
        "head_layout": "contiguous",
        "init": "lorta",
        "modules_to_save": list(ckpt.modules_to_save),
    }


@dataclass(frozen=True)
class FactorSource:
    """Where a tensadapt factor comes from in the authors' checkpoint.

    Attributes:
        key: the authors' factor (``lora_A`` ...).
        transpose: take its transpose (``lora_B [r, d/H]`` -> ``U_head_dim [d/H, r]``).
        rows: the rows to take, in the tensadapt axis order (``None``: all).
    """

    key: str
    transpose: bool = False
    rows: tuple[int, ...] | None = None


def lorta_factor_map(plan: Plan, *, authors_orientation: bool = True) -> dict[str, FactorSource]:
    """The one mapping from the authors' factors to tensadapt's, for a plan in their convention.

    Args:
        plan: a plan of ``factorization: cp``, ``modes: [heads, qkv, depth]``,
            ``orientation: lorta``, contiguous heads, targets among q, k, v, o.
        authors_orientation: require ``orientation: lorta`` (default). ``False`` also accepts
            tensadapt's head-consistent orientation, to compare the two functions on the same
            factors: o is then the same, q, k and v get the transpose of the authors' update.
    Returns:
        tensadapt state key (``"<tensor>.<factor>"``) -> :class:`FactorSource`.
    Raises:
        AdapterMismatchError: the plan is not of that form (another factorization, other modes,
            another orientation or head layout, several tensors, an MLP target).
    """
    spec = plan.spec
    problems = []
    if spec.factorization != "cp":
        problems.append(f"factorization is {spec.factorization!r}, LoRTA is 'cp'")
    if authors_orientation and getattr(spec, "orientation", "head-consistent") != "lorta":
        problems.append(
            "the plan does not use orientation: lorta (the authors' heads sit on the input side of "
            "q, k and v)"
        )
    if getattr(spec, "head_layout", "contiguous") != "contiguous":
        problems.append("the authors' head split is contiguous (head_layout: contiguous)")
    if len(plan.tensors) != 1:
        problems.append(f"expected one CP tensor, the plan has {len(plan.tensors)}")
    axes = [a.name for a in plan.tensors[0].axes] if plan.tensors else []
    if axes != ["in", "head_dim", "heads", "qkv", "depth"]:
        problems.append(f"tensor axes are {axes}, expected in, head_dim, heads, qkv, depth")
    bad = sorted({t.proj for t in plan.targets} - set(QKVO_ROW))
    if bad:
        problems.append(f"targets {bad} are not attention projections q, k, v, o")
    if problems:
        raise AdapterMismatchError("LoRTA-PEFT import: " + "; ".join(problems))
    tp = plan.tensors[0]
    qkv: dict[int, int] = {}
    depth: dict[int, int] = {}
    for t in plan.targets:
        idx = dict(t.index)
        qkv[idx["qkv"]] = QKVO_ROW[t.proj]
        depth[idx["depth"]] = t.layer
    return {
        f"{tp.name}.U_in": FactorSource("lora_A"),
        f"{tp.name}.U_head_dim": FactorSource("lora_B", transpose=True),
        f"{tp.name}.U_heads": FactorSource("lora_C_h"),
        f"{tp.name}.U_qkv": FactorSource("lora_C_m", rows=tuple(qkv[i] for i in sorted(qkv))),
        f"{tp.name}.U_depth": FactorSource("lora_C_l", rows=tuple(depth[i] for i in sorted(depth))),
    }


def convert_state(
    ckpt: LortaCheckpoint, plan: Plan, *, authors_orientation: bool = True
) -> dict[str, torch.Tensor]:
    """The checkpoint as a tensadapt adapter state (what :func:`tensadapt.io.load_adapter_state`
    takes and ``adapter.safetensors`` holds): every factor of ``plan``, plus ``modules_to_save``.

    Args:
        ckpt: the checkpoint (:func:`read_checkpoint`).
        plan: the tensadapt plan (:func:`spec_for` on the same base model).
        authors_orientation: see :func:`lorta_factor_map`.
    Raises:
        AdapterMismatchError: the plan is not in the authors' convention, or a factor's shape does
            not fit it (another model's checkpoint).
    """
    from ..adapterfile import SAVED_PREFIX

    out: dict[str, torch.Tensor] = {}
    shapes = {f"{plan.tensors[0].name}.{f.name}": f.shape for f in plan.tensors[0].factors}
    for key, src in lorta_factor_map(plan, authors_orientation=authors_orientation).items():
        t = ckpt.factors[src.key]
        t = t.t() if src.transpose else t
        if src.rows is not None:
            if max(src.rows) >= t.shape[0]:
                raise AdapterMismatchError(
                    f"{ckpt.source}: {src.key} has {t.shape[0]} rows, the model needs row "
                    f"{max(src.rows)} (another model's checkpoint?)"
                )
            t = t[list(src.rows)]
        if tuple(t.shape) != tuple(shapes[key]):
            raise AdapterMismatchError(
                f"{ckpt.source}: {src.key} gives {key} shape {tuple(t.shape)}, the model needs "
                f"{tuple(shapes[key])} (another model's checkpoint?)"
            )
        out[key] = t.contiguous().clone()
    for name, t in ckpt.saved.items():
        out[f"{SAVED_PREFIX}{name}"] = t.contiguous().clone()
    return out


__all__ = [
    "LortaCheckpoint",
    "FactorSource",
    "convert_state",
    "lorta_factor_map",
    "read_checkpoint",
    "spec_for",
]


def import_checkpoint(
    adapter_dir: str | os.PathLike[str],
    model: Any,
    out: str | os.PathLike[str],
    *,
    seed: int = 0,
) -> Path:
    """Convert an adapter of the authors' tuner into a tensadapt adapter directory.

    Args:
        adapter_dir: the authors' ``save_pretrained`` directory.
        model: the base model the adapter was trained on: a model object, or a local model
            directory / preset (a sequence-classification adapter loads it with a head of the
            checkpoint's label count).
        out: the tensadapt adapter directory to write.
        seed: only for the unused initialisation of the factors before the copy.
    Returns:
        ``out``, loadable by :meth:`tensadapt.TensadaptModel.from_pretrained`.
    Raises:
        AdapterMismatchError: a foreign or malformed checkpoint, or one made for another model.
    """
    from ..io import load_adapter_state, load_base_model
    from ..model import TensadaptModel

    ckpt = read_checkpoint(adapter_dir)
    if isinstance(model, str | os.PathLike):
        model_class = None
        num_labels = None
        if ckpt.config.get("task_type") == "SEQ_CLS":
            model_class = "AutoModelForSequenceClassification"
            heads = [t for k, t in ckpt.saved.items() if k.endswith("weight") and t.dim() == 2]
            num_labels = int(heads[-1].shape[0]) if heads else None
        model = load_base_model(model, model_class=model_class, num_labels=num_labels)
    from ..errors import ArchitectureError, PlanError

    try:
        adapted = TensadaptModel(model, spec_for(ckpt), seed=seed)
    except (PlanError, ArchitectureError) as e:
        raise AdapterMismatchError(
            f"{ckpt.source}: the checkpoint does not fit {type(model).__name__} (made for another "
            f"model?): {first_line(e)}"
        ) from None
    state = convert_state(ckpt, adapted.plan())
    load_adapter_state(adapted.base_model, state, source=ckpt.source)
    return adapted.save_pretrained(out)


__all__ += ["import_checkpoint"]
