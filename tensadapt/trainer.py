"""Hugging Face ``Trainer`` checkpoints that hold the adapter, not the model.

The stock ``Trainer`` saves a model that is not a ``PreTrainedModel`` as its whole ``state_dict``
(every frozen base weight: a checkpoint the size of the model) and reloads it by key. An
:class:`AdapterTrainer` writes each checkpoint's model part as a tensadapt adapter directory
(``adapter_config.json`` + ``adapter.safetensors``, all-or-nothing, checksummed) and restores it
in place on resume; the optimizer, scheduler, RNG and trainer state are the ``Trainer``'s own
files, so ``trainer.train(resume_from_checkpoint=...)`` continues exactly where the run stopped::

    trainer = AdapterTrainer(model=TensadaptModel(base, spec), args=args, ...)
    trainer.train()                                   # checkpoint-N/ every args.save_steps
    trainer.train(resume_from_checkpoint=True)        # the last checkpoint in args.output_dir

Works with a :class:`~tensadapt.model.TensadaptModel` or a model adapted in place by
:func:`tensadapt.inject`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn
from transformers import Trainer

from .adapterfile import ADAPTER_FILE, AdapterConfig, check_dir, check_records, read_committed
from .errors import AdapterMismatchError
from .inplace import hub_of
from .io import load_adapter_state, save_adapter
from .model import TensadaptModel


def _adapted(model: nn.Module | None) -> nn.Module:
    """The module holding the adapter hub, through DDP/accelerate wrappers."""
    inner: object = model
    for _ in range(4):
        base = inner.base_model if isinstance(inner, TensadaptModel) else inner
        if isinstance(base, nn.Module) and hub_of(base) is not None:
            return base
        inner = getattr(inner, "module", None)
        if inner is None:
            break
    raise AdapterMismatchError(
        f"{type(model).__name__} carries no tensadapt adapter; AdapterTrainer trains adapters "
        "(build the model with TensadaptModel(base, spec))"
    )


def load_checkpoint_into(model: nn.Module | None, directory: str | os.PathLike[str]) -> None:
    """Copy the adapter saved in ``directory`` into ``model``'s active adapter, in place (the
    adapter must have the same plan: resuming the same run). Every tensor is checked first."""
    base = _adapted(model)
    d = check_dir(Path(directory))
    config, state = read_committed(d)
    if state is None:
        raise AdapterMismatchError(f"{d}: no {ADAPTER_FILE} in this checkpoint")
    hub = hub_of(base)
    assert hub is not None and hub.active is not None
    mine = hub.adapter().plan.spec.to_dict()
    if config.get("spec") != mine:
        raise AdapterMismatchError(
            f"{d}: the checkpoint's adapter spec differs from the model's; resume the run it "
            "was saved from"
        )
    check_records(state, AdapterConfig.model_validate(config).tensors, str(d / ADAPTER_FILE))
    load_adapter_state(base, state, source=str(d / ADAPTER_FILE), adapter_name=hub.active)


class AdapterTrainer(Trainer):
    """A ``transformers.Trainer`` whose checkpoints hold the adapter only (see the module doc).

    It also reads the *base* model's forward signature (which columns a batch keeps, which of
    them are labels), as the ``Trainer`` does for PEFT models: a :class:`TensadaptModel`'s own
    forward takes ``**kwargs``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.args.label_names is None:
            from transformers.utils import find_labels

            self.label_names = find_labels(type(_adapted(self.model)))

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            import inspect

            forward = _adapted(self.model).forward
            columns = list(inspect.signature(forward).parameters)
            self._signature_columns = columns + list({"label", "label_ids", *self.label_names})  # type: ignore[assignment]

    def _save(
        self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None
    ) -> None:
        out = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save or out is None:
            return
        base = _adapted(self.model)
        hub = hub_of(base)
        assert hub is not None
        save_adapter(base, out, adapter_name=hub.active)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(out)

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        load_checkpoint_into(model if model is not None else self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is not None:
            load_checkpoint_into(self.model, best)


__all__ = ["AdapterTrainer", "load_checkpoint_into"]
