"""Tokenizers trained on the fly for presets (random weights, no tokenizer files of their own).

WordPiece for BERT-like families, byte-level BPE otherwise, trained with the ``tokenizers``
library on the training texts, the vocabulary capped at the config's ``vocab_size``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .data import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

#: families tokenised with WordPiece when a tokenizer is trained on the fly (others: byte-level BPE)
WORDPIECE_FAMILIES: frozenset[str] = frozenset(
    {"bert", "distilbert", "electra", "mobilebert", "squeezebert", "convbert", "megatron-bert"}
)


def tokenizer_kind(config: Any) -> str:
    """``WordPiece`` or ``byte-level BPE``: what :func:`train_tokenizer` trains for ``config``."""
    return "WordPiece" if config.model_type in WORDPIECE_FAMILIES else "byte-level BPE"


def train_tokenizer(config: Any, texts: Iterable[str]) -> PreTrainedTokenizerFast:
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
