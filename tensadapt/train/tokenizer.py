"""Tokenizers trained on the fly for presets (random weights, no tokenizer files of their own).

WordPiece for BERT-like families, byte-level BPE otherwise, trained with the ``tokenizers``
library on the training texts, the vocabulary capped at the config's ``vocab_size``.

The ``tokenizers`` trainers break ties between equally frequent pairs in an order that changes
from one process to the next (the same texts give another vocabulary in another process), so a
tokenizer that several processes must share -- the workers of a sweep, a run resumed later -- is
trained once and kept in a directory (:func:`shared_tokenizer`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data import DataError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

#: families tokenised with WordPiece when a tokenizer is trained on the fly (others: byte-level BPE)
WORDPIECE_FAMILIES: frozenset[str] = frozenset(
    {"bert", "distilbert", "electra", "mobilebert", "squeezebert", "convbert", "megatron-bert"}
)


def tokenizer_kind(config: PretrainedConfig) -> str:
    """``WordPiece`` or ``byte-level BPE``: what :func:`train_tokenizer` trains for ``config``."""
    return "WordPiece" if config.model_type in WORDPIECE_FAMILIES else "byte-level BPE"


def train_tokenizer(config: PretrainedConfig, texts: Iterable[str]) -> PreTrainedTokenizerFast:
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
        tok = Tokenizer(
            models.WordPiece(_wordpiece_vocab(texts, vocab, specials), unk_token="[UNK]")
        )
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
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
    _set_special_ids(config, fast)
    return fast


def _wordpiece_vocab(texts: Sequence[str], vocab: int, specials: list[str]) -> dict[str, int]:
    """A WordPiece vocabulary of at most ``vocab`` entries, the same in every process.

    The ``tokenizers`` ``WordPieceTrainer`` numbers its ``##`` subwords in hash-map order, which
    changes from process to process and, through the trainer's tie-breaking, changes the
    vocabulary itself (huggingface/tokenizers#1794; same texts, other tokenizations). Its plain
    BPE trainer is deterministic, so BPE is trained here (BERT's normaliser and pre-tokeniser) and
    each of its tokens ``t`` becomes the two WordPiece entries ``t`` (word start) and ``##t``
    (inside a word), in BPE's order.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from tokenizers import trainers as tk_trainers

    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.normalizer = normalizers.BertNormalizer(lowercase=True)
    bpe.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    half = max((vocab - len(specials)) // 2, 1) + len(specials)
    bpe.train_from_iterator(texts, tk_trainers.BpeTrainer(vocab_size=half, special_tokens=specials))
    out = {t: i for i, t in enumerate(specials)}
    for t, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]):
        for entry in (t, f"##{t}"):
            if t not in specials and entry not in out and len(out) < vocab:
                out[entry] = len(out)
    return out


def _set_special_ids(config: PretrainedConfig, tok: Any) -> None:
    config.pad_token_id = tok.pad_token_id
    for attr in ("bos_token_id", "eos_token_id"):
        tid = getattr(tok, attr, None)
        if tid is not None:
            setattr(config, attr, tid)


#: in a kept tokenizer's directory: the hash of the texts it was trained on
TEXTS_FILE = "tensadapt_texts.json"


def texts_digest(texts: Sequence[str]) -> str:
    """SHA-256 of the texts (length-prefixed, so no two lists collide by concatenation)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


def shared_tokenizer(
    config: PretrainedConfig, texts: Sequence[str], directory: Path
) -> tuple[Any, bool]:
    """The tokenizer kept in ``directory``, or one trained on ``texts`` and kept there.

    The first process to finish training keeps its tokenizer (a directory renamed into place);
    a process that loses the race, and every later one, loads that one, so all of them tokenise
    alike.

    Returns:
        ``(tokenizer, loaded)``: ``loaded`` says whether it was read from ``directory``.
    Raises:
        DataError: ``directory`` holds a tokenizer trained on other texts.
    """
    digest = texts_digest(texts)
    if not (directory / TEXTS_FILE).is_file():
        tok = train_tokenizer(config, texts)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(
            tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent)
        )
        try:
            tok.save_pretrained(tmp)
            (tmp / TEXTS_FILE).write_text(json.dumps({"sha256": digest, "n_texts": len(texts)}))
            os.rename(tmp, directory)  # atomic; fails when another process kept one first
            return tok, False
        except OSError:
            if not (directory / TEXTS_FILE).is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_kept_tokenizer(config, texts, directory), True


def load_kept_tokenizer(config: PretrainedConfig, texts: Sequence[str], directory: Path) -> Any:
    """The tokenizer kept in ``directory`` (a sweep's, a checkpoint's), checked against the hash
    of the texts it was trained on; the config's special token ids are set to its.

    Raises:
        DataError: no tokenizer there, or one trained on other texts.
    """
    if not (directory / "tokenizer.json").is_file():
        raise DataError(f"{directory}: holds no tokenizer (tokenizer.json) to tokenise alike")
    try:
        kept = json.loads((directory / TEXTS_FILE).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        kept = None
    if kept != texts_digest(texts):
        raise DataError(
            f"{directory}: holds a tokenizer trained on other training texts than these; use the "
            "same --data (and --max-train) as before, or a new output directory"
        )
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
    _set_special_ids(config, tok)
    return tok
