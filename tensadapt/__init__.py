"""tensadapt: tensor-factorized parameter-efficient fine-tuning for Hugging Face transformers.

Data flow: ``load_spec`` → ``plan`` → ``TensadaptModel`` → train → ``merge_and_unload`` /
``save_pretrained``.

Names are imported on first use (PEP 562), so ``import tensadapt`` and the spec commands of the
CLI (``validate``, ``schema``, ``--help``) never import torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "AdapterMismatchError": "errors",
    "PlanError": "errors",
    "SpecError": "errors",
    "AdapterSpec": "spec",
    "AdapterTrainer": "trainer",
    "TensadaptModel": "model",
    "load_spec": "spec",
    "Plan": "planner",
    "plan": "planner",
    "export_peft_lora": "export",
    "inject": "inplace",
    "merge": "inplace",
    "merge_and_unload": "inplace",
    "trainable_parameters": "inplace",
    "unmerge": "inplace",
    "load_adapter": "io",
    "save_adapter": "io",
}

__all__ = [
    "AdapterMismatchError",
    "AdapterSpec",
    "AdapterTrainer",
    "Plan",
    "PlanError",
    "SpecError",
    "TensadaptModel",
    "__version__",
    "export_peft_lora",
    "inject",
    "load_adapter",
    "load_spec",
    "merge",
    "merge_and_unload",
    "plan",
    "save_adapter",
    "trainable_parameters",
    "unmerge",
]

if TYPE_CHECKING:
    from .errors import AdapterMismatchError, PlanError, SpecError
    from .export import export_peft_lora
    from .inplace import inject, merge, merge_and_unload, trainable_parameters, unmerge
    from .io import load_adapter, save_adapter
    from .model import TensadaptModel
    from .planner import Plan, plan
    from .spec import AdapterSpec, load_spec
    from .trainer import AdapterTrainer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tensadapt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
