"""Training and evaluation behind ``tensadapt train``, ``tensadapt sweep`` and ``tensadapt demo``.

The loop is Hugging Face's :class:`~transformers.Trainer`; this package prepares what it needs and
reports what it did. Data flows one way through its modules:

=============  =================================================================================
module         owns
=============  =================================================================================
``options``    :class:`TrainOptions` and :data:`BOUNDS`, the range of every numeric option
``data``       reading and checking TSV/CSV/JSONL/text files and ``hf:`` datasets
               (:func:`load_task_data`); every problem a :class:`DataError` naming file and line
``tokenizer``  WordPiece / byte-level BPE tokenizers trained on the fly for presets
``models``     the base model: a local directory (pretrained) or a preset (random weights)
``encode``     :func:`prepare`: data checked, tokenizer ready, both splits tokenised
``outdir``     output directories checked and claimed (a lock) before any work
``recipe``     :func:`resolve_recipe`: options over the spec's ``training:`` over defaults;
               the optimizer's parameter groups (adapter / head)
``trainer``    :func:`train`: adapted model, ``TrainingArguments``, callbacks, saving
``tuning``     ``sweep --tune-lr``: Optuna studies per configuration on a validation split
``sweeps``     :func:`sweep`: specs × seeds, resumable, tuned or not; ``results.csv``
``plots``      ``pareto.png``: metric vs parameters with the Pareto front
``demo``       :func:`run_demo`, the README's main job
=============  =================================================================================

Names are imported from their module on first use (PEP 562), so ``import tensadapt.train`` and
the command line's parser (which reads :data:`BOUNDS`) do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the submodule that defines it
_EXPORTS: dict[str, str] = {
    "BOUNDS": "options",
    "OptionError": "options",
    "TrainOptions": "options",
    "MAX_LABELS": "data",
    "DataError": "data",
    "DataOptions": "data",
    "Split": "data",
    "TaskData": "data",
    "load_task_data": "data",
    "read_split": "data",
    "WORDPIECE_FAMILIES": "tokenizer",
    "train_tokenizer": "tokenizer",
    "HEAD_MODULES": "models",
    "build_base_model": "models",
    "is_local_model": "models",
    "load_model_config": "models",
    "Prepared": "encode",
    "prepare": "encode",
    "OutputDirError": "outdir",
    "check_output_dir": "outdir",
    "claim_output_dir": "outdir",
    "RECIPE_DEFAULTS": "recipe",
    "Recipe": "recipe",
    "resolve_recipe": "recipe",
    "TuneError": "tuning",
    "TuneOptions": "tuning",
    "validation_split": "tuning",
    "at_max_length": "encode",
    "FAILED_FILE": "trainer",
    "METRICS_FILE": "trainer",
    "build_adapted_model": "trainer",
    "resolve_spec": "trainer",
    "save_run": "trainer",
    "train": "trainer",
    "training_arguments": "trainer",
    "training_callbacks": "trainer",
    "PARETO_FILE": "sweeps",
    "RESULTS_FILE": "sweeps",
    "RESULT_COLUMNS": "sweeps",
    "SweepError": "sweeps",
    "SweepResult": "sweeps",
    "SweepRun": "sweeps",
    "collect_results": "sweeps",
    "summarize": "sweeps",
    "sweep": "sweeps",
    "pareto_front": "plots",
    "plot_pareto": "plots",
    "run_demo": "demo",
    "shared_data_dir": "demo",
    "synthetic_sentiment": "demo",
}

__all__ = [
    "BOUNDS",
    "RECIPE_DEFAULTS",
    "Recipe",
    "TuneError",
    "TuneOptions",
    "at_max_length",
    "resolve_recipe",
    "validation_split",
    "FAILED_FILE",
    "HEAD_MODULES",
    "MAX_LABELS",
    "METRICS_FILE",
    "PARETO_FILE",
    "RESULTS_FILE",
    "RESULT_COLUMNS",
    "WORDPIECE_FAMILIES",
    "DataError",
    "DataOptions",
    "OptionError",
    "OutputDirError",
    "Prepared",
    "Split",
    "SweepError",
    "SweepResult",
    "SweepRun",
    "TaskData",
    "TrainOptions",
    "build_adapted_model",
    "build_base_model",
    "check_output_dir",
    "claim_output_dir",
    "collect_results",
    "is_local_model",
    "load_model_config",
    "load_task_data",
    "pareto_front",
    "plot_pareto",
    "prepare",
    "read_split",
    "resolve_spec",
    "run_demo",
    "save_run",
    "shared_data_dir",
    "summarize",
    "sweep",
    "synthetic_sentiment",
    "train",
    "train_tokenizer",
    "training_arguments",
    "training_callbacks",
]

if TYPE_CHECKING:
    from .data import (
        MAX_LABELS,
        DataError,
        DataOptions,
        Split,
        TaskData,
        load_task_data,
        read_split,
    )
    from .demo import run_demo, shared_data_dir, synthetic_sentiment
    from .encode import Prepared, at_max_length, prepare
    from .models import HEAD_MODULES, build_base_model, is_local_model, load_model_config
    from .options import BOUNDS, OptionError, TrainOptions
    from .outdir import OutputDirError, check_output_dir, claim_output_dir
    from .plots import pareto_front, plot_pareto
    from .recipe import RECIPE_DEFAULTS, Recipe, resolve_recipe
    from .sweeps import (
        PARETO_FILE,
        RESULT_COLUMNS,
        RESULTS_FILE,
        SweepError,
        SweepResult,
        SweepRun,
        collect_results,
        summarize,
        sweep,
    )
    from .tokenizer import WORDPIECE_FAMILIES, train_tokenizer
    from .trainer import (
        FAILED_FILE,
        METRICS_FILE,
        build_adapted_model,
        resolve_spec,
        save_run,
        train,
        training_arguments,
        training_callbacks,
    )
    from .tuning import TuneError, TuneOptions, validation_split


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tensadapt.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
