"""The adapted model: :class:`TensadaptModel`, a ``PeftModel``-style object over a Hugging Face
model (built on the in-place layer of :mod:`tensadapt.inplace`, whose functions it re-exports).

Build one from a base model and a spec, train it with any loop, the HF ``Trainer``, accelerate,
DDP/FSDP or ``torch.compile``; ``save_pretrained`` / ``from_pretrained`` the adapter; hold several
named adapters and switch between them; ``merge_and_unload`` for serving::

    model = TensadaptModel(base, "specs/lorta.yaml")           # or add_adapter(name, spec)
    model.print_trainable_parameters()
    ...train...
    model.save_pretrained("out/adapter")                       # adapter_config.json + adapter.safetensors
    model = TensadaptModel.from_pretrained(base, "out/adapter")
    with model.disable_adapter():
        base_logits = model(**batch).logits
    merged = model.merge_and_unload()                          # a plain transformers model

The factors live inside the base model (an :class:`~tensadapt.nn.AdapterHub` registered as
``tensadapt_adapters``), so ``model.parameters()`` of either object holds them; the object's
forward opens the executor's per-forward frame (:mod:`tensadapt.executor`). The functions of the
first API (:func:`inject`, :func:`merge`, :func:`unmerge`, :func:`merge_and_unload`) change a model
in place and keep working: such a model computes the same outputs, without the frame's sharing.
A model carrying an adapter refuses the HF ``save_pretrained``, which would lose the adapter, and
says what to call instead.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from . import inplace
from .errors import PlanError
from .executor import Frame
from .heads import NewModulesWarning, new_modules
from .inplace import *  # noqa: F403  (the in-place layer's names, re-exported: see __all__)
from .inplace import (
    DEFAULT_ADAPTER,
    HUB_ATTR,
    SpecLike,
    _checkpointing,
    _remove,
    _set_trainable,
    _unguard_hf_save,
    adapted_modules,
    attach,
    hub_of,
    merge,
    merge_and_unload,
    unmerge,
)
from .nn import AdapterHub, TensorAdapter
from .planner import Plan


# -- the model object ----------------------------------------------------------------------------
class TensadaptModel(nn.Module):
    """A Hugging Face model with tensadapt adapters, in the spirit of ``peft.PeftModel``.

    Args:
        model: the base model (changed in place: its targets are wrapped).
        spec: the first adapter's spec (or plan); ``None`` to add adapters later.
        adapter_name: that adapter's name.
        seed: seed of its initialisation.

    Attributes not defined here (``config``, ``generate``, ``gradient_checkpointing_enable`` …)
    are the base model's.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: SpecLike | None = None,
        adapter_name: str = DEFAULT_ADAPTER,
        *,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.base_model = model
        if spec is not None:
            attach(model, spec, adapter_name, seed=seed)

    # -- delegation --------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        """The base model (adapted in place), as ``PeftModel.get_base_model`` returns it."""
        return self.base_model

    @property
    def hub(self) -> AdapterHub:
        hub = hub_of(self.base_model)
        if hub is None:
            raise PlanError("this model has no adapter; add_adapter(name, spec) first")
        return hub

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: object) -> Any:
        """The base model's forward, with the executor's per-forward frame open (no frame under
        gradient checkpointing, whose recomputation must repeat the forward's own operations)."""
        hub = hub_of(self.base_model)
        if hub is None or hub.frame is not None or _checkpointing(self.base_model):
            return self.base_model(*args, **kwargs)
        hub.frame = Frame()
        try:
            return self.base_model(*args, **kwargs)
        finally:
            hub.frame = None

    def generate(self, *args: Any, **kwargs: object) -> Any:
        """``base_model.generate`` with one frame for the whole generation (no gradients, the
        factors do not change, so the ``P`` matrices are built once)."""
        hub = hub_of(self.base_model)
        generate = getattr(self.base_model, "generate")  # noqa: B009  (a PreTrainedModel's)
        if hub is None or hub.frame is not None:
            return generate(*args, **kwargs)
        hub.frame = Frame()
        try:
            return generate(*args, **kwargs)
        finally:
            hub.frame = None

    # -- adapters ------------------------------------------------------------------------------------
    @property
    def active_adapter(self) -> str | None:
        return self.hub.active

    @property
    def adapter_names(self) -> list[str]:
        hub = hub_of(self.base_model)
        return list(hub.adapters) if hub is not None else []

    def adapter(self, name: str | None = None) -> TensorAdapter:
        """The :class:`TensorAdapter` called ``name`` (default: the active one)."""
        return self.hub.adapter(name)

    def plan(self, name: str | None = None) -> Plan:
        """The plan of adapter ``name`` (default: the active one)."""
        return self.adapter(name).plan

    def add_adapter(self, name: str, spec: SpecLike, *, seed: int | None = None) -> TensorAdapter:
        """Add another adapter on the same base; the active one stays active."""
        return attach(self.base_model, spec, name, seed=seed)

    def set_adapter(self, name: str) -> None:
        """Make ``name`` the active adapter: the forward uses it and only its factors train."""
        hub = self.hub
        hub.adapter(name)
        merged = {m.merged_adapter for _, m in adapted_modules(self.base_model) if m.merged_adapter}
        if merged and merged != {name}:
            raise PlanError(
                f"adapter {sorted(merged)[0]!r} is merged into the weights; unmerge_adapter() "
                f"before switching to {name!r}"
            )
        hub.active = name
        _set_trainable(self.base_model, hub)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (its wrappers go when no adapter needs them)."""
        hub = self.hub
        hub.adapter(name)
        _remove(self.base_model, hub, name)
        if not hub.adapters:
            delattr(self.base_model, HUB_ATTR)
            _unguard_hf_save(self.base_model)
        else:
            _set_trainable(self.base_model, hub)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes the base model's outputs (original heads too)."""
        hub = self.hub
        merged = [m for _, m in adapted_modules(self.base_model) if m.merged]
        names = {m: m.merged_adapter for m in merged}
        for m in merged:
            m.unmerge()
        hub.enabled = False
        try:
            yield
        finally:
            hub.enabled = True
            for m, n in names.items():
                m.merge(n)

    def merge_adapter(self) -> None:
        """Merge the active adapter into the base weights (undo with :meth:`unmerge_adapter`)."""
        merge(self.base_model)

    def unmerge_adapter(self) -> None:
        unmerge(self.base_model)

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapter and return the plain base model (wrappers and adapters gone)."""
        return merge_and_unload(self.base_model)

    def unload(self) -> nn.Module:
        """Return the plain base model without merging (every adapter dropped)."""
        return merge_and_unload(self.base_model, merge_weights=False)

    # -- counts -----------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts (each shared tensor once)."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    # -- files -----------------------------------------------------------------------------------------
    def save_pretrained(
        self, directory: str | os.PathLike[str], selected_adapters: list[str] | None = None
    ) -> Path:
        """Save adapters: the default one (or the only one) in ``directory``, others in
        ``directory/<name>`` (as PEFT does). Each is ``adapter_config.json`` (spec, base model,
        checksums) + ``adapter.safetensors``; see :mod:`tensadapt.io`."""
        from .io import save_adapter

        out = Path(directory)
        names = selected_adapters or self.adapter_names
        for n in names:
            where = out if (n == DEFAULT_ADAPTER or len(names) == 1) else out / n
            save_adapter(self.base_model, where, adapter_name=n)
        return out

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module | str | os.PathLike[str],
        directory: str | os.PathLike[str],
        adapter_name: str = DEFAULT_ADAPTER,
        *,
        is_trainable: bool = False,
    ) -> TensadaptModel:
        """A base model (or its path: loaded with the class and label count the adapter was
        trained with) with the saved adapter loaded; frozen unless ``is_trainable``."""
        from .io import load_adapter, load_base_model

        base = load_base_model(model, directory) if isinstance(model, str | os.PathLike) else model
        obj = cls(base)
        load_adapter(obj.base_model, directory, adapter_name=adapter_name)
        if not is_trainable:
            for p in obj.parameters():
                p.requires_grad_(False)
        return obj

    def load_adapter(
        self, directory: str | os.PathLike[str], adapter_name: str, *, is_trainable: bool = False
    ) -> TensorAdapter:
        """Load a saved adapter under ``adapter_name`` next to the ones already here."""
        from .io import load_adapter

        load_adapter(self.base_model, directory, adapter_name=adapter_name)
        if not is_trainable:
            for p in self.hub.adapter(adapter_name).parameters():
                p.requires_grad_(False)
        return self.hub.adapter(adapter_name)


#: the in-place layer's names (re-exported: imports from ``tensadapt.model`` keep working) and
#: the object's own
__all__ = [*inplace.__all__, "NewModulesWarning", "TensadaptModel", "new_modules"]
