"""Prompt templates and the tokenisation of prompt/response text into ids.

The default template is the conversation format of PKU-Alignment/safe-rlhf (used by the Beaver and
alpaca-7b-reproduced models): ``BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:``; the response follows after
one space and ends with the tokenizer's eos token. ``template: chat`` uses the tokenizer's own chat template.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

SAFE_RLHF_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"
CHAT_TEMPLATE = "chat"


def check_template(template: str, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
    """Raise ``ValueError`` unless ``template`` has a ``{prompt}`` slot or is ``chat`` with a chat template."""
    if template == CHAT_TEMPLATE:
        if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"template: chat needs a tokenizer with a chat_template; {tokenizer.name_or_path!r} has none "
                f"(use a format string such as {SAFE_RLHF_TEMPLATE!r})"
            )
        return
    if "{prompt}" not in template:
        raise ValueError(f"template must contain '{{prompt}}' or be 'chat', got {template!r}")


def format_prompt(prompt: str, template: str, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """Apply ``template`` to a raw user turn."""
    if template == CHAT_TEMPLATE:
        check_template(template, tokenizer)
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return template.replace("{prompt}", prompt)


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: str, template: str, max_prompt_length: int
) -> tuple[list[int], bool]:
    """Token ids of the templated prompt, with bos first; too long prompts lose tokens from the left.

    Returns:
        ``(ids, truncated)``.
    """
    text = format_prompt(prompt, template, tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [] if template == CHAT_TEMPLATE or tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    budget = max_prompt_length - len(bos)
    truncated = len(ids) > budget
    if truncated:
        ids = ids[len(ids) - budget :]
    return bos + ids, truncated


def encode_response(
    tokenizer: PreTrainedTokenizerBase, response: str, max_response_length: int
) -> tuple[list[int], bool]:
    """Token ids of a response followed by eos; a too long response is cut and still ends with eos.

    Returns:
        ``(ids, truncated)``.
    """
    ids = tokenizer(" " + response, add_special_tokens=False)["input_ids"]
    truncated = len(ids) + 1 > max_response_length
    if truncated:
        ids = ids[: max_response_length - 1]
    return ids + [tokenizer.eos_token_id], truncated
