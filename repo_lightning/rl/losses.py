"""Losses for every stage: SFT, the reward and cost models, and the PPO actor and critics.

Pure functions of tensors (no module state, no Trainer). Each loss returns its scalar loss and, where useful,
a dict of detached statistics for logging, in the manner of torchtune's ``rlhf/loss/ppo.py``.

Shapes: ``B`` batch, ``L`` sequence length, ``T`` response length, ``V`` vocabulary size.

References:
    - Safe RLHF: Dai et al., "Safe RLHF: Safe Reinforcement Learning from Human Feedback", ICLR 2024
      (arXiv 2310.12773), Eq. 5 (reward model) and Eq. 6 (cost model).
    - RePO: Peng et al., "Enhancing Safety in Reinforcement Learning with Human Feedback via Rectified Policy
      Optimization", NeurIPS 2025 (arXiv 2410.19933).
    - PPO: Schulman et al., "Proximal Policy Optimization Algorithms", 2017 (arXiv 1707.06347), Eq. 7 (clipped
      surrogate) and Eq. 9 (value loss; the clipped form follows OpenAI baselines' ``ppo2``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over the positions where ``mask`` is true.

    Masked-out positions are replaced by zero before summing (not multiplied), so ``nan``/``inf`` there (e.g.
    the log-probability of a padding token) cannot leak into the result. An all-masked slice gives ``0``, not
    ``nan``.

    Args:
        values: any shape ``[*]``.
        mask: same shape as ``values``, bool or 0/1.
        dim: dimension to reduce; ``None`` reduces over all elements.

    Returns:
        Scalar tensor if ``dim`` is ``None``, else ``values`` with ``dim`` removed.
    """
    mask = mask.bool()
    total = torch.where(mask, values, torch.zeros_like(values))
    count = mask.to(values.dtype)
    if dim is None:
        return total.sum() / count.sum().clamp(min=1.0)
    return total.sum(dim) / count.sum(dim).clamp(min=1.0)


def sft_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Causal-LM negative log-likelihood on the labelled tokens (algorithm.md section 2).

    The shift happens here: ``logits[:, t]`` predicts ``labels[:, t + 1]``. Computed in float32. If every
    label is ``ignore_index`` the loss is ``0`` (with a gradient path), not ``nan``.

    Args:
        logits: ``[B, L, V]`` model outputs.
        labels: ``[B, L]`` long, unshifted, ``ignore_index`` on prompt and padding tokens.
        ignore_index: label value excluded from the loss.

    Returns:
        Scalar mean NLL over the non-ignored tokens.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    shift_labels = labels[:, 1:].reshape(-1)
    nll = F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index, reduction="sum")
    count = (shift_labels != ignore_index).sum().clamp(min=1)
    return nll / count


