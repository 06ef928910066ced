"""Frozen reward/cost models scoring policy samples, with or without the policy's tokenizer.

When a score model shares the policy's tokenizer and prompt template, it reads the rollout's token ids directly.
Otherwise (a Beaver cost model beside a Llama-3.2 policy, say) each response is decoded to text and re-tokenised
with the score model's tokenizer and the prompt template it was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from repo_lightning.models.backbone import sequence_scores
from repo_lightning.text.templates import encode_prompt, encode_response


def same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether two tokenizers map text to the same ids (same vocabulary and special tokens)."""
    if a is b:
        return True
    specials = ("bos_token_id", "eos_token_id", "pad_token_id")
    return all(getattr(a, s) == getattr(b, s) for s in specials) and a.get_vocab() == b.get_vocab()


@dataclass
class Scorer:
    """A frozen score model with the tokenizer and template its inputs must use.

    Attributes:
        model: ``AutoModelForSequenceClassification`` with one label.
        tokenizer: Its tokenizer.
        template: Its prompt template (used only when re-tokenising).
        reuse_policy_ids: True when tokenizer and template equal the policy's, so rollout ids are scored as is.
        max_length: Longest re-tokenised input.
        aggregate: How an ensemble's heads become one score (see :func:`aggregate_heads`).
        kappa: The ``mean_plus_std`` weight of the heads' spread.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    template: str
    reuse_policy_ids: bool
    max_length: int = 2048
    aggregate: Literal["mean", "mean_plus_std", "max"] = "mean"
    kappa: float = 1.0


def aggregate_heads(scores: torch.Tensor, how: str = "mean", kappa: float = 1.0) -> torch.Tensor:
    """One score per sample from an ensemble's ``[N, E]`` scores (``[N]`` passes through unchanged).

    For a cost, ``mean_plus_std`` (``mean + kappa * std``, uncertainty-weighted) and ``max`` (worst case) are the
    conservative choices: the cost-side mirror of UWO and WCO in Coste et al., "Reward Model Ensembles Help
    Mitigate Overoptimization", ICLR 2024. A sample the heads disagree on counts as less safe, so the policy
    cannot profit from the part of the cost model's error that the ensemble can see.

    Args:
        scores: ``[N]`` or ``[N, E]``.
        how: ``mean``, ``mean_plus_std`` or ``max``.
        kappa: Weight of the (unbiased) std across heads for ``mean_plus_std``.
    """
    if scores.dim() == 1:
        return scores
    if how == "mean":
        return scores.mean(1)
    if how == "mean_plus_std":
        return scores.mean(1) + kappa * scores.std(1)
    if how == "max":
        return scores.amax(1)
    raise ValueError(f"aggregate must be mean, mean_plus_std or max, got {how!r}")


def aggregate_rewards(scores: torch.Tensor, how: str = "mean", kappa: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One reward per sample from ``[N, M]`` scores of ``M`` reward models, and their spread ``[N]``.

    Bradley-Terry reward models share no offset or scale, so before they are combined each model ``j >= 1`` is
    aligned to the first: its scores are standardised over the ``N`` samples and mapped to the first model's mean
    and (population) std. Models that agree with the first up to such a map therefore leave its scores unchanged,
    and only disagreement in the *ordering or shape* of the scores moves the result: ``mean`` averages the aligned
    scores, ``mean_minus_std`` subtracts ``kappa`` times their (unbiased) std across models (UWO in Coste et al.,
    "Reward Model Ensembles Help Mitigate Overoptimization", ICLR 2024), ``min`` takes the worst (WCO).

    Args:
        scores: ``[N, M]``, the first column the reference model.
        how: ``mean``, ``mean_minus_std`` or ``min``.
        kappa: Weight of the spread for ``mean_minus_std``.

    Returns:
        ``(rewards, spread)``: ``[N]`` each; ``spread`` is the std across the aligned models.
    """
    scores = scores.float()
    mean, std = scores.mean(0), scores.std(0, unbiased=False).clamp(min=1e-6)
    aligned = mean[0] + std[0] * (scores - mean) / std
    aligned[:, 0] = scores[:, 0]  # the reference model exactly as it scored
    spread = aligned.std(1) if aligned.shape[1] > 1 else torch.zeros_like(aligned[:, 0])
    if how == "mean":
        return aligned.mean(1), spread
    if how == "mean_minus_std":
        return aligned.mean(1) - kappa * spread, spread
    if how == "min":
        return aligned.amin(1), spread
    raise ValueError(f"reward aggregate must be mean, mean_minus_std or min, got {how!r}")


def decode_responses(
    tokenizer: PreTrainedTokenizerBase, response_ids: torch.Tensor, response_mask: torch.Tensor
) -> list[str]:
    """Response texts from ``[N, T]`` ids and their ``[N, T]`` mask (special tokens dropped)."""
    return [
        tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True).strip()
        for ids, mask in zip(response_ids, response_mask, strict=True)
    ]


def retokenize(scorer: Scorer, prompts: list[str], responses: list[str], device: torch.device) -> tuple:
    """Right-padded ``[N, L]`` ids and mask of ``template(prompt) response eos`` in the scorer's tokenizer."""
    tok = scorer.tokenizer
    rows = []
    for prompt, response in zip(prompts, responses, strict=True):
        prompt_ids, _ = encode_prompt(tok, prompt, scorer.template, scorer.max_length // 2)
        response_ids, _ = encode_response(tok, response, scorer.max_length - len(prompt_ids))
        rows.append(prompt_ids + response_ids)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def score_samples(
    scorer: Scorer,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    prompts: list[str],
    responses: list[str] | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Score ``N`` prompt+response samples: ``[N]`` float32, or ``[N, E]`` for an ensemble of ``E`` heads.

    Args:
        scorer: The frozen score model.
        sequences: ``[N, L]`` policy token ids (left-padded prompt, response, right padding).
        attention_mask: ``[N, L]``.
        prompts: ``N`` raw prompts (needed only when re-tokenising).
        responses: ``N`` decoded responses (needed only when re-tokenising).
        batch_size: Score in chunks of this many rows (``None``: all at once).
    """
    chunk = batch_size or sequences.shape[0]
    out = []
    for start in range(0, sequences.shape[0], chunk):
        stop = start + chunk
        if scorer.reuse_policy_ids:
            out.append(sequence_scores(scorer.model, sequences[start:stop], attention_mask[start:stop]))
        else:
            if responses is None:
                raise ValueError("a scorer with its own tokenizer needs the decoded responses")
            ids, mask = retokenize(scorer, prompts[start:stop], responses[start:stop], sequences.device)
            out.append(sequence_scores(scorer.model, ids, mask))
    return torch.cat(out)
