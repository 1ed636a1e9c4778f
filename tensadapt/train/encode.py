"""Check the data, get a tokenizer, tokenise both splits once: :func:`prepare` (a sweep reuses it).

No model is built here: every data problem is found before any weight is allocated.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data import DataError, DataOptions, Split, TaskData, load_task_data
from .models import check_task_model, is_local_model, load_model_config
from .tokenizer import load_kept_tokenizer, shared_tokenizer, tokenizer_kind, train_tokenizer

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

#: one tokenised example: ``input_ids``, ``attention_mask`` (lists of ints) and ``labels``
#: (an int for classification, a list of token ids for causal LM)
Example = dict[str, Any]


@dataclass
class Prepared:
    """Tokenised data and what the model needs, shared by every run of a sweep.

    ``train``/``eval`` are ``data``'s splits tokenised at ``max_length`` tokens;
    :func:`at_max_length` gives the same data at another length (a spec's ``training:
    max_length``).
    """

    model: str
    config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    task: str
    num_labels: int
    train: list[Example]
    eval: list[Example] | None
    data: TaskData
    tokenizer_source: str
    max_length: int = 128
    variants: dict[int, Prepared] = field(default_factory=dict, repr=False, compare=False)


def prepare(
    model: str | os.PathLike[str],
    data: str | os.PathLike[str],
    eval_data: str | os.PathLike[str] | None = None,
    opts: DataOptions | None = None,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    tokenizer_from: str | os.PathLike[str] | None = None,
) -> Prepared:
    """Check the data, get a tokenizer and tokenise both splits (no model is built yet).

    The model's own tokenizer for a local model directory; for a preset, a tokenizer trained on
    the training texts (:func:`~tensadapt.train.tokenizer.train_tokenizer`). Examples are cut at
    ``opts.max_length`` tokens (and at the model's position limit).

    Args:
        tokenizer_dir: for a preset, where the trained tokenizer is kept: loaded from there when
            it exists, trained and saved there otherwise (see
            :func:`~tensadapt.train.tokenizer.shared_tokenizer`; a sweep keeps it in its
            directory so that its workers, and a resumed sweep, tokenise alike).
        tokenizer_from: for a preset, a directory holding the tokenizer to use (a checkpoint
            being resumed); it must have been trained on these training texts.

    Raises:
        DataError: bad data (see :func:`~tensadapt.train.data.load_task_data`), or a
            ``max_length`` that leaves no room for text, before any model is touched.
        ArchitectureError: ``model`` is neither a preset nor a local model directory, or has no
            model for the task (a vision model for text classification).
    """
    opts = opts or DataOptions()
    td = load_task_data(data, eval_data, opts)
    config = load_model_config(model)
    check_task_model(model, config, td.task)
    if is_local_model(model):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model), local_files_only=True)
        source = f"{model} (the model's own)"
    else:
        texts = td.train.texts
        loaded = False
        if tokenizer_from is not None:
            tokenizer, loaded = load_kept_tokenizer(config, texts, Path(tokenizer_from)), True
            tokenizer_dir = tokenizer_from
        elif tokenizer_dir is not None:
            tokenizer, loaded = shared_tokenizer(config, texts, Path(tokenizer_dir))
        else:
            tokenizer = train_tokenizer(config, texts)
        source = (
            f"{tokenizer_kind(config)}, {len(tokenizer):,} tokens, trained on the "
            f"{len(texts):,} training texts" + (f" (kept in {tokenizer_dir})" if loaded else "")
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train, ev = encode(td, tokenizer, config, opts.max_length)
    return Prepared(
        str(model), config, tokenizer, td.task, td.num_labels, train, ev, td, source,
        opts.max_length,
    )  # fmt: skip


def encode(
    td: TaskData, tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig, max_length: int
) -> tuple[list[Example], list[Example] | None]:
    """Both splits of ``td`` tokenised: ``(train, eval)`` examples at ``max_length`` tokens (and at
    most the model's position limit); evaluation examples sorted by length.

    Raises:
        DataError: a ``max_length`` that leaves no room for text, or too little text for a block.
    """
    max_pos = int(getattr(config, "max_position_embeddings", 0) or 0)
    limit = max_length if not max_pos else min(max_length, max_pos - 2)
    if td.task == "causal-lm":
        if limit < 2:
            raise DataError(f"--max-length {limit}: a causal-LM block needs at least 2 tokens")
        train = lm_blocks(tokenizer, td.train.texts, limit)
        ev = lm_blocks(tokenizer, td.eval.texts, limit) if td.eval else None
        for split, blocks in ((td.train, train), (td.eval, ev)):
            if split is not None and not blocks:
                raise DataError(
                    f"{'--data' if split is td.train else '--eval'} {split.source}: too little "
                    f"text for one block of {limit} tokens (lower --max-length?)"
                )
        return train, ev
    specials = int(tokenizer.num_special_tokens_to_add())
    if limit <= specials:
        raise DataError(
            f"--max-length {limit}: leaves no room for text (the tokenizer adds {specials} "
            "special tokens to every example)"
        )
    train = encode_split(tokenizer, td.train, limit)
    # evaluation order does not change accuracy or mean loss; by length it pads far less
    ev = (
        sorted(encode_split(tokenizer, td.eval, limit), key=lambda x: len(x["input_ids"]))
        if td.eval
        else None
    )
    return train, ev


def at_max_length(prepared: Prepared, max_length: int) -> Prepared:
    """``prepared`` tokenised at ``max_length`` tokens per example (itself when it already is;
    each length tokenised once and remembered, so a sweep's runs share it).

    Raises:
        DataError: see :func:`encode`.
    """
    if max_length == prepared.max_length:
        return prepared
    hit = prepared.variants.get(max_length)
    if hit is None:
        train, ev = encode(prepared.data, prepared.tokenizer, prepared.config, max_length)
        hit = replace(prepared, train=train, eval=ev, max_length=max_length, variants={})
        prepared.variants[max_length] = hit
    return hit


def encode_split(
    tokenizer: PreTrainedTokenizerBase, split: Split, max_length: int
) -> list[Example]:
    """Classification examples: token ids cut at ``max_length``, with their integer labels."""
    enc = tokenizer(split.texts, truncation=True, max_length=max_length)
    assert split.labels is not None
    return [
        {"input_ids": ids, "attention_mask": am, "labels": lab}
        for ids, am, lab in zip(enc["input_ids"], enc["attention_mask"], split.labels, strict=True)
    ]


def lm_blocks(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], block: int
) -> list[Example]:
    """Causal-LM examples: the texts concatenated (EOS between them), cut into full blocks."""
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