def reward_model_loss(
    better_scores: Tensor, worse_scores: Tensor, regularization: float = 0.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """Pairwise Bradley-Terry loss of the reward model (Safe RLHF Eq. 5; algorithm.md section 3).

    ``L_R = mean(-log sigmoid(R_w - R_l) + reg * (R_w^2 + R_l^2) / 2)``. The score regulariser keeps the scale
    of the scores bounded (Safe RLHF code, ``score_regularization``).

    Args:
        better_scores: ``[B]`` scores ``R(x, y_w)`` of the more helpful responses.
        worse_scores: ``[B]`` scores ``R(x, y_l)`` of the less helpful responses.
        regularization: coefficient ``reg`` of the squared-score penalty.

    Returns:
        ``(loss, stats)``: scalar loss; detached stats ``accuracy`` (fraction with ``R_w > R_l``) and
        ``margin`` (mean of ``R_w - R_l``).
    """
    better_scores = better_scores.float()
    worse_scores = worse_scores.float()
    margin = better_scores - worse_scores
    losses = -F.logsigmoid(margin)
    if regularization:
        losses = losses + regularization * (better_scores.square() + worse_scores.square()) / 2
    stats = {
        "accuracy": (margin > 0).float().mean().detach(),
        "margin": margin.mean().detach(),
    }
    return losses.mean(), stats


def cost_model_loss(
    safer_costs: Tensor,
    unsafer_costs: Tensor,
    safer_is_safe: Tensor,
    unsafer_is_safe: Tensor,
    regularization: float = 0.0,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Ranking-plus-sign loss of the cost model (Safe RLHF Eq. 6; algorithm.md section 4).

    With ``s(y) = +1`` if ``y`` is labelled unsafe and ``-1`` if safe::

        L_C = mean(-log sigmoid(C_u - C_s) - log sigmoid(s(y_s) C_s) - log sigmoid(s(y_u) C_u)
                   + reg * (C_s^2 + C_u^2) / 2)

    The sign terms pin ``C < 0`` on safe and ``C > 0`` on unsafe responses, which makes ``C(x, y) <= 0`` the
    per-response safety test that RePO's rectified constraint relies on.

    Args:
        safer_costs: ``[B]`` costs ``C(x, y_s)`` of the safer responses.
        unsafer_costs: ``[B]`` costs ``C(x, y_u)`` of the less safe responses.
        safer_is_safe: ``[B]`` bool, absolute safety label of ``y_s``.
        unsafer_is_safe: ``[B]`` bool, absolute safety label of ``y_u``.
        regularization: coefficient ``reg`` of the squared-cost penalty.
        weights: ``[B]`` non-negative per-pair weights (a bootstrap resample of an ensemble head); the loss is
            then ``sum(w * l) / sum(w)``. ``None``: the plain mean.

    Returns:
        ``(loss, stats)``: scalar loss; detached stats ``accuracy`` (fraction with ``C_u > C_s``),
        ``sign_accuracy`` (fraction of all ``2B`` responses with ``(C > 0) == unsafe label``) and ``margin``
        (mean of ``C_u - C_s``).
    """
    safer_costs = safer_costs.float()
    unsafer_costs = unsafer_costs.float()
    safer_is_safe = safer_is_safe.bool()
    unsafer_is_safe = unsafer_is_safe.bool()
    safer_sign = torch.where(safer_is_safe, -1.0, 1.0).to(safer_costs)
    unsafer_sign = torch.where(unsafer_is_safe, -1.0, 1.0).to(unsafer_costs)

    margin = unsafer_costs - safer_costs
    losses = -F.logsigmoid(margin) - F.logsigmoid(safer_sign * safer_costs) - F.logsigmoid(unsafer_sign * unsafer_costs)
    if regularization:
        losses = losses + regularization * (safer_costs.square() + unsafer_costs.square()) / 2

    sign_correct = torch.cat([(safer_costs > 0) == ~safer_is_safe, (unsafer_costs > 0) == ~unsafer_is_safe])
    stats = {
        "accuracy": (margin > 0).float().mean().detach(),
        "sign_accuracy": sign_correct.float().mean().detach(),
        "margin": margin.mean().detach(),
    }
    if weights is not None:
        weights = weights.to(losses)
        return (losses * weights).sum() / weights.sum().clamp(min=1e-12), stats
    return losses.mean(), stats


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_ratio: float,
    clip_ratio_high: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate for the actor (Schulman et al. 2017, Eq. 7; algorithm.md section 5).

    ``loss = -masked_mean(min(rho A, clip(rho, 1 - eps, 1 + eps_high) A))`` with ``rho = exp(logp - logp_old)``,
    averaged over all response tokens of the batch; ``eps_high = eps`` unless ``clip_ratio_high`` is given (DAPO's
    decoupled "clip-higher", Yu et al. 2025, arXiv 2503.14476, section 3.1: a larger upper bound lets a token the
    rollout policy gave little probability rise further in one rollout's update).

    Args:
        logprobs: ``[B, T]`` log-probabilities of the sampled tokens under the current policy (with grad).
        old_logprobs: ``[B, T]`` the same under the rollout policy.
        advantages: ``[B, T]`` per-token advantages.
        mask: ``[B, T]`` bool or 0/1, true on response tokens.
        clip_ratio: ``eps``, the lower clip ``1 - eps`` (and the upper one unless ``clip_ratio_high`` is set).
        clip_ratio_high: ``eps_high``, the upper clip ``1 + eps_high``; ``None`` for ``eps``.

    Returns:
        ``(loss, stats)``: scalar loss; detached stats ``clipfrac`` (fraction of tokens with ``rho`` outside
        ``[1 - eps, 1 + eps_high]``), ``approx_kl`` (the ``k3`` estimator ``(rho - 1) - log rho`` of
        ``KL(pi_old || pi)``, unbiased and non-negative under samples from ``pi_old``; Schulman,
        "Approximating KL divergence", 2020) and ``ratio`` (mean ``rho``), all masked means.
    """
    log_ratio = logprobs.float() - old_logprobs.float()
    ratio = torch.exp(log_ratio)
    advantages = advantages.float()
    surrogate = ratio * advantages
    low, high = 1.0 - clip_ratio, 1.0 + (clip_ratio if clip_ratio_high is None else clip_ratio_high)
    clipped_surrogate = torch.clamp(ratio, low, high) * advantages
    loss = -masked_mean(torch.minimum(surrogate, clipped_surrogate), mask)

    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean(((ratio < low) | (ratio > high)).float(), mask),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_value: float | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss for a critic (PPO Eq. 9 with OpenAI baselines' clipping; algorithm.md section 5).

    ``0.5 * masked_mean(max((V - Ret)^2, (clip(V, V_old - eps_v, V_old + eps_v) - Ret)^2))``. With
    ``clip_value=None`` the unclipped ``0.5 * masked_mean((V - Ret)^2)``.

    Args:
        values: ``[B, T]`` current critic values (with grad).
        old_values: ``[B, T]`` critic values at rollout time.
        returns: ``[B, T]`` GAE returns (targets).
        mask: ``[B, T]`` bool or 0/1, true on response tokens.
        clip_value: ``eps_v``, or ``None`` for no clipping.

    Returns:
        ``(loss, stats)``: scalar loss; detached stat ``clipfrac``, the fraction of tokens where the clipped
        term is the larger one (so it is the one that trains), as in OpenAI baselines / TRL; ``0`` when
        ``clip_value`` is ``None``.
    """
    values = values.float()
    returns = returns.float()
    unclipped = (values - returns).square()
    if clip_value is None:
        losses = unclipped
        clipfrac = torch.zeros((), device=values.device)
    else:
        old_values = old_values.float()
        clipped_values = old_values + (values - old_values).clamp(-clip_value, clip_value)
        clipped = (clipped_values - returns).square()
        losses = torch.maximum(unclipped, clipped)
        clipfrac = masked_mean((clipped > unclipped).float(), mask).detach()
    return 0.5 * masked_mean(losses, mask), {"clipfrac": clipfrac}


def kl_penalty_loss(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """KL to the reference as a loss term (the ``k3`` estimator that GRPO uses, Shao et al. 2024, Eq. 4).

    ``mean_t [exp(ref - logp) - (ref - logp) - 1]`` over response tokens: non-negative, zero where the two
    distributions agree on the sampled token, an unbiased estimate of ``KL(pi || pi_ref)`` on samples of ``pi``.

    Args:
        logprobs: ``[B, T]`` current log-probabilities (with gradient).
        ref_logprobs: ``[B, T]`` reference log-probabilities (constant).
        mask: ``[B, T]`` response tokens.

    Returns:
        Scalar loss.
    """
    log_ratio = (ref_logprobs.detach() - logprobs).clamp(-20.0, 20.0)
    return masked_mean(torch.exp(log_ratio) - log_ratio - 1.0, mask)


def entropy_from_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """Mean per-token entropy of the policy's distribution over the masked positions.

    Computed one row at a time in float32 to bound the extra memory to ``[T, V]``. Differentiable, so it can
    serve as an entropy bonus; detach it for logging.

    Args:
        logits: ``[B, T, V]``.
        mask: ``[B, T]`` bool or 0/1.

    Returns:
        Scalar masked mean of ``H_t = -sum_v p_v log p_v`` (nats).
    """
    entropies = []
    for row in logits:
        logp = torch.log_softmax(row.float(), dim=-1)
        entropies.append(-(logp.exp() * logp).sum(-1))
    return masked_mean(torch.stack(entropies), mask)


def logprobs_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """Log-probability of each token under the logits' distribution.

    ``log_softmax`` then ``gather``, in float32, one row at a time so the float32 copy of the logits never
    exceeds ``[T, V]`` at once (the logits themselves may be bf16).

    Args:
        logits: ``[B, T, V]``; ``logits[:, t]`` is the distribution of ``tokens[:, t]`` (already aligned).
        tokens: ``[B, T]`` long.

    Returns:
        ``[B, T]`` float32 log-probabilities.
    """
    rows = []
    for row_logits, row_tokens in zip(logits, tokens, strict=True):
        logp = torch.log_softmax(row_logits.float(), dim=-1)
        rows.append(logp.gather(-1, row_tokens.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)
