"""Tokenizers, one home for the data module and the models (loading, padding)."""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from repo_lightning.errors import MissingInputError


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it can pad.

    A tokenizer without a pad token (Llama's) gets its eos token as pad; score models then read the last token
    through the attention mask, never through ``pad_token_id``.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise MissingInputError(
            f"could not load a tokenizer from {name_or_path!r}: expected a Hugging Face hub name or a folder "
            f"written by save_pretrained ({err})"
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
