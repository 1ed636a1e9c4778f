"""The base model of a training run: a local model directory (pretrained weights) or a preset
(random weights built from its config); nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ArchitectureError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

#: modules of a task model that are new (randomly initialised) heads and so must be trained
HEAD_MODULES: tuple[str, ...] = ("classifier", "score", "pre_classifier")


def is_local_model(model: str | os.PathLike[str]) -> bool:
    """Whether ``model`` is a local model directory (weights and tokenizer) rather than a preset."""
    from ..arch import PRESETS

    return str(model) not in PRESETS and Path(model).is_dir()


def load_model_config(model: str | os.PathLike[str]) -> Any:
    """The ``transformers`` config of a preset or local model directory (never downloads)."""
    from ..arch import load_config

    return load_config(str(model))


def check_task_model(model: str | os.PathLike[str], config: PretrainedConfig, task: str) -> None:
    """Raise :class:`~tensadapt.errors.ArchitectureError` unless ``transformers`` has a task model
    (sequence classification / causal LM) for this config and it has a text vocabulary.

    Checked from the config alone, before a tokenizer is trained or a weight allocated.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", "?")
    names = (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        if task == "causal-lm"
        else MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    )
    what = "causal-LM" if task == "causal-lm" else "sequence-classification"
    if kind not in names or getattr(config, "vocab_size", None) is None:
        raise ArchitectureError(
            f"--model {model}: transformers has no {what} model for a {kind!r} config (is it a "
            "text model?); tensadapt train needs one"
        )


def build_base_model(
    model: str | os.PathLike[str], config: PretrainedConfig, task: str, num_labels: int, seed: int
) -> torch.nn.Module:
    """The task model: pretrained from a local directory, or random weights from a preset config.

    Args:
        model: a preset name or a local model directory.
        config: its config (from :func:`load_model_config`; a trained tokenizer's special ids set).
        task: ``classification`` (``AutoModelForSequenceClassification`` with ``num_labels``) or
            ``causal-lm`` (``AutoModelForCausalLM``).
        num_labels: classes of the new head (classification).
        seed: seeds the random weights (a preset's whole model, a local model's new head).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    kwargs: dict[str, Any] = {} if task == "causal-lm" else {"num_labels": num_labels}
    if is_local_model(model):
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "newly initialized head" is expected here
        try:
            m = auto.from_pretrained(str(model), local_files_only=True, **kwargs)
        finally:
            hf_logging.set_verbosity(level)
        if getattr(m.config, "pad_token_id", None) is None:
            m.config.pad_token_id = config.pad_token_id
        return m
    cfg = config.__class__.from_dict(config.to_dict())
    if task != "causal-lm":
        cfg.num_labels = num_labels
    return auto.from_config(cfg)
