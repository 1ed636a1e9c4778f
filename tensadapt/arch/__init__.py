"""Architecture adapters: from a config (or model) to layers, heads and target module paths.

``from_config`` reads a ``transformers`` config alone (no weights, microseconds for a 70B config)
through the table of :data:`BUILTIN_FAMILIES`; a ``model_type`` not in the table is built on the
``meta`` device and scanned by module name patterns (:mod:`.scan`). ``from_model`` does the same
from a live model, choosing the layout whose paths exist in it. ``resolve_modules`` then finds
each site's module in a concrete model, whatever its task head prefix.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..errors import ArchitectureError, first_line
from .base import ATTENTION_PROJECTIONS, PROJECTIONS, Architecture, Fused, TargetSite
from .families import BUILTIN_FAMILIES, Family, Layout, family_for, known_model_types
from .presets import PRESETS, load_config, preset_config

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


def from_config(config: Any, families: Iterable[Family] | None = None) -> Architecture:
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

        with torch.device("meta"):
            model = AutoModel.from_config(config)
    except Exception as exc:
        reason = first_line(exc)
        raise ArchitectureError(
            f"model_type {model_type!r} is not a known family "
            f"({', '.join(known_model_types(fams))}) and AutoModel cannot build it to scan "
            f"its modules: {reason}"
        ) from exc
    from .scan import scan_model

    return scan_model(model, config)


def from_model(model: nn.Module, families: Iterable[Family] | None = None) -> Architecture:
    """The :class:`Architecture` of a live model (any device, ``meta`` included).

    A known family (by ``model.config.model_type``) uses the first of its layouts whose layer-0
    paths all exist in ``model``; otherwise, or without a config, module names are scanned.

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

    if family is not None:
        index = ModuleIndex(model)
        for layout in family.layouts:
            if index.has_all(t.format(l=0) for t in layout.paths.values()):
                return family.architecture(config, layout)
    return scan_model(model, config)


__all__ = [
    "ATTENTION_PROJECTIONS",
    "BUILTIN_FAMILIES",
    "PRESETS",
    "PROJECTIONS",
    "RULES",
    "Architecture",
    "Family",
    "Fused",
    "Layout",
    "ModuleIndex",
    "Rule",
    "TargetSite",
    "family_for",
    "from_config",
    "from_model",
    "get_module",
    "known_model_types",
    "load_config",
    "preset_config",
    "resolve_modules",
    "scan_model",
]
