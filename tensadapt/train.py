"""Training and evaluation behind ``tensadapt train``, ``tensadapt sweep`` and ``tensadapt demo``.

The loop is Hugging Face's :class:`~transformers.Trainer` (devices, mixed precision, gradient
accumulation, schedules); this module only prepares what it needs and reports what it did:

1. :func:`load_task_data` reads and checks the data *before anything is built*: TSV/CSV/JSONL files
   with a text and an integer label column (sequence classification), a plain text file (causal-LM
   fine-tuning), or a Hugging Face ``datasets`` name ``hf:NAME[:CONFIG][@SPLIT]`` where the hub is
   reachable. Every problem (missing file, empty file, missing column, non-integer label) raises a
   :class:`DataError` naming the file, the line and the column.
2. :func:`prepare` loads the tokenizer -- the model's own for a local model directory; for a preset
   (random weights, built from its config) a WordPiece (BERT-like families) or byte-level BPE
   tokenizer trained on the training texts with the ``tokenizers`` library, its vocabulary capped
   at the config's ``vocab_size`` -- and tokenises both splits once (a sweep reuses them).
3. :func:`train` builds the base model, injects the adapter (the new classification head is added
   to ``modules_to_save``), trains with a progress bar showing loss and tokens/s, evaluates
   (accuracy and loss; perplexity for causal LM) and writes ``--out``: the adapter
   (:func:`~tensadapt.save_adapter`), the resolved spec and ``metrics.json``.

:func:`sweep` trains many specs × seeds into ``runs/<spec>/seed<k>/`` (a run whose
``metrics.json`` exists is skipped, so an interrupted sweep resumes), then writes ``results.csv``
and ``pareto.png``. :func:`run_demo` is the README's main job.

Numerical health: when :mod:`tensadapt.numerics` is importable its ``FiniteCheckCallback`` is added
to every run (see :func:`_extra_callbacks`, the single hook point).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import TensadaptError, first_line
from .spec import AdapterSpec, load_spec, spec_to_yaml

#: modules of a task model that are new (randomly initialised) heads and so must be trained
HEAD_MODULES: tuple[str, ...] = ("classifier", "score", "pre_classifier")
#: families tokenised with WordPiece when a tokenizer is trained on the fly (others: byte-level BPE)
WORDPIECE_FAMILIES: frozenset[str] = frozenset(
    {"bert", "distilbert", "electra", "mobilebert", "squeezebert", "convbert", "megatron-bert"}
)
METRICS_FILE = "metrics.json"
RESULTS_FILE = "results.csv"
PARETO_FILE = "pareto.png"
RESULT_COLUMNS = (
    "spec",
    "factorization",
    "modes",
    "rank",
    "params",
    "seed",
    "metric",
    "value",
    "eval_loss",
    "train_loss",
    "steps",
    "time_s",
)


class DataError(TensadaptError, ValueError):
    """Training or evaluation data that cannot be used; the message names file, line and column."""


# -- data ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataOptions:
    """How to read the data.

    Attributes:
        text_column: column holding the text (classification).
        label_column: column holding the integer class label.
        task: ``classification``, ``causal-lm`` or ``auto`` (a ``.txt`` file is causal LM).
        max_length: tokens per example (classification) or per block (causal LM).
        max_train: use only the first N training examples (``None``: all).
        max_eval: use only the first N evaluation examples.
        split, eval_split: splits of an ``hf:`` dataset without ``@SPLIT``.
    """

    text_column: str = "sentence"
    label_column: str = "label"
    task: str = "auto"
    max_length: int = 128
    max_train: int | None = None
    max_eval: int | None = None
    split: str = "train"
    eval_split: str = "validation"


@dataclass
class Split:
    """One split: texts and (classification) labels."""

    source: str
    texts: list[str]
    labels: list[int] | None


@dataclass
class TaskData:
    """Checked data of one task."""

    task: str
    train: Split
    eval: Split | None
    num_labels: int


def _detect_task(path: str, task: str) -> str:
    if task != "auto":
        if task not in ("classification", "causal-lm"):
            raise DataError(f"--task must be classification, causal-lm or auto, got {task!r}")
        return task
    return "causal-lm" if path.lower().endswith(".txt") else "classification"


def _read_rows(path: Path, what: str) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """``(columns, [(line, row)])`` of a TSV/CSV/JSONL file."""
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{what} {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise DataError(f"{what} {path}: file is empty")
    if suffix in (".jsonl", ".json", ".ndjson"):
        rows: list[tuple[int, dict[str, Any]]] = []
        cols: dict[str, None] = {}
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{what} {path}:{i}: not a JSON object per line ({e.msg})"
                ) from None
            if not isinstance(obj, dict):
                raise DataError(
                    f"{what} {path}:{i}: expected a JSON object, got {type(obj).__name__}"
                )
            cols.update(dict.fromkeys(obj))
            rows.append((i, obj))
        return list(cols), rows
    if suffix not in (".tsv", ".csv"):
        raise DataError(
            f"{what} {path}: unknown format {suffix or '(no extension)'!r}; use .tsv, .csv, "
            ".jsonl (classification) or .txt (causal LM)"
        )
    reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
    if reader.fieldnames is None:
        raise DataError(f"{what} {path}: no header line")
    cols_list = [c.strip() for c in reader.fieldnames]
    out = []
    for row in reader:
        out.append((reader.line_num, {(k or "").strip(): v for k, v in row.items()}))
    return cols_list, out


def read_split(
    path: str | os.PathLike[str], opts: DataOptions, task: str, what: str = "--data"
) -> Split:
    """Read one split from a file (or ``hf:`` name), checking everything.

    Raises:
        DataError: missing/empty file, missing column (the message lists the columns found),
            empty text, or a label that is not an integer >= 0 (with its line).
    """
    src = str(path)
    if src.startswith("hf:"):
        return _read_hf(src, opts, task, what)
    p = Path(path)
    if not p.exists():
        raise DataError(f"{what} {p}: no such file")
    if p.is_dir():
        raise DataError(f"{what} {p}: is a directory, expected a data file")
    if task == "causal-lm":
        text = p.read_text(encoding="utf-8", errors="replace")
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if not lines:
            raise DataError(f"{what} {p}: file is empty")
        return Split(str(p), lines, None)
    cols, rows = _read_rows(p, what)
    return _split_from_rows(str(p), cols, rows, opts, what)


def _split_from_rows(
    src: str,
    cols: Sequence[str],
    rows: Sequence[tuple[int, Mapping[str, Any]]],
    opts: DataOptions,
    what: str,
) -> Split:
    missing = [c for c in (opts.text_column, opts.label_column) if c not in cols]
    if missing:
        names = {opts.text_column: "--text-column", opts.label_column: "--label-column"}
        raise DataError(
            f"{what} {src}: missing column(s) "
            + ", ".join(f"{c!r} ({names[c]})" for c in missing)
            + f"; the file has: {', '.join(map(repr, cols)) or '(none)'}"
        )
    if not rows:
        raise DataError(f"{what} {src}: no data rows after the header")
    texts: list[str] = []
    labels: list[int] = []
    for line, row in rows:
        raw = row.get(opts.label_column)
        label = _as_label(raw)
        if label is None:
            raise DataError(
                f"{what} {src}:{line}: label {raw!r} in column {opts.label_column!r} is not an "
                "integer >= 0 (classes must be numbered 0, 1, ...)"
            )
        text = row.get(opts.text_column)
        if text is None or not str(text).strip():
            raise DataError(f"{what} {src}:{line}: empty text in column {opts.text_column!r}")
        texts.append(str(text))
        labels.append(label)
    return Split(src, texts, labels)


def _as_label(raw: Any) -> int | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw if raw >= 0 else None
    if isinstance(raw, float):
        return int(raw) if raw.is_integer() and raw >= 0 else None
    if isinstance(raw, str) and raw.strip().isdigit():
        return int(raw.strip())
    return None


def _read_hf(src: str, opts: DataOptions, task: str, what: str) -> Split:
    """``hf:NAME[:CONFIG][@SPLIT]`` through ``datasets.load_dataset`` (needs the hub or its cache)."""
    body = src[3:]
    body, _, split = body.partition("@")
    name, _, config = body.partition(":")
    split = split or (opts.split if what == "--data" else opts.eval_split)
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:
        first = first_line(e)
        raise DataError(
            f"{what} {src}: cannot load Hugging Face dataset {name!r}"
            f"{f' config {config!r}' if config else ''} split {split!r} (offline, or no such "
            f"dataset?): {first}"
        ) from None
    cols = list(ds.column_names)
    if task == "causal-lm":
        col = opts.text_column if opts.text_column in cols else "text"
        if col not in cols:
            raise DataError(f"{what} {src}: no text column {opts.text_column!r}; has {cols}")
        return Split(src, [str(t) for t in ds[col] if str(t).strip()], None)
    rows = [(i + 2, r) for i, r in enumerate(ds)]
    return _split_from_rows(src, cols, rows, opts, what)


def load_task_data(
    data: str | os.PathLike[str], eval_data: str | os.PathLike[str] | None, opts: DataOptions
) -> TaskData:
    """Read and check the training (and evaluation) data.

    Raises:
        DataError: see :func:`read_split`; also eval labels the training data never uses, or a
            single class in the training data.
    """
    task = _detect_task(str(data), opts.task)
    train = read_split(data, opts, task, "--data")
    ev = read_split(eval_data, opts, task, "--eval") if eval_data is not None else None
    if opts.max_train is not None:
        train = _head(train, opts.max_train)
    if ev is not None and opts.max_eval is not None:
        ev = _head(ev, opts.max_eval)
    num_labels = 0
    if task == "classification":
        assert train.labels is not None
        num_labels = max(train.labels) + 1
        if len(set(train.labels)) < 2:
            raise DataError(
                f"--data {train.source}: every label is {train.labels[0]}; classification needs "
                "at least two classes"
            )
        if ev is not None and ev.labels is not None and max(ev.labels) >= num_labels:
            raise DataError(
                f"--eval {ev.source}: label {max(ev.labels)} does not occur in the training data "
                f"(labels 0..{num_labels - 1})"
            )
    return TaskData(task, train, ev, num_labels)


def _head(s: Split, n: int) -> Split:
    return Split(s.source, s.texts[:n], s.labels[:n] if s.labels is not None else None)


# -- models and tokenizers -------------------------------------------------------------------------


def is_local_model(model: str | os.PathLike[str]) -> bool:
    """Whether ``model`` is a local model directory (weights and tokenizer) rather than a preset."""
    from .arch import PRESETS

    return str(model) not in PRESETS and Path(model).is_dir()


def load_model_config(model: str | os.PathLike[str]) -> Any:
    """The ``transformers`` config of a preset or local model directory (never downloads)."""
    from .arch import load_config

    return load_config(str(model) if not isinstance(model, str) else model)


def train_tokenizer(config: Any, texts: Iterable[str]) -> Any:
    """A tokenizer trained on ``texts``, its vocabulary capped at ``config.vocab_size``.

    WordPiece with ``[PAD] [UNK] [CLS] [SEP] [MASK]`` for BERT-like families, byte-level BPE with
    ``<s> <pad> </s> <unk>`` otherwise (the ids RoBERTa's config expects). The config's special
    token ids are set to the tokenizer's.

    Returns:
        a :class:`transformers.PreTrainedTokenizerFast`.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers as tk_trainers
    from transformers import PreTrainedTokenizerFast

    vocab = int(config.vocab_size)
    texts = list(texts)
    if config.model_type in WORDPIECE_FAMILIES:
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.train_from_iterator(
            texts, tk_trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=specials)
        )
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            pad_token="[PAD]",
            unk_token="[UNK]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        )
    else:
        specials = ["<s>", "<pad>", "</s>", "<unk>"]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(
            texts,
            tk_trainers.BpeTrainer(
                vocab_size=vocab,
                special_tokens=specials,
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if vocab >= 300 else [],
            ),
        )
        bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>",
            pair="<s> $A </s> $B </s>",
            special_tokens=[("<s>", bos), ("</s>", eos)],
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<pad>",
            unk_token="<unk>",
        )
    if len(fast) > vocab:
        raise DataError(f"trained tokenizer has {len(fast)} tokens, more than vocab_size {vocab}")
    config.pad_token_id = fast.pad_token_id
    for attr in ("bos_token_id", "eos_token_id"):
        tid = getattr(fast, attr, None)
        if tid is not None:
            setattr(config, attr, tid)
    return fast


