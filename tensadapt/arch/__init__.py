"""Architecture adapters: from a config (or model) to layers, heads and target module paths.

``from_config`` reads a ``transformers`` config alone (no weights, microseconds for a 70B config)
through the table of :data:`BUILTIN_FAMILIES`; a ``model_type`` not in the table is built on the
``meta`` device and scanned by module name patterns (:mod:`.scan`). ``from_model`` does the same
from a live model, choosing the layout whose paths exist in it. ``resolve_modules`` then finds
each site's module in a concrete model, whatever its task head prefix.

Layer numbering: a model with several layer lists (encoder-decoder, text and vision towers) is
numbered through, the first list's layers first: BART with 6 encoder and 6 decoder layers has
layers 0..5 (encoder) and 6..11 (decoder), and :attr:`Architecture.stacks` records the spans. A
projection has sites only where it exists: ``cross_q``/``cross_k``/``cross_v``/``cross_o`` (the
decoder's cross-attention) in decoder layers, ``expert_*`` in sparse mixture-of-experts layers.
A model holding only some of the lists (``T5EncoderModel``) is numbered over those it has.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..errors import ArchitectureError, first_line
from .base import (
    ATTENTION_PROJECTIONS,
    CROSS_PROJECTIONS,
    EXPERT_PROJECTIONS,
    MLP_PROJECTIONS,
    PROJECTIONS,
    Architecture,
    ExpertWeights,
    Fused,
    StackSpan,
    TargetSite,
    pack,
)
from .families import BUILTIN_FAMILIES, family_for, known_model_types
from .family import Experts, Family, Layout, Stack, Variant
from .presets import PRESETS, load_config, preset_config

if TYPE_CHECKING:
    from transformers import PretrainedConfig

if TYPE_CHECKING:  # torch-bound helpers load on first use: reading a family table needs no torch
    from torch import nn

    from .resolve import ModuleIndex, get_module, resolve_modules
    from .scan import RULES, Rule, scan_model

_LAZY = {
    "ModuleIndex": "resolve",
    "get_module": "resolve",
    "resolve_modules": "resolve",
    "RULES": "scan",
    "Rule": "scan",
    "scan_model": "scan",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tensadapt.arch' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def from_config(config: PretrainedConfig, families: Iterable[Family] | None = None) -> Architecture:
    """The :class:`Architecture` of a ``transformers`` ``PretrainedConfig``, without weights.

    Args:
        config: the config. A known ``model_type`` is read from attributes only; an unknown one
            is instantiated with ``AutoModel.from_config`` on the ``meta`` device (no memory)
            and scanned by module names.
        families: the family table; default: every registered family, the built-in
            :data:`BUILTIN_FAMILIES` and those plugins add (:func:`tensadapt.plugins.families`).

    Raises:
        ArchitectureError: the family is unknown and the model cannot be built or scanned.
    """
    fams = None if families is None else tuple(families)
    model_type = str(getattr(config, "model_type", "") or "")
    family = family_for(model_type, fams)
    if family is not None:
        return family.architecture(config)
    try:
        import torch
        from transformers import AutoModel

        remote = "AutoModel" in (getattr(config, "auto_map", None) or {})
        if not remote and type(config) not in AutoModel._model_mapping:
            # transformers' own error lists every model class it has, which imports all of them
            # (~5 s); the membership test it makes first is a dictionary lookup
            raise ValueError(f"AutoModel has no model class for {type(config).__name__}")
        with torch.device("meta"):
            model = AutoModel.from_config(config)
    except Exception as exc:
        reason = first_line(exc)
        from ..plugins import families as registered

        shown = fams if fams is not None else registered()
        raise ArchitectureError(
            f"model_type {model_type!r} is not a known family (families "
            f"{', '.join(f.name for f in shown)}; {len(known_model_types(fams))} model types, "
            f"listed by tensadapt.arch.known_model_types()) and AutoModel cannot build it to "
            f"scan its modules: {reason}"
        ) from exc
    from .scan import scan_model

    return scan_model(model, config)


def from_model(model: nn.Module, families: Iterable[Family] | None = None) -> Architecture:
    """The :class:`Architecture` of a live model (any device, ``meta`` included).

    A known family (by ``model.config.model_type``) uses the first of its layouts (for this
    config's variant) whose layer-0 paths all exist in ``model``, keeping only the layer lists
    the model has (``T5EncoderModel``: the encoder); otherwise, or without a config, module
    names are scanned.

    Args:
        model: the model.
        families: the family table; default: every registered family (built-ins and plugins).

    Raises:
        ArchitectureError: nothing adaptable is found; the message says what was.
    """
    fams = None if families is None else tuple(families)
    config = getattr(model, "config", None)
    family = family_for(str(getattr(config, "model_type", "") or ""), fams)
    from .resolve import ModuleIndex
    from .scan import scan_model

    if family is not None and config is not None:
        index = ModuleIndex(model)
        fam = family.for_config(config)
        for layout in fam.layouts:
            arch = fam.architecture(config, layout)
            spans = arch.stacks or (StackSpan("", 0, arch.n_layers),)
            present = [
                span.name
                for span in spans
                if index.has_all(s.module for s in arch.sites if s.layer == span.start)
            ]
            if len(present) == len(spans):
                return arch
            if present:
                return fam.architecture(config, layout, stacks=present)
    return scan_model(model, config)


__all__ = [
    "ATTENTION_PROJECTIONS",
    "BUILTIN_FAMILIES",
    "CROSS_PROJECTIONS",
    "EXPERT_PROJECTIONS",
    "MLP_PROJECTIONS",
    "PRESETS",
    "PROJECTIONS",
    "RULES",
    "Architecture",
    "ExpertWeights",
    "Experts",
    "Family",
    "Fused",
    "Layout",
    "ModuleIndex",
    "Rule",
    "Stack",
    "StackSpan",
    "TargetSite",
    "Variant",
    "family_for",
    "from_config",
    "from_model",
    "get_module",
    "known_model_types",
    "load_config",
    "pack",
    "preset_config",
    "resolve_modules",
    "scan_model",
]
