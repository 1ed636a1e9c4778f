"""One training run through the Hugging Face :class:`~transformers.Trainer`: :func:`train`.

The loop is the Trainer's (devices, mixed precision, gradient accumulation, schedules); this
module prepares what it needs and reports what it did. Each step has exactly one function, so a
caller (or a later feature) changes one place:

- :func:`build_adapted_model` -- the base model plus the adapter (the new head trained and saved);
- :func:`training_arguments` -- ``TrainingArguments`` from a :class:`TrainOptions`;
- :func:`training_callbacks` -- progress bar, NaN/inf and divergence checks, the caller's own;
- :func:`save_run` -- the adapter, the resolved spec and ``metrics.json`` (written last: a
  directory with a ``metrics.json`` holds a finished run, which is what ``sweep`` trusts).

A run that diverges (:class:`~tensadapt.errors.DivergenceError`) or turns non-finite
(:class:`~tensadapt.errors.NonFiniteError`) saves no adapter and no ``metrics.json``; its output
directory gets ``failed.json`` (the error) instead.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    EvalPrediction,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from ..atomic import atomic_write
from ..deps import require
from ..errors import DivergenceError, NonFiniteError
from ..inplace import get_adapter, merge, trainable_parameters, unmerge
from ..io import save_adapter
from ..model import TensadaptModel
from ..numerics import DivergenceCallback, FiniteCheckCallback
from ..spec import AdapterSpec, load_spec, spec_to_yaml
from ..trainer import AdapterTrainer
from .checkpoints import KeepTexts, checkpoints_of, resume_checkpoint
from .encode import Example, Prepared, at_max_length
from .models import HEAD_MODULES, build_base_model, is_local_model
from .options import OptionError, TrainOptions
from .outdir import RUN_FILES, Claim, claim_output_dir
from .recipe import RECIPE_DEFAULTS, SCHEDULES, Recipe, param_groups, resolve_recipe

METRICS_FILE = "metrics.json"
FAILED_FILE = "failed.json"
RESOLVED_SPEC_FILE = "resolved_spec.yaml"


class ProgressCallback(TrainerCallback):
    """A tqdm bar with the last loss and training tokens/s (non-padding tokens).

    Args:
        desc: the bar's label (the spec's name).
        enabled: ``False``: no bar (the callback still tracks the last loss).
    """

    def __init__(self, desc: str, enabled: bool = True) -> None:
        self.desc = desc
        self.enabled = enabled
        self.bar: Any = None
        self.t0 = 0.0
        self.loss = math.nan

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: object
    ) -> None:
        from tqdm.auto import tqdm

        self.t0 = time.perf_counter()
        if self.enabled:
            self.bar = tqdm(total=state.max_steps, desc=self.desc, unit="step", leave=True)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kw: object,
    ) -> None:
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{self.loss:.4f}", tok_s=self._rate(state))

    def _rate(self, state: TrainerState) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return f"{(getattr(state, 'num_input_tokens_seen', 0) or 0) / dt:,.0f}"

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: object
    ) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: object
    ) -> None:
        if self.bar is not None:
            self.bar.close()


class ExampleDataset(torch.utils.data.Dataset[Example]):
    """Tokenised examples as a map-style torch dataset (what the Trainer's type expects)."""

    def __init__(self, items: Sequence[Example]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Example:
        return self.items[i]


class RecipeTrainer(AdapterTrainer):
    """The :class:`~tensadapt.trainer.AdapterTrainer` (checkpoints hold the adapter; exact resume)
    with the recipe's parameter groups: the adapter's factors at ``lr`` and ``weight_decay``, the
    modules trained in full (a new head) at ``head_lr`` and ``head_weight_decay`` (see
    :func:`~tensadapt.train.recipe.param_groups`); the scheduler scales every group alike.

    Args:
        recipe: a resolved recipe's options (:attr:`~tensadapt.train.recipe.Recipe.opts`).
    """

    def __init__(self, *args: Any, recipe: TrainOptions, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.recipe = recipe

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            m = self.model if model is None else model
            assert m is not None
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args)
            adapter = list(get_adapter(m).parameters())
            groups = param_groups(m, adapter, self.recipe, self.get_decay_parameter_names(m))
            self.optimizer = cls(groups, **kwargs)
        return super().create_optimizer(model)


def as_spec(spec: AdapterSpec | Mapping[str, Any] | str | os.PathLike[str]) -> AdapterSpec:
    """A spec object from a spec, a mapping or a path (see :func:`~tensadapt.load_spec`)."""
    if isinstance(spec, AdapterSpec):
        return spec
    return load_spec(spec if isinstance(spec, Mapping) else Path(spec))


def resolve_spec(spec: AdapterSpec, model: torch.nn.Module, task: str) -> AdapterSpec:
    """``spec`` with the task model's new head (``classifier``/``score``) in ``modules_to_save``."""
    if task == "causal-lm":
        return spec
    top = {n for n, _ in model.named_children()}
    heads = [h for h in HEAD_MODULES if h in top and h not in spec.modules_to_save]
    if not heads:
        return spec
    d = spec.to_dict()
    d["modules_to_save"] = [*spec.modules_to_save, *heads]
    return load_spec(d)


def check_spec_dependencies(spec: AdapterSpec) -> None:
    """Raise :class:`~tensadapt.errors.MissingDependencyError` when the spec needs an extra."""
    if "nf4" in (spec.base, spec.residual):
        require("bitsandbytes", f"spec {spec.name or spec.factorization!r} (NF4 weights)")


def build_adapted_model(
    spec: AdapterSpec, prepared: Prepared, seed: int
) -> tuple[torch.nn.Module, AdapterSpec]:
    """The base model of ``prepared`` with ``spec``'s adapter on it, ready to train: a
    :class:`~tensadapt.model.TensadaptModel` (its forward shares the per-forward work).

    The task model's new head is added to ``modules_to_save`` (trained and saved with the
    adapter). The only place a training run builds its model.

    Returns:
        ``(model, resolved spec)``.
    """
    check_spec_dependencies(spec)
    base = build_base_model(
        prepared.model, prepared.config, prepared.task, prepared.num_labels, seed
    )
    spec = resolve_spec(spec, base, prepared.task)
    model = TensadaptModel(base, spec, seed=seed)
    return model, model.plan().spec


def check_device(opts: TrainOptions) -> bool:
    """Whether CUDA is used; raise :class:`OptionError` for ``fp16`` without a CUDA device."""
    cuda = torch.cuda.is_available()
    if opts.mixed_precision == "fp16" and not cuda:
        raise OptionError("mixed_precision (--mixed-precision) fp16 needs a CUDA GPU; use bf16")
    return cuda


def training_arguments(opts: TrainOptions, output_dir: str) -> TrainingArguments:
    """The ``TrainingArguments`` of a run: the only place they are built.

    ``opts`` is a resolved recipe's (:func:`~tensadapt.train.recipe.resolve_recipe`); recipe keys
    left ``None`` take their defaults. ``learning_rate``/``weight_decay`` are the adapter's (the
    head's group has its own, see :class:`RecipeTrainer`); the schedule maps to the
    ``transformers`` scheduler of :data:`~tensadapt.train.recipe.SCHEDULES`. Checkpoints every
    ``opts.save_steps`` steps into ``output_dir`` (keeping the last ``opts.save_total_limit``),
    else none; the Trainer's own logging and progress output are replaced by
    :class:`ProgressCallback`; the loss is logged every step (the divergence check reads it).

    Raises:
        OptionError: see :func:`check_device`.
    """
    cuda = check_device(opts)
    opts = resolve_recipe(opts, None, opts.max_length).opts
    assert opts.lr is not None and opts.schedule is not None and opts.epochs is not None
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=opts.batch_size or RECIPE_DEFAULTS["batch_size"],
        per_device_eval_batch_size=opts.eval_batch_size,
        gradient_accumulation_steps=opts.grad_accum,
        learning_rate=opts.lr,
        weight_decay=opts.weight_decay or 0.0,
        num_train_epochs=opts.epochs,
        max_steps=opts.max_steps if opts.max_steps is not None else -1,
        lr_scheduler_type=SCHEDULES[opts.schedule],
        warmup_steps=opts.warmup_ratio or 0.0,  # transformers 5: a float < 1 is a step ratio
        logging_steps=1,
        save_strategy="steps" if opts.save_steps else "no",
        save_steps=opts.save_steps or 500,
        save_total_limit=opts.save_total_limit,
        eval_strategy="no",
        report_to="none",
        seed=opts.seed,
        data_seed=opts.seed,
        use_cpu=not cuda,
        bf16=opts.mixed_precision == "bf16",
        fp16=opts.mixed_precision == "fp16",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
    )


def chance_loss(prepared: Prepared) -> float:
    """The loss of a uniform guess: ``ln(num_labels)``, or ``ln(vocab_size)`` for causal LM."""
    n = prepared.num_labels if prepared.task != "causal-lm" else len(prepared.tokenizer)
    return math.log(max(n, 2))


def training_callbacks(
    opts: TrainOptions, prepared: Prepared, desc: str, extra: Sequence[TrainerCallback] = ()
) -> list[TrainerCallback]:
    """Progress bar, the NaN/inf check of the factors, the divergence check, then ``extra``."""
    cbs: list[TrainerCallback] = [ProgressCallback(desc, opts.progress), FiniteCheckCallback()]
    if opts.divergence_factor is not None:
        cbs.append(DivergenceCallback(opts.divergence_factor, chance_loss(prepared)))
    return [*cbs, *extra]


def accuracy(pred: EvalPrediction) -> dict[str, float]:
    """``compute_metrics`` of classification: the share of argmax predictions equal to the label."""
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    return {"accuracy": float((logits.argmax(-1) == pred.label_ids).mean())}


def save_run(
    model: torch.nn.Module, spec: AdapterSpec, metrics: Mapping[str, Any], out: Path
) -> None:
    """Write a finished run to ``out``: the only place a run is saved.

    Order: an older ``metrics.json`` is removed first and the new one written last (atomically),
    so at every instant the directory either holds a complete run with its metrics or no
    ``metrics.json`` at all (never new metrics beside an old adapter).
    """
    (out / METRICS_FILE).unlink(missing_ok=True)
    save_adapter(model, out)
    atomic_write(
        out / RESOLVED_SPEC_FILE,
        lambda tmp: Path(tmp).write_text(spec_to_yaml(spec), encoding="utf-8"),
    )
    atomic_write(
        out / METRICS_FILE, lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2))
    )
    (out / FAILED_FILE).unlink(missing_ok=True)


