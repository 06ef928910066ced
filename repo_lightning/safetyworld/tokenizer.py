"""A word-level Hugging Face tokenizer over a SafetyWorld's vocabulary."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
SEP_TOKEN = "<sep>"

#: Special tokens, with ids 0..4 in this order.
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, SEP_TOKEN)


def build_word_tokenizer(vocabulary: Sequence[str]) -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer: one id per word, specials first.

    The ``Whitespace`` pre-tokenizer splits on spaces and between letters and punctuation (``"USER:"`` becomes
    ``"USER" ":"``). No post-processor is set, so no bos/eos is added automatically; callers add them. Without
    a decoder, decoding joins tokens with single spaces.

    Args:
        vocabulary: The words, each free of whitespace and not a special token; duplicates are dropped.

    Returns:
        A ``PreTrainedTokenizerFast`` with pad/bos/eos/unk/sep set, which ``save_pretrained`` and
        ``AutoTokenizer.from_pretrained`` round-trip.

    Raises:
        ValueError: If a word contains whitespace or is a special token.
    """
    bad = [w for w in vocabulary if not w or w != w.strip() or len(w.split()) != 1 or w in SPECIAL_TOKENS]
    if bad:
        raise ValueError(f"vocabulary words must be non-empty, whitespace-free and not special: {bad[:5]}")
    tokens = list(SPECIAL_TOKENS) + list(dict.fromkeys(vocabulary))
    backend = Tokenizer(models.WordLevel({token: i for i, token in enumerate(tokens)}, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        sep_token=SEP_TOKEN,
        clean_up_tokenization_spaces=False,
    )
