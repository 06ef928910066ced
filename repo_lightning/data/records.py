"""Typed batch records. Every field's shape is documented; nothing outside collate functions indexes by string.

``B`` is the batch size (prompts or preference pairs), ``L`` a padded sequence length, ``P`` a padded prompt length.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor


def _move(record, device: torch.device | str):
    """Return a copy of a record with every tensor field moved to ``device``."""
    values = {}
    for f in fields(record):
        value = getattr(record, f.name)
        values[f.name] = value.to(device) if isinstance(value, Tensor) else value
    return type(record)(**values)


@dataclass
class SFTBatch:
    """Prompt + response sequences for supervised fine-tuning.

    Attributes:
        input_ids: ``[B, L]`` long, right-padded ``bos? prompt response eos``.
        attention_mask: ``[B, L]`` long, 1 on real tokens.
        labels: ``[B, L]`` long, the response tokens (and eos); ``-100`` on prompt and padding.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor

    def to(self, device: torch.device | str) -> SFTBatch:
        """Move every tensor to ``device``."""
        return _move(self, device)


@dataclass
class PreferenceBatch:
    """Pairs of responses to the same prompt with helpfulness and safety labels (PKU-SafeRLHF schema).

    Both responses of a pair are stacked so that one forward pass scores them all: rows ``0..B-1`` hold
    ``response_0`` of each pair and rows ``B..2B-1`` hold ``response_1``.

    Attributes:
        input_ids: ``[2B, L]`` long, right-padded ``bos? prompt response eos``.
        attention_mask: ``[2B, L]`` long.
        better_response_id: ``[B]`` long in {0, 1}, the more helpful response.
        safer_response_id: ``[B]`` long in {0, 1}, the less harmful response.
        is_safe: ``[B, 2]`` bool, the absolute safety label of response 0 and response 1.
        true_rewards: ``[B, 2]`` float ground-truth helpfulness ``R*`` of both responses, when the task has an
            oracle (SafetyWorld); else ``None``.
        true_costs: ``[B, 2]`` float ground-truth harm ``C*``, or ``None``.
    """

    input_ids: Tensor
    attention_mask: Tensor
    better_response_id: Tensor
    safer_response_id: Tensor
    is_safe: Tensor
    true_rewards: Tensor | None = None
    true_costs: Tensor | None = None

    @property
    def num_pairs(self) -> int:
        """Number of preference pairs ``B``."""
        return int(self.better_response_id.shape[0])

    def to(self, device: torch.device | str) -> PreferenceBatch:
        """Move every tensor to ``device``."""
        return _move(self, device)


@dataclass
class PromptBatch:
    """Prompts for rollouts and evaluation.

    Attributes:
        input_ids: ``[B, P]`` long, **left**-padded templated prompts (``bos? template(prompt)``), ready for
            ``generate``.
        attention_mask: ``[B, P]`` long.
        prompts: ``B`` raw prompt strings (before the template), for re-tokenising for scorers with another
            tokenizer and for ground-truth oracles.
        index: ``[B]`` long, the row index of each prompt in its dataset.
        meta: ``B`` dicts of extra per-prompt fields (SafetyWorld: ``topic``, ``kind``); may be empty dicts.
    """

    input_ids: Tensor
    attention_mask: Tensor
    prompts: list[str]
    index: Tensor
    meta: list[dict] = field(default_factory=list)

    def to(self, device: torch.device | str) -> PromptBatch:
        """Move every tensor to ``device``."""
        return _move(self, device)
