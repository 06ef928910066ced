"""Tokenised examples and the collate functions that turn them into typed batch records."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from repo_lightning.data.records import PreferenceBatch, PromptBatch, SFTBatch


@dataclass
class SFTExample:
    """One tokenised prompt/response pair: ``prompt_ids`` then ``response_ids`` (ending in eos)."""

    prompt_ids: list[int]
    response_ids: list[int]


@dataclass
class PreferenceExample:
    """One tokenised preference pair; ``sequences[i]`` is prompt + response ``i``.

    ``true_rewards``/``true_costs`` carry ground-truth oracle values of both responses when the task has them.
    """

    sequences: tuple[list[int], list[int]]
    better_response_id: int
    safer_response_id: int
    is_safe: tuple[bool, bool]
    true_rewards: tuple[float, float] | None = None
    true_costs: tuple[float, float] | None = None


@dataclass
class PromptExample:
    """One tokenised prompt with its raw text and extra fields."""

    prompt_ids: list[int]
    prompt: str
    index: int
    meta: dict = field(default_factory=dict)


def _pad_right(sequences: list[list[int]], pad_id: int, fill: int | None = None) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    value = pad_id if fill is None else fill
    return torch.tensor([s + [value] * (width - len(s)) for s in sequences], dtype=torch.long)


def _mask_right(sequences: list[list[int]]) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], dtype=torch.long)


def collate_sft(examples: list[SFTExample], pad_id: int) -> SFTBatch:
    """Right-pad; labels are ``-100`` on the prompt and on padding."""
    sequences = [e.prompt_ids + e.response_ids for e in examples]
    labels = [[-100] * len(e.prompt_ids) + e.response_ids for e in examples]
    return SFTBatch(
        input_ids=_pad_right(sequences, pad_id),
        attention_mask=_mask_right(sequences),
        labels=_pad_right(labels, pad_id, fill=-100),
    )


def collate_preference(examples: list[PreferenceExample], pad_id: int) -> PreferenceBatch:
    """Stack response 0 of every pair, then response 1 of every pair, right-padded to one width."""
    sequences = [e.sequences[0] for e in examples] + [e.sequences[1] for e in examples]
    has_truth = all(e.true_rewards is not None for e in examples)
    return PreferenceBatch(
        input_ids=_pad_right(sequences, pad_id),
        attention_mask=_mask_right(sequences),
        better_response_id=torch.tensor([e.better_response_id for e in examples], dtype=torch.long),
        safer_response_id=torch.tensor([e.safer_response_id for e in examples], dtype=torch.long),
        is_safe=torch.tensor([list(e.is_safe) for e in examples], dtype=torch.bool),
        true_rewards=torch.tensor([list(e.true_rewards) for e in examples]) if has_truth else None,
        true_costs=torch.tensor([list(e.true_costs) for e in examples]) if has_truth else None,
    )


def collate_prompts(examples: list[PromptExample], pad_id: int) -> PromptBatch:
    """Left-pad prompts so that generation continues every row from the same position."""
    width = max(len(e.prompt_ids) for e in examples)
    input_ids = torch.tensor([[pad_id] * (width - len(e.prompt_ids)) + e.prompt_ids for e in examples])
    attention_mask = torch.tensor([[0] * (width - len(e.prompt_ids)) + [1] * len(e.prompt_ids) for e in examples])
    return PromptBatch(
        input_ids=input_ids.long(),
        attention_mask=attention_mask.long(),
        prompts=[e.prompt for e in examples],
        index=torch.tensor([e.index for e in examples], dtype=torch.long),
        meta=[e.meta for e in examples],
    )
