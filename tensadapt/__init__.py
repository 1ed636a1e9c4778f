"""tensadapt: tensor-factorized parameter-efficient fine-tuning for Hugging Face transformers.

Data flow: ``load_spec`` → ``plan`` → ``inject`` → train → ``merge`` / ``save_adapter``.
"""

from __future__ import annotations

from .errors import AdapterMismatchError, PlanError, SpecError
from .export import export_peft_lora
from .inject import inject, merge, merge_and_unload, trainable_parameters, unmerge
from .io import load_adapter, save_adapter
from .planner import Plan, plan
from .spec import AdapterSpec, load_spec

__version__ = "0.1.0"

__all__ = [
    "AdapterMismatchError",
    "AdapterSpec",
    "Plan",
    "PlanError",
    "SpecError",
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
