"""New heads: modules a checkpoint did not have, which an adapter must train and save.

``from_pretrained`` initialises fresh whatever its checkpoint lacks (the ``MISSING`` keys of its
load report: a new classifier, a new LM head) and marks every loaded parameter
``_is_hf_initialized``; a frozen fresh head would make training useless and a reload random, so
:func:`with_new_modules` adds such modules to a spec's ``modules_to_save`` (with a
:class:`NewModulesWarning`), as PEFT's task types do.
"""

from __future__ import annotations

import warnings

from torch import nn

from .spec import AdapterSpec

#: the base-model attribute holding the adapters (never a new head itself)
_HUB_ATTR = "tensadapt_adapters"


class NewModulesWarning(UserWarning):
    """Modules the checkpoint did not have (a new head) are trained and saved with the adapter."""


def new_modules(model: nn.Module) -> list[str]:
    """Modules whose weights ``from_pretrained`` initialised fresh (not in the checkpoint): a new
    classifier or LM head. For a model built from a config (nothing loaded), the task heads
    outside the backbone whose output width is ``config.num_labels`` (classification heads)."""
    params = dict(model.named_parameters())
    loaded = any(getattr(p, "_is_hf_initialized", False) for p in params.values())
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    has_backbone = bool(prefix) and isinstance(getattr(model, prefix, None), nn.Module)

    def owner(name: str) -> str:
        parts = name.split(".")
        if has_backbone and parts[0] == prefix:
            return ".".join(parts[:2])
        return parts[0]

    found: dict[str, None] = {}
    if loaded:
        for name, p in params.items():
            if not getattr(p, "_is_hf_initialized", False) and not name.startswith(_HUB_ATTR):
                found[owner(name)] = None
        return list(found)
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if not has_backbone or not isinstance(num_labels, int):
        return []
    backbone = {id(p) for p in getattr(model, prefix).parameters()}
    for name, mod in model.named_children():
        if name in (prefix, _HUB_ATTR):
            continue
        linears = [m for m in mod.modules() if isinstance(m, nn.Linear)]
        own = [p for p in mod.parameters() if id(p) not in backbone]
        if own and linears and linears[-1].out_features == num_labels:
            found[name] = None
    return list(found)


def with_new_modules(spec: AdapterSpec, model: nn.Module, targeted: set[str]) -> AdapterSpec:
    """``spec`` with the model's fresh modules added to ``modules_to_save`` (and a warning)."""
    fresh = [
        n
        for n in new_modules(model)
        if not any(n == s or n.endswith("." + s) for s in spec.modules_to_save)
        and not any(t == n or t.startswith(n + ".") for t in targeted)
    ]
    if not fresh:
        return spec
    warnings.warn(
        f"{', '.join(fresh)}: newly initialised (not in the checkpoint) and not in the spec's "
        "modules_to_save; tensadapt trains them and saves them with the adapter. Name them in "
        "modules_to_save to silence this.",
        NewModulesWarning,
        stacklevel=3,
    )
    return spec.model_copy(update={"modules_to_save": (*spec.modules_to_save, *fresh)})


__all__ = ["NewModulesWarning", "new_modules", "with_new_modules"]
