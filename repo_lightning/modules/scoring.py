"""Score-model pieces shared by the reward and cost stages (functions, composed by each module)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from repo_lightning.data.records import PreferenceBatch
from repo_lightning.models.backbone import sequence_scores


def pair_scores(model: PreTrainedModel, batch: PreferenceBatch) -> torch.Tensor:
    """Score both responses of every pair in one forward pass: ``[2B, L]`` -> ``[B, 2]`` (``[B, 2, E]``) float32.

    Reads the score at the last *attended* token (the response's eos) with :func:`sequence_scores`, the one readout
    that the policy stage's rollout scoring and the evaluation use too. Hugging Face's own pooling (rightmost token
    that is not ``pad_token_id``) agrees whenever pad and eos differ; with pad == eos (Llama-2) it would read the
    token *before* eos, so the RL stage would score with a readout the model was never trained on.
    """
    scores = sequence_scores(model, batch.input_ids, batch.attention_mask)
    return scores.view(2, batch.num_pairs, *scores.shape[1:]).transpose(0, 1)


def pick(scores: torch.Tensor, response_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``[B, 2]`` scores into (the labelled response's score, the other one's), each ``[B]``."""
    chosen = scores.gather(1, response_id[:, None]).squeeze(1)
    other = scores.gather(1, (1 - response_id)[:, None]).squeeze(1)
    return chosen, other