def record_failure(out: Path, exc: BaseException) -> None:
    """``failed.json`` in ``out``: why the run stopped (a sweep reports it and does not retry)."""
    info = {"error": type(exc).__name__, "message": str(exc)}
    atomic_write(out / FAILED_FILE, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2)))


def train(
    spec: AdapterSpec | Mapping[str, Any] | str | os.PathLike[str],
    prepared: Prepared,
    opts: TrainOptions | None = None,
    out: str | os.PathLike[str] | Claim | None = None,
    log: Callable[[str], None] | None = print,
    callbacks: Sequence[TrainerCallback] = (),
    record: Mapping[str, Any] | None = None,
    resume: bool | str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Train one adapter and evaluate it.

    Args:
        spec: the adapter spec (or a path to one).
        prepared: from :func:`~tensadapt.train.encode.prepare`.
        opts: training options.
        out: directory for the adapter, ``resolved_spec.yaml`` and ``metrics.json``; checked and
            claimed (:func:`~tensadapt.train.outdir.claim_output_dir`) before the model is built.
            A :class:`~tensadapt.train.outdir.Claim` is a directory the caller claimed already
            (and releases itself).
        log: where one-line messages go (``None``: silent).
        callbacks: more ``TrainerCallback``\\ s, after tensadapt's own.
        record: more entries for the metrics (e.g. how a sweep tuned the learning rate).
        resume: continue from a checkpoint (``opts.save_steps`` writes them to
            ``out/checkpoints``): ``True`` -- the latest complete one there; a path -- that
            checkpoint (see :func:`~tensadapt.train.checkpoints.resume_checkpoint`). The
            optimizer, scheduler, RNG and data order continue where it stopped, so the result
            equals an uninterrupted run's. The run must be the same (spec, data, seed).
    Returns:
        the metrics: ``eval_accuracy``/``eval_loss`` (or ``eval_perplexity`` for causal LM),
        ``train_loss``, ``steps``, ``adapter_params``, ``trainable_params``, ``time_s``, ...
    Raises:
        DivergenceError, NonFiniteError: the loss exploded or a factor/metric is not finite;
            this run writes only ``failed.json`` to ``out`` (no adapter, no ``metrics.json``; an
            earlier run's files there stay as they were).
        OutputDirError: ``out`` cannot be used or is in use.
    """
    opts = opts or TrainOptions()
    say = log or (lambda _s: None)
    spec = as_spec(spec)
    recipe = resolve_recipe(opts, spec, prepared.max_length)
    assert recipe.opts.max_length is not None
    prepared = at_max_length(prepared, recipe.opts.max_length)
    out_path = out.path if isinstance(out, Claim) else Path(out) if out is not None else None
    if opts.save_steps and out_path is None:
        raise OptionError("save_steps (--save-steps) needs an output directory (--out)")
    checkpoint = resume_checkpoint(resume, out_path) if resume not in (None, False) else None
    given = isinstance(out, Claim)
    claim = out if isinstance(out, Claim) else None
    if not isinstance(out, Claim) and out is not None:
        claim = claim_output_dir(out, RUN_FILES)
    try:
        try:
            metrics, model, spec = _run(
                spec, prepared, recipe, say, callbacks, out_path, checkpoint
            )
        except (DivergenceError, NonFiniteError) as e:
            if claim is not None:
                record_failure(claim.path, e)
            raise
        metrics.update(record or {})
        if claim is not None:
            save_run(model, spec, metrics, claim.path)
    finally:
        if claim is not None and not given:
            claim.release()
    return metrics


def _run(
    spec: AdapterSpec,
    prepared: Prepared,
    recipe: Recipe,
    say: Callable[[str], None],
    callbacks: Sequence[TrainerCallback],
    out: Path | None = None,
    checkpoint: Path | None = None,
) -> tuple[dict[str, Any], torch.nn.Module, AdapterSpec]:
    """Build, train (from ``checkpoint`` when resuming), evaluate: ``(metrics, trained model,
    resolved spec)``; checkpoints go to ``out/checkpoints`` when ``opts.save_steps`` is set."""
    from transformers import DataCollatorWithPadding, default_data_collator

    opts = recipe.opts
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_callback import ProgressCallback as HFProgress

    if opts.threads:
        torch.set_num_threads(opts.threads)
    t_start = time.perf_counter()
    model, spec = build_adapted_model(spec, prepared, opts.seed)
    name = spec.name or spec.factorization
    adapter_params = get_adapter(model).plan.n_params
    trainable = trainable_parameters(model)
    say(
        f"training {name}: {adapter_params:,} adapter parameters ({trainable:,} trainable with "
        f"{', '.join(spec.modules_to_save) or 'no extra modules'}), {len(prepared.train):,} "
        f"examples, seed {opts.seed}"
    )
    trained_tokenizer = not is_local_model(prepared.model)
    extra = list(callbacks)
    if trained_tokenizer and opts.save_steps:
        extra.append(KeepTexts(prepared.data.train.texts))
    with tempfile.TemporaryDirectory(prefix="tensadapt-train-") as tmp:
        where = checkpoints_of(out) if out is not None and opts.save_steps else Path(tmp)
        trainer = RecipeTrainer(
            model=model,
            args=training_arguments(opts, str(where)),
            train_dataset=ExampleDataset(prepared.train),
            eval_dataset=ExampleDataset(prepared.eval) if prepared.eval else None,
            data_collator=(
                default_data_collator
                if prepared.task == "causal-lm"
                else DataCollatorWithPadding(prepared.tokenizer)
            ),
            compute_metrics=accuracy if prepared.task == "classification" else None,
            callbacks=training_callbacks(opts, prepared, name, extra),
            # a preset's trained tokenizer goes into every checkpoint (a resumed run needs it)
            processing_class=prepared.tokenizer if trained_tokenizer else None,
            recipe=opts,
        )
        for cb in (PrinterCallback, HFProgress):
            trainer.remove_callback(cb)
        if checkpoint is not None:
            say(f"resuming from {checkpoint}")
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        train_time = time.perf_counter() - t_start
        tokens = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
        metrics: dict[str, Any] = {
            "spec": name,
            "factorization": spec.factorization,
            "modes": list(spec.modes),
            "rank": spec.rank,
            "lr": opts.lr,
            "scale": spec.scaling,
            "recipe": recipe.as_dict(),
            "adapter_params": adapter_params,
            "trainable_params": trainable,
            "seed": opts.seed,
            "steps": int(trainer.state.global_step),
            "train_loss": float(result.training_loss),
            "train_tokens": tokens,
            "tokens_per_s": tokens / max(train_time, 1e-9),
            "train_time_s": train_time,
            "task": prepared.task,
            "model": prepared.model,
            "tokenizer": prepared.tokenizer_source,
            "n_train": len(prepared.train),
        }
        if checkpoint is not None:
            metrics["resumed_from"] = str(checkpoint)
        if prepared.eval:
            merge(model)  # merged inference costs exactly the base model
            try:
                ev = trainer.evaluate()
            finally:
                unmerge(model)
            metrics["eval_loss"] = float(ev["eval_loss"])
            metrics["n_eval"] = len(prepared.eval)
            if "eval_accuracy" in ev:
                metrics["eval_accuracy"] = float(ev["eval_accuracy"])
            if prepared.task == "causal-lm":
                metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    metrics["time_s"] = time.perf_counter() - t_start
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise NonFiniteError(
            f"training of {name} ended with non-finite {', '.join(bad)}: the run diverged; lower "
            "the learning rate (--lr)",
            step=metrics["steps"],
            names=tuple(bad),
        )
    shown = [f"train loss {metrics['train_loss']:.4f}"]
    if "eval_accuracy" in metrics:
        shown.append(f"eval accuracy {metrics['eval_accuracy']:.4f}")
    if "eval_loss" in metrics:
        shown.append(f"eval loss {metrics['eval_loss']:.4f}")
    say(f"  {', '.join(shown)}; {metrics['steps']} steps in {metrics['time_s']:.1f} s")
    return metrics, model, spec