def build_base_model(
    model: str | os.PathLike[str], config: Any, task: str, num_labels: int, seed: int
) -> torch.nn.Module:
    """The task model: pretrained from a local directory, or random weights from a preset config.

    ``seed`` seeds the random weights (a preset's whole model, a local model's new head).
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
    for k, v in kwargs.items():
        setattr(cfg, k, v)
    if task != "causal-lm":
        cfg.num_labels = num_labels
    return auto.from_config(cfg)


@dataclass
class Prepared:
    """Tokenised data and what the model needs, shared by every run of a sweep."""

    model: str
    config: Any
    tokenizer: Any
    task: str
    num_labels: int
    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]] | None
    data: TaskData
    tokenizer_source: str


def prepare(
    model: str | os.PathLike[str],
    data: str | os.PathLike[str],
    eval_data: str | os.PathLike[str] | None = None,
    opts: DataOptions | None = None,
) -> Prepared:
    """Check the data, get a tokenizer and tokenise both splits (no model is built yet).

    Raises:
        DataError: bad data (see :func:`load_task_data`), before any model is touched.
        ArchitectureError: ``model`` is neither a preset nor a local model directory.
    """
    opts = opts or DataOptions()
    td = load_task_data(data, eval_data, opts)
    config = load_model_config(model)
    if is_local_model(model):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model), local_files_only=True)
        source = f"{model} (the model's own)"
    else:
        texts = td.train.texts
        tokenizer = train_tokenizer(config, texts)
        kind = "WordPiece" if config.model_type in WORDPIECE_FAMILIES else "byte-level BPE"
        source = f"{kind}, {len(tokenizer):,} tokens, trained on the {len(texts):,} training texts"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    max_pos = int(getattr(config, "max_position_embeddings", 0) or 0)
    limit = opts.max_length if not max_pos else min(opts.max_length, max_pos - 2)
    if td.task == "causal-lm":
        train = _lm_blocks(tokenizer, td.train.texts, limit)
        ev = _lm_blocks(tokenizer, td.eval.texts, limit) if td.eval else None
        if not train:
            raise DataError(f"--data {td.train.source}: too little text for one block")
    else:
        train = _encode(tokenizer, td.train, limit)
        # evaluation order does not change accuracy or mean loss; by length it pads far less
        ev = (
            sorted(_encode(tokenizer, td.eval, limit), key=lambda x: len(x["input_ids"]))
            if td.eval
            else None
        )
    return Prepared(str(model), config, tokenizer, td.task, td.num_labels, train, ev, td, source)


def _encode(tokenizer: Any, split: Split, max_length: int) -> list[dict[str, list[int]]]:
    enc = tokenizer(split.texts, truncation=True, max_length=max_length)
    assert split.labels is not None
    return [
        {"input_ids": ids, "attention_mask": am, "labels": lab}  # type: ignore[dict-item]
        for ids, am, lab in zip(enc["input_ids"], enc["attention_mask"], split.labels, strict=True)
    ]


def _lm_blocks(tokenizer: Any, texts: Sequence[str], block: int) -> list[dict[str, list[int]]]:
    ids: list[int] = []
    for ids_line in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids.extend(ids_line)
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    out = []
    for start in range(0, len(ids) - block + 1, block):
        chunk = ids[start : start + block]
        out.append({"input_ids": chunk, "attention_mask": [1] * block, "labels": list(chunk)})
    return out


class _ListDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, items: Sequence[Mapping[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Mapping[str, Any]:
        return self.items[i]


# -- training --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainOptions:
    """How to train.

    Attributes:
        epochs: passes over the training data (ignored when ``max_steps`` > 0).
        max_steps: optimizer steps; > 0 overrides ``epochs``.
        batch_size: examples per device step; ``grad_accum`` steps make one optimizer step.
        lr: peak learning rate (linear warm-up over ``warmup_ratio`` of the steps, then decay).
        seed: seeds the base model's random weights / new head, the adapter init and data order.
        mixed_precision: ``no``, ``bf16`` or ``fp16`` (fp16 needs a GPU).
        threads: torch CPU threads (``None``: leave as is).
        progress: show the progress bar.
    """

    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 16
    eval_batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    grad_accum: int = 1
    seed: int = 0
    mixed_precision: str = "no"
    threads: int | None = None
    progress: bool = True


def _extra_callbacks() -> list[Any]:
    """Callbacks added to every run. Hook point for :mod:`tensadapt.numerics` (NaN/inf checks)."""
    try:
        import importlib

        numerics = importlib.import_module("tensadapt.numerics")
    except ImportError:
        return []
    cb = getattr(numerics, "FiniteCheckCallback", None)
    return [cb()] if cb is not None else []


def _progress_callback(total_hint: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):  # type: ignore[misc]
        """A tqdm bar with the last loss and training tokens/s (non-padding tokens)."""

        def __init__(self) -> None:
            self.bar: Any = None
            self.t0 = 0.0
            self.loss = math.nan

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0 = time.perf_counter()
            if enabled:
                self.bar = tqdm(total=state.max_steps, desc=total_hint, unit="step", leave=True)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                self.loss = float(logs["loss"])
                if self.bar is not None:
                    self.bar.set_postfix(loss=f"{self.loss:.4f}", tok_s=self._rate(state))

        def _rate(self, state: Any) -> str:
            dt = max(time.perf_counter() - self.t0, 1e-9)
            return f"{(getattr(state, 'num_input_tokens_seen', 0) or 0) / dt:,.0f}"

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.bar is not None:
                self.bar.update(1)

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.bar is not None:
                self.bar.close()

    return Progress()


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


def train(
    spec: AdapterSpec | Mapping[str, Any] | str | os.PathLike[str],
    prepared: Prepared,
    opts: TrainOptions | None = None,
    out: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Train one adapter and evaluate it.

    Args:
        spec: the adapter spec (or a path to one).
        prepared: from :func:`prepare`.
        opts: training options.
        out: directory for the adapter, ``spec.yaml`` (resolved) and ``metrics.json``.
        log: where one-line messages go (``None``: silent).
    Returns:
        the metrics: ``eval_accuracy``/``eval_loss`` (or ``eval_perplexity`` for causal LM),
        ``train_loss``, ``steps``, ``adapter_params``, ``trainable_params``, ``time_s``, ...
    """
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments
    from transformers import default_data_collator as default_collator
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from .io import atomic_write, save_adapter
    from .model import get_adapter, inject, merge, trainable_parameters, unmerge

    opts = opts or TrainOptions()
    say = log or (lambda _s: None)
    if not isinstance(spec, AdapterSpec):
        spec = load_spec(spec if isinstance(spec, Mapping) else Path(spec))
    if opts.threads:
        torch.set_num_threads(opts.threads)
    t_start = time.perf_counter()
    model = build_base_model(
        prepared.model, prepared.config, prepared.task, prepared.num_labels, opts.seed
    )
    spec = resolve_spec(spec, model, prepared.task)
    inject(model, spec, seed=opts.seed)
    adapter_params = get_adapter(model).plan.n_params
    trainable = trainable_parameters(model)
    say(
        f"training {spec.name or spec.factorization}: {adapter_params:,} adapter parameters "
        f"({trainable:,} trainable with {', '.join(spec.modules_to_save) or 'no extra modules'}), "
        f"{len(prepared.train):,} examples, seed {opts.seed}"
    )
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="tensadapt-train-") as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=opts.batch_size,
            per_device_eval_batch_size=opts.eval_batch_size,
            gradient_accumulation_steps=opts.grad_accum,
            learning_rate=opts.lr,
            weight_decay=opts.weight_decay,
            num_train_epochs=opts.epochs,
            max_steps=opts.max_steps,
            lr_scheduler_type="linear",
            warmup_steps=opts.warmup_ratio,
            logging_steps=1,
            save_strategy="no",
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
        collator = (
            default_collator
            if prepared.task == "causal-lm"
            else DataCollatorWithPadding(prepared.tokenizer)
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=_ListDataset(prepared.train),
            eval_dataset=_ListDataset(prepared.eval) if prepared.eval else None,
            data_collator=collator,
            compute_metrics=_accuracy if prepared.task == "classification" else None,
            callbacks=[
                _progress_callback(spec.name or spec.factorization, opts.progress),
                *_extra_callbacks(),
            ],
        )
        for cb in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(cb)
        result = trainer.train()
        train_time = time.perf_counter() - t_start
        tokens = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
        metrics: dict[str, Any] = {
            "spec": spec.name or spec.factorization,
            "factorization": spec.factorization,
            "modes": list(spec.modes),
            "rank": spec.rank,
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
    if not all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)):
        metrics["warning"] = "non-finite loss: training diverged (lower --lr?)"
    shown = [f"train loss {metrics['train_loss']:.4f}"]
    if "eval_accuracy" in metrics:
        shown.append(f"eval accuracy {metrics['eval_accuracy']:.4f}")
    if "eval_loss" in metrics:
        shown.append(f"eval loss {metrics['eval_loss']:.4f}")
    say(f"  {', '.join(shown)}; {metrics['steps']} steps in {metrics['time_s']:.1f} s")
    if out is not None:
        d = Path(out)
        save_adapter(model, d)
        from .io import _write_text

        _write_text(d / "resolved_spec.yaml", spec_to_yaml(spec))
        atomic_write(
            d / METRICS_FILE, lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2))
        )
    return metrics


