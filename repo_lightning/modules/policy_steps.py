"""The pieces of one policy iteration between the pure RL maths and the LightningModule.

``compute_advantages`` (algorithm.md 5.2-5.4), ``ppo_update`` (5.5), the rollout metrics of section 8 and the
per-prompt evaluation records of section 9. Each is a function of typed inputs (the rollout, the objective, the
settings groups, the models); none takes the LightningModule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from repo_lightning.data.records import PromptBatch
from repo_lightning.evaluation import PromptResult
from repo_lightning.modules.policy_config import Estimation, PPOUpdate
from repo_lightning.modules.policy_models import PolicyModels
from repo_lightning.modules.rollout import Rollout, critic_values, response_logits
from repo_lightning.objectives import Objective
from repo_lightning.rl.advantages import (
    broadcast_to_tokens,
    gae,
    group_advantages,
    reinforce_pp_advantages,
    shape_rewards,
    whiten,
)
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


def compute_advantages(
    rollout: Rollout, objective: Objective, estimation: Estimation, samples_per_prompt: int, multiplier: Tensor
) -> Advantages:
    """KL shaping, the advantage estimator on both streams and the objective's advantage mix.

    ``estimator: gae`` uses the critics' values (algorithm.md 5.2-5.3); ``rloo`` and ``grpo`` use the other
    samples of the prompt as baseline on sequence-level scores (``score - beta * sum_t kl_t`` when the KL is
    placed in the reward); ``reinforce_pp`` uses token returns minus their batch mean. The last three need no
    critic.

    Args:
        rollout: The samples, with ``costs`` when the objective uses a cost.
        objective: Cost signal, KL weight of the cost stream and the mix.
        estimation: Estimator, KL and shaping settings.
        samples_per_prompt: ``k`` (the group estimators and the prompt-level rectification group by it).
        multiplier: ``[1]`` the Lagrange multiplier of this iteration (before its dual update).
    """
    mask = rollout.response_mask
    kl = (rollout.logprobs - rollout.ref_logprobs) * mask
    scores = rollout.rewards
    if estimation.missing_eos_penalty is not None and rollout.finished is not None:
        scores = scores + estimation.missing_eos_penalty * (~rollout.finished).to(scores.dtype)
    in_reward = estimation.kl_placement == "reward"
    beta = estimation.kl_coef if in_reward else 0.0
    beta_c = objective.cost_stream_kl_coef(estimation.kl_coef) if in_reward else 0.0
    signal = unsafe = None
    if objective.uses_cost:
        if rollout.costs is None:
            raise ValueError(f"objective {objective.name!r} needs cost scores in the rollout")
        signal, unsafe = objective.cost_signal(rollout.costs, samples_per_prompt)
    reward_returns = cost_returns = cost_adv = None
    clip = estimation.score_clip
    if estimation.estimator == "gae":
        gamma, lam = estimation.gamma, estimation.gae_lambda
        rewards = shape_rewards(scores, kl, mask, beta, clip)
        reward_adv, reward_returns = gae(rewards, rollout.reward_values * mask, mask, gamma, lam)
        if signal is not None:
            shaped = shape_rewards(signal, kl, mask, -beta_c, clip)
            cost_adv, cost_returns = gae(shaped, rollout.cost_values * mask, mask, gamma, lam)
    elif estimation.estimator == "reinforce_pp":
        reward_adv = reinforce_pp_advantages(shape_rewards(scores, kl, mask, beta, clip), mask, estimation.gamma)
        if signal is not None:
            shaped = shape_rewards(signal, kl, mask, -beta_c, clip)
            cost_adv = reinforce_pp_advantages(shaped, mask, estimation.gamma)
    else:
        k, estimator = samples_per_prompt, estimation.estimator
        total_kl = kl.sum(1)
        clipped = scores.float() if clip is None else scores.float().clamp(-clip, clip)
        reward_adv = broadcast_to_tokens(group_advantages(clipped - beta * total_kl, k, estimator), mask)
        if signal is not None:
            clipped = signal.float() if clip is None else signal.float().clamp(-clip, clip)
            cost_adv = broadcast_to_tokens(group_advantages(clipped + beta_c * total_kl, k, estimator), mask)
    advantages = objective.combine(reward_adv, cost_adv, multiplier, unsafe)
    if estimation.whiten_advantages:
        advantages = whiten(advantages, mask)
    return Advantages(advantages, reward_returns, cost_returns, unsafe)


def ppo_update(
    models: PolicyModels,
    rollout: Rollout,
    targets: Advantages,
    update: PPOUpdate,
    estimation: Estimation,
    optimizer_step: Callable[[Tensor], None],
) -> dict[str, Tensor]:
    """``ppo_epochs`` passes of shuffled minibatch updates of the actor and critics.

    Args:
        models: The actor and critics (a ``None`` critic is skipped).
        rollout: The batch of samples.
        targets: Their advantages and returns.
        update: Epochs, minibatch size, clips and loss weights.
        estimation: ``kl_placement`` and ``kl_coef`` (the KL loss term).
        optimizer_step: Takes one minibatch's loss and does zero-grad, backward, clipping and the step (the
            LightningModule's manual optimization).

    Returns:
        Mean policy loss, clip fraction, approximate KL, entropy and value losses over all minibatches: float32
        scalars on the CPU. The per-minibatch statistics are summed as float64 tensors on the models' device (the
        sums a Python float would give, without a host sync per statistic and minibatch) and read once.
    """
    n, p = rollout.num_samples, rollout.prompt_length
    sums: dict[str, Tensor] = {}
    steps = 0
    for _ in range(update.ppo_epochs):
        for idx in torch.randperm(n, device=rollout.sequences.device).split(update.minibatch_size):
            seq, attn, mask = rollout.sequences[idx], rollout.attention_mask[idx], rollout.response_mask[idx]
            logits = response_logits(models.actor, seq, attn, p)
            logprobs = logprobs_from_logits(logits, seq[:, p:])
            policy_loss, stats = ppo_policy_loss(
                logprobs,
                rollout.logprobs[idx],
                targets.advantages[idx],
                mask,
                update.clip_ratio,
                update.clip_ratio_high,
            )
            loss = policy_loss
            step = {"policy_loss": policy_loss, "clipfrac": stats["clipfrac"], "approx_kl": stats["approx_kl"]}
            if estimation.kl_placement == "loss":
                kl_loss = kl_penalty_loss(logprobs, rollout.ref_logprobs[idx], mask)
                loss = loss + estimation.kl_coef * kl_loss
                step["kl_loss"] = kl_loss
            reward_values, cost_values = critic_values(models, seq, attn, p)
            streams = (
                ("reward", reward_values, rollout.reward_values, targets.reward_returns),
                ("cost", cost_values, rollout.cost_values, targets.cost_returns),
            )
            for name, values, old_values, returns in streams:
                if values is None:
                    continue
                value_loss, _ = clipped_value_loss(values, old_values[idx], returns[idx], mask, update.value_clip)
                loss = loss + update.value_loss_coef * value_loss
                step[f"value_loss_{name}"] = value_loss
            if update.entropy_coef > 0:
                entropy = entropy_from_logits(logits, mask)
                loss = loss - update.entropy_coef * entropy
                step["entropy"] = entropy.detach()
            else:
                with torch.no_grad():
                    step["entropy"] = entropy_from_logits(logits.detach(), mask)
            optimizer_step(loss)
            for key, value in step.items():
                value = value.detach().to(_accumulator_dtype(value.device))
                sums[key] = sums[key] + value if key in sums else value
            steps += 1
    keys = list(sums)
    means = (torch.stack([sums[key] for key in keys]) / steps).float().cpu()  # the one host sync
    return {key: mean.clone() for key, mean in zip(keys, means.unbind(), strict=True)}


def _accumulator_dtype(device: torch.device) -> torch.dtype:
    # float64, as the Python floats the sums were once kept in (MPS has no float64).
    return torch.float32 if device.type == "mps" else torch.float64


def rollout_metrics(rollout: Rollout, samples_per_prompt: int, oracle=None) -> dict[str, Tensor]:
    """Rollout statistics of algorithm.md section 8, named as in the glossary (and ground truth with an oracle)."""
    k = samples_per_prompt
    mask = rollout.response_mask
    metrics = {
        "reward_mean": rollout.rewards.float().mean(),
        "response_len_mean": mask.sum(1).float().mean(),
        "kl_mean": (((rollout.logprobs - rollout.ref_logprobs) * mask).sum(1)).mean(),
    }
    if k >= 2 and rollout.responses:
        groups = [rollout.responses[i : i + k] for i in range(0, len(rollout.responses), k)]
        # prompts whose k answers are one and the same text: every baseline gives them zero advantage (section 10)
        metrics["identical_group_rate"] = torch.tensor(sum(len(set(g)) == 1 for g in groups) / len(groups))
    if rollout.resampled_groups is not None:  # before the resample; identical_group_rate counts those left after it
        metrics["resampled_group_rate"] = rollout.resampled_groups.float().mean()
    if rollout.costs is not None:
        costs = rollout.costs.float()
        metrics["cost_mean"] = costs.mean()
        metrics["rectified_cost_mean"] = costs.clamp(min=0).mean()
        metrics["unsafe_response_rate"] = (costs > 0).float().mean()
        metrics["unsafe_prompt_rate"] = (costs > 0).view(-1, k).any(1).float().mean()
    if rollout.cost_spread is not None:
        metrics["cost_ensemble_std"] = rollout.cost_spread.float().mean()
    if rollout.reward_spread is not None:
        metrics["reward_ensemble_std"] = rollout.reward_spread.float().mean()
    if oracle is not None:
        pairs = list(zip(rollout.prompts, rollout.responses, strict=True))
        true_costs = torch.tensor([oracle.harm(p, r) for p, r in pairs])
        metrics["true_reward_mean"] = torch.tensor([oracle.helpfulness(p, r) for p, r in pairs]).mean()
        metrics["true_unsafe_response_rate"] = (true_costs > 0).float().mean()
        metrics["true_unsafe_prompt_rate"] = (true_costs > 0).view(-1, k).any(1).float().mean()
        metrics["refusal_rate"] = torch.tensor([float(oracle.is_refusal(r)) for r in rollout.responses]).mean()
    return {key: value.detach().float().cpu() for key, value in metrics.items()}


def prompt_results(rollout: Rollout, batch: PromptBatch, k: int, oracle=None) -> list[PromptResult]:
    """Per-prompt evaluation records of ``k`` samples per prompt (algorithm.md section 9)."""
    mask = rollout.response_mask
    kl = ((rollout.logprobs - rollout.ref_logprobs) * mask).sum(1).view(-1, k).tolist()
    ref_logprobs = (rollout.ref_logprobs * mask).sum(1).view(-1, k).tolist()
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
                ref_logprobs=ref_logprobs[i],
                **truth,
            )
        )
    return results
