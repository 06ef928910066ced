"""Score-model pieces shared by the reward and cost stages (functions, composed by each module)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from repo_lightning.data.records import PreferenceBatch


def pair_scores(model: PreTrainedModel, batch: PreferenceBatch) -> torch.Tensor:
    """Score both responses of every pair in one forward pass: ``[2B, L]`` -> ``[B, 2]`` float32.

    Uses the model's own Hugging Face head and pooling (last non-pad token of right-padded rows), so an exported
    model scores exactly as it did in training.
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    scores = logits[:, 0].float()
    return scores.view(2, batch.num_pairs).T


def pick(scores: torch.Tensor, response_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``[B, 2]`` scores into (the labelled response's score, the other one's), each ``[B]``."""
    chosen = scores.gather(1, response_id[:, None]).squeeze(1)
    other = scores.gather(1, (1 - response_id)[:, None]).squeeze(1)
    return chosen, other