def _accuracy(pred: Any) -> dict[str, float]:
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    labels = pred.label_ids
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


# -- sweeps ----------------------------------------------------------------------------------------


@dataclass
class SweepRun:
    """One (spec, seed) of a sweep."""

    name: str
    spec: AdapterSpec
    seed: int

    def directory(self, root: Path) -> Path:
        return root / "runs" / self.name / f"seed{self.seed}"


@dataclass
class SweepResult:
    """What :func:`sweep` did: result rows, how many runs were trained and skipped, files."""

    rows: list[dict[str, Any]]
    trained: int
    skipped: int
    results_csv: Path
    pareto_png: Path | None
    summary: list[dict[str, Any]] = field(default_factory=list)


def sweep(
    specs: Sequence[tuple[str, AdapterSpec]],
    prepared: Prepared,
    out: str | os.PathLike[str],
    seeds: Sequence[int] = (0, 1, 2),
    opts: TrainOptions | None = None,
    log: Callable[[str], None] | None = print,
    plot: bool = True,
) -> SweepResult:
    """Train every spec with every seed; resumable; writes ``results.csv`` and ``pareto.png``.

    A run whose ``runs/<name>/seed<k>/metrics.json`` exists is not repeated. ``results.csv`` is
    rewritten (atomically) after every run, so it is complete up to the last finished run.

    Args:
        specs: ``(name, spec)`` pairs; names must be unique (they name the run directories).
        prepared: from :func:`prepare`.
        out: the sweep directory.
        seeds: seeds of every spec.
        opts: training options (``seed`` is replaced per run).
        log: progress messages (``None``: silent).
        plot: write ``pareto.png`` (needs matplotlib).
    """
    from dataclasses import replace

    say = log or (lambda _s: None)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    names = [n for n, _ in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"sweep: spec names must be unique, repeated: {', '.join(dupes)}")
    opts = opts or TrainOptions()
    runs = [SweepRun(n, s, seed) for n, s in specs for seed in seeds]
    trained = skipped = 0
    t0 = time.perf_counter()
    for i, run in enumerate(runs, start=1):
        d = run.directory(root)
        tag = f"[{i}/{len(runs)}] {run.name} seed {run.seed}"
        if (d / METRICS_FILE).exists():
            skipped += 1
            say(f"{tag}: done already, skipped")
            continue
        say(f"{tag}: training ({time.perf_counter() - t0:.0f} s elapsed)")
        train(run.spec, prepared, replace(opts, seed=run.seed), out=d, log=None)
        trained += 1
        m = json.loads((d / METRICS_FILE).read_text())
        metric, value = _metric_of(m)
        say(f"{tag}: {metric} {value:.4f}, {m['adapter_params']:,} params, {m['time_s']:.1f} s")
        collect_results(root)
    rows = collect_results(root, [r.name for r in runs])
    summary = summarize(rows)
    png = None
    if plot and rows:
        png = plot_pareto(summary, root / PARETO_FILE)
    say(f"sweep: {trained} trained, {skipped} skipped; {root / RESULTS_FILE}")
    return SweepResult(rows, trained, skipped, root / RESULTS_FILE, png, summary)


