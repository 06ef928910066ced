"""The pieces of one policy iteration that sit between the pure RL maths and the LightningModule.

``compute_advantages`` (algorithm.md 5.2-5.4), ``ppo_update`` (5.5), ``dual_statistic`` (7) and the metrics of
section 8. ``compute_advantages``, ``dual_statistic`` and the metrics are functions of the rollout and the
hyperparameter mapping; ``ppo_update`` takes the module for its models, optimizer and ``manual_backward``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from repo_lightning.data.records import PromptBatch
from repo_lightning.evaluation import PromptResult
from repo_lightning.modules.rollout import Rollout, response_logits, response_values
from repo_lightning.rl.advantages import (
    broadcast_to_tokens,
    combine_advantages,
    gae,
    group_advantages,
    rectified_costs,
    shape_rewards,
    whiten,
)
from repo_lightning.rl.dual import expected_cost_statistic, rectified_cost_statistic, unsafe_rate_statistic
from repo_lightning.rl.losses import (
    clipped_value_loss,
    entropy_from_logits,
    kl_penalty_loss,
    logprobs_from_logits,
    ppo_policy_loss,
)


@dataclass
class Advantages:
    """Per-token targets of one rollout; every tensor ``[N, T]`` except ``unsafe`` ``[N]``.

    Attributes:
        advantages: The combined advantage the actor is trained on.
        reward_returns: GAE returns of the reward stream (reward critic target), or ``None`` without critics.
        cost_returns: GAE returns of the cost stream, or ``None`` without a cost critic.
        unsafe: ``[N]`` bool, the samples RePO penalises, or ``None``.
    """

    advantages: Tensor
    reward_returns: Tensor | None
    cost_returns: Tensor | None
    unsafe: Tensor | None


def cost_kl_coef(hp: Mapping) -> float:
    """``beta_c``: as configured, else the value that gives every sample the same KL weight ``beta``.

    With the ``1/(1+lam)`` factor (``normalize_advantage_mix``) a mixed sample's KL weight is
    ``(beta + lam beta_c) / (1 + lam)``, which is ``beta`` for ``beta_c = beta`` (Safe RLHF's code); without it the
    weight is ``beta + lam beta_c``, which is ``beta`` for ``beta_c = 0``. Unmixed samples (``ppo``, RePO's safe
    ones) always carry ``beta``. So the default holds the KL budget equal across algorithms and samples.
    """
    if hp["cost_kl_coef"] is not None:
        return hp["cost_kl_coef"]
    return hp["kl_coef"] if hp["normalize_advantage_mix"] else 0.0


def cost_signal(costs: Tensor, hp: Mapping) -> tuple[Tensor | None, Tensor | None]:
    """``(cost_signal [N], unsafe [N] or None)`` of the algorithm (algorithm.md section 6); ``(None, None)`` for ppo."""
    algorithm = hp["algorithm"]
    if algorithm == "ppo":
        return None, None
    if algorithm == "ppo_lag":
        return costs, None
    if algorithm == "repo":
        return rectified_costs(costs, hp["samples_per_prompt"], hp["rectify"])
    raise ValueError(f"unknown algorithm {algorithm!r}")


def compute_advantages(rollout: Rollout, hp: Mapping, lagrange_multiplier: Tensor) -> Advantages:
    """KL shaping, the advantage estimator on both streams and the algorithm's advantage mix.

    ``advantage_estimator: gae`` uses the critics' values (algorithm.md 5.2-5.3); ``rloo`` and ``grpo`` use the
    other samples of the prompt as baseline on sequence-level scores (``score - beta * sum_t kl_t`` when the KL
    is placed in the reward), and need no critic.
    """
    mask = rollout.response_mask
    kl = (rollout.logprobs - rollout.ref_logprobs) * mask
    scores = rollout.rewards
    if hp["missing_eos_penalty"] is not None and rollout.finished is not None:
        scores = scores + hp["missing_eos_penalty"] * (~rollout.finished).to(scores.dtype)
    in_reward = hp["kl_placement"] == "reward"
    beta = hp["kl_coef"] if in_reward else 0.0
    beta_c = cost_kl_coef(hp) if in_reward else 0.0
    signal, unsafe = (None, None) if rollout.costs is None else cost_signal(rollout.costs, hp)
    if hp["algorithm"] != "ppo" and signal is None:
        raise ValueError(f"algorithm {hp['algorithm']!r} needs cost scores in the rollout")
    reward_returns = cost_returns = cost_adv = None
    if hp["advantage_estimator"] == "gae":
        rewards = shape_rewards(scores, kl, mask, beta, hp["score_clip"])
        reward_adv, reward_returns = gae(rewards, rollout.reward_values * mask, mask, hp["gamma"], hp["gae_lambda"])
        if signal is not None:
            shaped = shape_rewards(signal, kl, mask, -beta_c, hp["score_clip"])
            cost_adv, cost_returns = gae(shaped, rollout.cost_values * mask, mask, hp["gamma"], hp["gae_lambda"])
    else:
        k, estimator, clip = hp["samples_per_prompt"], hp["advantage_estimator"], hp["score_clip"]
        total_kl = kl.sum(1)
        clipped = scores.float() if clip is None else scores.float().clamp(-clip, clip)
        reward_adv = broadcast_to_tokens(group_advantages(clipped - beta * total_kl, k, estimator), mask)
        if signal is not None:
            clipped = signal.float() if clip is None else signal.float().clamp(-clip, clip)
            cost_adv = broadcast_to_tokens(group_advantages(clipped + beta_c * total_kl, k, estimator), mask)
    advantages = combine_advantages(reward_adv, cost_adv, lagrange_multiplier, unsafe, hp["normalize_advantage_mix"])
    if hp["whiten_advantages"]:
        advantages = whiten(advantages, mask)
    return Advantages(advantages, reward_returns, cost_returns, unsafe)


def ppo_update(module, rollout: Rollout, targets: Advantages) -> dict[str, Tensor]:
    """``ppo_epochs`` passes of shuffled minibatch updates of the actor and critics (manual optimization).

    Args:
        module: The :class:`PolicyModule` (its models, optimizer and ``manual_backward``).
        rollout: The batch of samples.
        targets: Their advantages and returns.

    Returns:
        Mean policy loss, clip fraction, approximate KL, entropy and value losses over all minibatches.
    """
    hp = module.hparams
    optimizer = module.optimizers()
    n, p = rollout.num_samples, rollout.prompt_length
    sums: dict[str, float] = {}
    steps = 0
    for _ in range(hp.ppo_epochs):
        for idx in torch.randperm(n, device=rollout.sequences.device).split(hp.minibatch_size):
            seq, attn, mask = rollout.sequences[idx], rollout.attention_mask[idx], rollout.response_mask[idx]
            logits = response_logits(module.actor, seq, attn, p)
            logprobs = logprobs_from_logits(logits, seq[:, p:])
            policy_loss, stats = ppo_policy_loss(
                logprobs, rollout.logprobs[idx], targets.advantages[idx], mask, hp.clip_ratio
            )
            loss = policy_loss
            step = {"policy_loss": policy_loss, "clipfrac": stats["clipfrac"], "approx_kl": stats["approx_kl"]}
            if hp.kl_placement == "loss":
                kl_loss = kl_penalty_loss(logprobs, rollout.ref_logprobs[idx], mask)
                loss = loss + hp.kl_coef * kl_loss
                step["kl_loss"] = kl_loss
            if module.reward_critic is not None:
                values = response_values(module.reward_critic, seq, attn, p)
                value_loss_reward, _ = clipped_value_loss(
                    values, rollout.reward_values[idx], targets.reward_returns[idx], mask, hp.value_clip
                )
                loss = loss + hp.value_loss_coef * value_loss_reward
                step["value_loss_reward"] = value_loss_reward
            if module.cost_critic is not None:
                cost_values = response_values(module.cost_critic, seq, attn, p)
                value_loss_cost, _ = clipped_value_loss(
                    cost_values, rollout.cost_values[idx], targets.cost_returns[idx], mask, hp.value_clip
                )
                loss = loss + hp.value_loss_coef * value_loss_cost
                step["value_loss_cost"] = value_loss_cost
            with torch.no_grad():
                step["entropy"] = entropy_from_logits(logits.detach(), mask)
            optimizer.zero_grad()
            module.manual_backward(loss)
            if hp.max_grad_norm is not None:
                module.clip_gradients(optimizer, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
            optimizer.step()
            for key, value in step.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            steps += 1
    return {key: torch.tensor(total / steps) for key, total in sums.items()}


def dual_statistic(costs: Tensor, hp: Mapping) -> Tensor:
    """This rank's constraint statistic ``g`` (before averaging across ranks), algorithm.md section 7.

    ``ppo_lag``: ``mean(C) - threshold``. ``repo`` with ``repo_constraint: unsafe_rate`` (default): the share of
    unsafe samples (``C > 0``; with ``rectify: prompt``, of prompts with ``mean_k C > 0``) minus
    ``target_unsafe_rate``; with ``rectified_cost``: ``mean({C}^+) - tolerance`` (the paper's, on the cost
    model's scale).
    """
    algorithm = hp["algorithm"]
    if algorithm == "ppo_lag":
        return expected_cost_statistic(costs.float(), hp["threshold"])
    if algorithm != "repo":
        raise ValueError(f"algorithm {algorithm!r} has no constraint statistic")
    costs = costs.float()
    if hp["rectify"] == "prompt":
        costs = costs.view(-1, hp["samples_per_prompt"]).mean(1)
    if hp["repo_constraint"] == "unsafe_rate":
        return unsafe_rate_statistic(costs, hp["target_unsafe_rate"])
    return rectified_cost_statistic(costs, hp["tolerance"])


def iteration_metrics(
    rollout: Rollout,
    targets: Advantages | None,
    hp: Mapping,
    oracle=None,
    samples_per_prompt: int | None = None,
) -> dict[str, Tensor]:
    """Rollout statistics of algorithm.md section 8 (and ground-truth ones when an oracle is known)."""
    k = samples_per_prompt or hp["samples_per_prompt"]
    mask = rollout.response_mask
    metrics = {
        "reward_mean": rollout.rewards.float().mean(),
        "response_len": mask.sum(1).float().mean(),
        "kl": (((rollout.logprobs - rollout.ref_logprobs) * mask).sum(1)).mean(),
    }
    if rollout.costs is not None:
        costs = rollout.costs.float()
        metrics["cost_mean"] = costs.mean()
        metrics["rectified_cost_mean"] = costs.clamp(min=0).mean()
        metrics["unsafe_frac"] = (costs > 0).float().mean()
        metrics["unsafe_prompt_frac"] = (costs > 0).view(-1, k).any(1).float().mean()
    if oracle is not None:
        true_costs = torch.tensor([oracle.harm(p, r) for p, r in zip(rollout.prompts, rollout.responses, strict=True)])
        true_rewards = torch.tensor(
            [oracle.helpfulness(p, r) for p, r in zip(rollout.prompts, rollout.responses, strict=True)]
        )
        metrics["true_reward_mean"] = true_rewards.mean()
        metrics["true_unsafe_frac"] = (true_costs > 0).float().mean()
        metrics["true_unsafe_prompt_frac"] = (true_costs > 0).view(-1, k).any(1).float().mean()
        refusals = torch.tensor([float(oracle.is_refusal(r)) for r in rollout.responses])
        metrics["true_refusal_frac"] = refusals.mean()
    return {key: value.detach().float().cpu() for key, value in metrics.items()}


def prompt_results(rollout: Rollout, batch: PromptBatch, k: int, oracle=None) -> list[PromptResult]:
    """Per-prompt evaluation records of ``k`` samples per prompt (algorithm.md section 9)."""
    mask = rollout.response_mask
    kl = ((rollout.logprobs - rollout.ref_logprobs) * mask).sum(1).view(-1, k).tolist()
    lengths = mask.sum(1).long().view(-1, k).tolist()
    rewards = rollout.rewards.float().view(-1, k).tolist()
    costs = (
        rollout.costs.float().view(-1, k).tolist() if rollout.costs is not None else [[0.0] * k] * len(batch.prompts)
    )
    results = []
    for i, prompt in enumerate(batch.prompts):
        responses = rollout.responses[i * k : (i + 1) * k]
        meta = batch.meta[i] if batch.meta else {}
        truth = {}
        if oracle is not None:
            truth = {
                "true_rewards": [oracle.helpfulness(prompt, r) for r in responses],
                "true_costs": [oracle.harm(prompt, r) for r in responses],
                "refusals": [oracle.is_refusal(r) for r in responses],
            }
        results.append(
            PromptResult(
                index=int(batch.index[i]),
                prompt=prompt,
                responses=responses,
                rewards=rewards[i],
                costs=costs[i],
                kl=kl[i],
                lengths=lengths[i],
                kind=meta.get("kind"),
                **truth,
            )
        )
    return results