def _metric_of(m: Mapping[str, Any]) -> tuple[str, float]:
    if "eval_accuracy" in m:
        return "eval_accuracy", float(m["eval_accuracy"])
    if "eval_loss" in m:
        return "eval_loss", float(m["eval_loss"])
    return "train_loss", float(m["train_loss"])


def collect_results(root: Path, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Rows of ``results.csv`` from every finished run under ``root/runs`` (rewritten atomically).

    Args:
        root: the sweep directory.
        names: keep only these spec names (in this order); ``None``: every run found.
    """
    from .enumerate import rank_summary
    from .io import atomic_write

    rows = []
    for f in sorted((root / "runs").glob(f"*/seed*/{METRICS_FILE}")):
        m = json.loads(f.read_text())
        name = f.parent.parent.name
        if names is not None and name not in names:
            continue
        metric, value = _metric_of(m)
        rows.append(
            {
                "spec": name,
                "factorization": m["factorization"],
                "modes": "+".join(m["modes"]) or "none",
                "rank": rank_summary(m["rank"]),
                "params": m["adapter_params"],
                "seed": m["seed"],
                "metric": metric,
                "value": value,
                "eval_loss": m.get("eval_loss", ""),
                "train_loss": m["train_loss"],
                "steps": m["steps"],
                "time_s": round(float(m["time_s"]), 2),
            }
        )
    if names is not None:
        order = {n: i for i, n in enumerate(names)}
        rows.sort(key=lambda r: (order[r["spec"]], r["seed"]))

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=RESULT_COLUMNS)
            w.writeheader()
            w.writerows(rows)

    atomic_write(root / RESULTS_FILE, write)
    return rows


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean, standard deviation, min and max of the metric per spec, with params, in row order."""
    by: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        by.setdefault(str(r["spec"]), []).append(r)
    out = []
    for name, rs in by.items():
        vals = [float(r["value"]) for r in rs]
        out.append(
            {
                "spec": name,
                "factorization": rs[0]["factorization"],
                "modes": rs[0]["modes"],
                "rank": rs[0]["rank"],
                "params": int(rs[0]["params"]),
                "metric": rs[0]["metric"],
                "n": len(vals),
                "mean": statistics.fmean(vals),
                "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "min": min(vals),
                "max": max(vals),
            }
        )
    return out


def pareto_front(summary: Sequence[Mapping[str, Any]], higher_is_better: bool = True) -> list[str]:
    """Names of the configurations no other beats on both fewer-or-equal params and a better mean."""
    front = []
    sign = 1 if higher_is_better else -1
    for a in summary:
        dominated = any(
            b is not a
            and b["params"] <= a["params"]
            and sign * b["mean"] >= sign * a["mean"]
            and (b["params"] < a["params"] or sign * b["mean"] > sign * a["mean"])
            for b in summary
        )
        if not dominated:
            front.append(str(a["spec"]))
    return front


def plot_pareto(summary: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """Metric vs trainable parameters (log x): mean ± std per spec, Pareto front, LoRA highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_write

    metric = str(summary[0]["metric"]) if summary else "metric"
    higher = metric != "eval_loss" and metric != "train_loss"
    front = set(pareto_front(summary, higher))
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for s in summary:
        is_lora = s["factorization"] == "lora" and s["modes"] == "none"
        color = "tab:red" if is_lora else ("tab:blue" if s["spec"] in front else "tab:gray")
        ax.errorbar(
            s["params"],
            s["mean"],
            yerr=s["std"],
            fmt="*" if is_lora else "o",
            ms=14 if is_lora else 6,
            color=color,
            capsize=3,
            zorder=3 if is_lora else 2,
        )
        ax.annotate(
            str(s["spec"]),
            (s["params"], s["mean"]),
            fontsize=7,
            xytext=(4, 3),
            textcoords="offset points",
        )
    pts = sorted((s["params"], s["mean"]) for s in summary if s["spec"] in front)
    if pts:
        ax.step(
            [p for p, _ in pts],
            [m for _, m in pts],
            where="post",
            color="tab:blue",
            alpha=0.6,
            label="Pareto front",
        )
    ax.plot([], [], "*", color="tab:red", ms=12, label="LoRA")
    ax.set_xscale("log")
    ax.set_xlabel("trainable adapter parameters (log scale)")
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.set_title(title or f"{metric} vs trainable parameters")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


# -- the demo --------------------------------------------------------------------------------------

_POSITIVE = [
    "a wonderful , moving film",
    "great acting and a clever story",
    "i loved every minute of it",
    "funny , warm and beautifully made",
    "an excellent and touching performance",
    "the best film of the year",
    "a delightful surprise",
    "smart , charming and fun",
]
_NEGATIVE = [
    "a boring , tedious mess",
    "terrible acting and a dull story",
    "i hated every minute of it",
    "flat , cold and badly made",
    "an awful and lifeless performance",
    "the worst film of the year",
    "a painful disappointment",
    "stupid , dreary and slow",
]


def synthetic_sentiment(n: int, seed: int = 0) -> list[tuple[int, str]]:
    """``n`` ``(label, sentence)`` pairs from small positive/negative phrase banks (demo fallback)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        bank = _POSITIVE if label else _NEGATIVE
        out.append((label, f"{rng.choice(bank)} , {rng.choice(bank)}"))
    rng.shuffle(out)
    return out


def shared_data_dir() -> Path:
    """``../shared/data`` relative to the repository root (where the SST-2 TSVs live)."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def run_demo(steps: int = 60, seed: int = 0, threads: int | None = None) -> dict[str, Any]:
    """The main job: a plan table, a short enumerate table, then a short training run.

    A ``minilm``-shaped BERT with random weights (from its preset config), a WordPiece tokenizer
    trained on the fly, Tucker qkv+depth, on SST-2 from ``../shared/data/sst2`` when present
    (else a built-in synthetic sentiment set). No downloads; about a minute on 2 CPU cores.
    """
    from .enumerate import enumerate_configs, format_table
    from .planner import plan

    t0 = time.perf_counter()
    spec = load_spec(
        {
            "name": "tenslora-qkv-depth",
            "factorization": "tucker",
            "targets": ["q", "k", "v"],
            "modes": ["qkv", "depth"],
            "rank": {"in": 8, "out": 8, "qkv": 3, "depth": 6},
            "alpha": 16,
        }
    )
    print("== 1. plan: TensLoRA Tucker over [qkv, depth] on minilm (config only, no weights)\n")
    print(plan(spec, "minilm"))
    print("\n== 2. enumerate: every mode subset for CP and Tucker at rank 8 (isorank)\n")
    e = enumerate_configs("minilm", rank=8, factorizations=["lora", "cp", "tucker"])
    print(format_table(e, limit=12))
    sst2 = shared_data_dir() / "sst2"
    with tempfile.TemporaryDirectory(prefix="tensadapt-demo-") as tmp:
        if (sst2 / "train.tsv").exists() and (sst2 / "dev.tsv").exists():
            train_path, dev_path = sst2 / "train.tsv", sst2 / "dev.tsv"
            where = f"SST-2 from {sst2}"
            n_train, n_dev = 2000, 872
        else:
            pairs = synthetic_sentiment(1200, seed)
            train_path, dev_path = Path(tmp) / "train.tsv", Path(tmp) / "dev.tsv"
            for pth, part in ((train_path, pairs[:1000]), (dev_path, pairs[1000:])):
                pth.write_text("label\tsentence\n" + "".join(f"{lab}\t{s}\n" for lab, s in part))
            where = "a built-in synthetic sentiment set (SST-2 not found)"
            n_train, n_dev = 1000, 200
        print(
            f"\n== 3. train: minilm preset (random weights) + Tucker qkv+depth, {steps} steps on "
            f"{where}\n"
        )
        prepared = prepare(
            "minilm",
            train_path,
            dev_path,
            DataOptions(max_length=48, max_train=n_train, max_eval=n_dev),
        )
        print(f"tokenizer: {prepared.tokenizer_source}")
        metrics = train(
            spec,
            prepared,
            TrainOptions(
                max_steps=steps,
                batch_size=32,
                lr=3e-3,
                seed=seed,
                threads=threads,
                warmup_ratio=0.1,
            ),
            out=Path(tmp) / "adapter",
        )
    print(
        f"\ndev accuracy {metrics.get('eval_accuracy', math.nan):.4f} on {metrics.get('n_eval', 0)}"
        f" sentences after {metrics['steps']} steps (random-weight model: expect little above "
        f"chance; a pretrained model learns far more: see benchmarks/sst2_experiment.py)."
        f"\ndemo finished in {time.perf_counter() - t0:.0f} s"
    )
    return metrics
