"""Reward shaping, GAE and the advantage mix of PPO, Safe RLHF and RePO (algorithm.md sections 5-6).

Pure functions of tensors. Shapes: ``B`` responses in the rollout batch, ``T`` padded response length.
Response masks are right-padded (``1 ... 1 0 ... 0``); positions where the mask is 0 carry no reward, value or
advantage.

References:
    - GAE: Schulman et al., "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
      ICLR 2016 (arXiv 1506.02438), Eq. 16.
    - Safe RLHF: Dai et al., ICLR 2024 (arXiv 2310.12773), Eq. 11 (the ``(A_R - lam A_C) / (1 + lam)`` mix).
    - RePO: Peng et al., NeurIPS 2025 (arXiv 2410.19933): the rectified penalty ``{C}^+`` whose gradient is
      zero on safe samples, so safe samples keep the pure reward advantage.
    - RLOO: Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
      Feedback in LLMs", ACL 2024 (arXiv 2402.14740), Eq. 7 (leave-one-out baseline over the k samples).
    - GRPO: Shao et al., "DeepSeekMath", 2024 (arXiv 2402.03300), Eq. 3 (group mean and std normalisation;
      outcome supervision: the normalised score is the advantage of every token).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from repo_lightning.rl.losses import masked_mean


def shape_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float, score_clip: float | None) -> Tensor:
    """Per-token shaped reward: a KL penalty on every response token plus the score on the last one.

    ``r_t = -kl_coef * kl_t + [t = T] * clip(score, -score_clip, score_clip)`` (algorithm.md section 5.2).
    The cost stream uses the same function with ``kl_coef = -beta_c``, giving
    ``c_t = beta_c * kl_t + [t = T] * cost``.

    Args:
        scores: ``[B]``, one score per response (reward, or the cost signal).
        kl: ``[B, T]`` per-token ``logprobs - ref_logprobs``.
        mask: ``[B, T]`` bool or 0/1, true on response tokens (right-padded, may end in zeros). The score goes
            on the last true position of each row; a row with no true position is all zeros.
        kl_coef: coefficient of the KL penalty.
        score_clip: clip scores to ``[-score_clip, score_clip]``; ``None`` for no clipping.

    Returns:
        ``[B, T]`` shaped rewards, zero off the mask.
    """
    mask = mask.bool()
    dtype = torch.promote_types(kl.dtype, scores.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    kl = kl.to(dtype)
    scores = scores.to(dtype)
    if score_clip is not None:
        scores = scores.clamp(-score_clip, score_clip)

    rewards = torch.where(mask, -kl_coef * kl, torch.zeros_like(kl))
    positions = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).amax(dim=1, keepdim=True)
    is_last = (positions == last) & mask  # a row with no response token has last = -1: no position matches
    return rewards + is_last.to(dtype) * scores.unsqueeze(1)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the response tokens (GAE Eq. 16; algorithm.md section 5.3).

    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``, ``Ret_t = A_t + V_t``,
    with ``V`` and ``A`` taken as 0 wherever the mask is 0, so the value after the last response token is 0
    (the episode ends there). No gradient flows: both outputs are targets.

    Args:
        rewards: ``[B, T]`` shaped per-token rewards (or costs).
        values: ``[B, T]`` critic values at rollout time.
        mask: ``[B, T]`` bool or 0/1, true on response tokens.
        gamma: discount ``gamma``.
        lam: GAE ``lambda``.

    Returns:
        ``(advantages, returns)``, each ``[B, T]``, zero off the mask.
    """
    mask = mask.bool()
    rewards = torch.where(mask, rewards.detach(), torch.zeros_like(rewards))
    values = torch.where(mask, values.detach().to(rewards.dtype), torch.zeros_like(rewards))
    maskf = mask.to(rewards.dtype)

    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * maskf[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    returns = (advantages + values) * maskf
    return advantages, returns


GroupBaseline = Literal["rloo", "grpo"]


def group_advantages(scores: Tensor, samples_per_prompt: int, baseline: GroupBaseline, eps: float = 1e-6) -> Tensor:
    """Critic-free advantage of each sample from the other samples of its prompt (issue: critic-free estimators).

    - ``rloo`` (RLOO Eq. 7): ``A_i = s_i - mean_{j != i} s_j = k / (k - 1) * (s_i - mean_j s_j)``.
    - ``grpo`` (GRPO Eq. 3): ``A_i = (s_i - mean_j s_j) / (std_j s_j + eps)``, with the unbiased std of the group.

    Args:
        scores: ``[B * k]`` sequence-level scores (reward, or the cost signal), the ``k`` samples of a prompt
            consecutive.
        samples_per_prompt: ``k >= 2``.
        baseline: ``"rloo"`` or ``"grpo"``.
        eps: added to the group std (``grpo``), so a group of equal scores gets advantage 0.

    Returns:
        ``[B * k]`` advantages, one per sample (to be broadcast over its response tokens).

    Raises:
        ValueError: if ``k < 2``, ``k`` does not divide ``len(scores)``, or ``baseline`` is unknown.
    """
    k = samples_per_prompt
    if k < 2 or scores.numel() % k:
        raise ValueError(f"a group baseline needs samples_per_prompt >= 2 dividing {scores.numel()}, got {k}")
    groups = scores.detach().reshape(-1, k)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if baseline == "rloo":
        advantages = centred * (k / (k - 1))
    elif baseline == "grpo":
        advantages = centred / (groups.std(dim=1, keepdim=True) + eps)
    else:
        raise ValueError(f"baseline must be 'rloo' or 'grpo', got {baseline!r}")
    return advantages.reshape(-1)


def reinforce_pp_advantages(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """REINFORCE++ (Hu, arXiv 2501.03262, section 3): token returns minus their mean over the batch, no critic.

    ``G_t = sum_{s >= t} gamma^(s - t) r_s`` over the response's shaped rewards (KL on every token, score on the
    last: :func:`shape_rewards`), and ``A_t = G_t - mean(G)``, the mean taken over every response token of the
    batch (the paper's global-batch baseline). The paper also divides by the batch std; here that is left to
    ``whiten_advantages`` after the objective's mix, because scaling the reward and cost streams by their own
    stds would change the ratio that the multiplier weighs (algorithm.md section 11).

    Args:
        rewards: ``[B, T]`` shaped rewards (or costs), zero off the mask.
        mask: ``[B, T]`` response tokens (right-padded).
        gamma: Discount.

    Returns:
        ``[B, T]`` advantages, zero off the mask, without gradient.
    """
    # discounted returns-to-go: GAE with zero values and lambda 1 (no critic)
    returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, lam=1.0)
    maskf = mask.to(returns.dtype)
    mean = returns.sum() / maskf.sum().clamp(min=1.0)
    return (returns - mean) * maskf


def broadcast_to_tokens(advantages: Tensor, mask: Tensor) -> Tensor:
    """``[B]`` sequence-level advantages -> ``[B, T]``, the same value on every response token, 0 off the mask."""
    return advantages.unsqueeze(1) * mask.to(advantages.dtype)


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Masked whitening, for an optional advantage normalisation.

    ``(x - mean) / sqrt(var + 1e-8)`` with the masked mean and the masked, Bessel-corrected variance; with
    ``shift_mean=False`` the mean is added back (only the scale changes).

    Args:
        values: ``[B, T]``.
        mask: ``[B, T]`` bool or 0/1.
        shift_mean: subtract the mean (``True``) or only rescale (``False``).

    Returns:
        ``[B, T]`` whitened values, zero off the mask.
    """
    mask = mask.bool()
    mean = masked_mean(values, mask)
    centred = torch.where(mask, values - mean, torch.zeros_like(values))
    count = mask.sum()
    variance = centred.square().sum() / (count - 1).clamp(min=1)
    whitened = centred * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros_like(whitened))


def rectified_costs(
    costs: Tensor, samples_per_prompt: int, rectify: Literal["sample", "prompt"] = "sample"
) -> tuple[Tensor, Tensor]:
    """RePO's cost signal and unsafe flags (algorithm.md section 6).

    Args:
        costs: ``[B * k]`` raw costs ``C(x, y)``, grouped by prompt: rows ``i*k .. i*k + k - 1`` are the ``k``
            samples of prompt ``i``.
        samples_per_prompt: ``k``.
        rectify: ``"sample"``: ``cost_signal = {C}^+`` and ``unsafe = C > 0`` per response. ``"prompt"``: with
            ``u(x) = [mean_k C(x, y_k) > 0]``, every sample of an unsafe prompt keeps *its own* cost,
            ``cost_signal = u(x) * C(x, y_k)``, and ``unsafe = u(x)``; samples of a safe prompt get 0 and are not
            flagged. Giving every sample the prompt's ``{mean_k C}^+`` instead would hide which sample was unsafe
            and scale the safety gradient by ``1/k``.

    Returns:
        ``(cost_signal, unsafe)``: ``[B * k]`` float and ``[B * k]`` bool.

    Raises:
        ValueError: if ``samples_per_prompt`` is not positive or does not divide ``len(costs)``, or
            ``rectify`` is unknown.
    """
    if samples_per_prompt < 1 or costs.numel() % samples_per_prompt:
        raise ValueError(f"samples_per_prompt={samples_per_prompt} must be >= 1 and divide the {costs.numel()} costs")
    if rectify == "sample":
        return torch.relu(costs), costs > 0
    if rectify == "prompt":
        unsafe = (costs.reshape(-1, samples_per_prompt).mean(dim=1) > 0).repeat_interleave(samples_per_prompt)
        return torch.where(unsafe, costs, torch.zeros_like(costs)), unsafe
    raise ValueError(f"rectify must be 'sample' or 'prompt', got {rectify!r}")


def combine_advantages(
    reward_advantages: Tensor,
    cost_advantages: Tensor | None,
    lagrange_multiplier: Tensor | float,
    unsafe: Tensor | None,
    normalize: bool = True,
) -> Tensor:
    """One per-token advantage for ``ppo``, ``ppo_lag`` (Safe RLHF) or ``repo`` (algorithm.md section 6).

    - ``cost_advantages is None`` (``ppo``): ``A_R``.
    - ``unsafe is None`` (``ppo_lag``, Safe RLHF Eq. 11): every row gets ``(A_R - lam A_C) / (1 + lam)``.
    - ``unsafe`` given (``repo``): rows with ``unsafe`` false keep exactly ``A_R`` (the rectified penalty has
      no gradient there); unsafe rows get the mix.

    With ``normalize=False`` the mix is ``A_R - lam A_C``.

    Args:
        reward_advantages: ``[B, T]`` ``A_R``.
        cost_advantages: ``[B, T]`` ``A_C``, or ``None``.
        lagrange_multiplier: ``lam``, a float or a tensor with one element (e.g. ``DualVariable.value`` with
            one cost); treated as a constant (detached).
        unsafe: ``[B]`` bool, or ``None``.
        normalize: keep the ``1 / (1 + lam)`` factor.

    Returns:
        ``[B, T]`` combined advantages.

    Raises:
        ValueError: if ``lagrange_multiplier`` has more than one element.
    """
    if cost_advantages is None:
        return reward_advantages
    lam = torch.as_tensor(lagrange_multiplier, device=reward_advantages.device).detach()
    if lam.numel() != 1:
        raise ValueError(f"lagrange_multiplier must hold one value per cost stream, got shape {tuple(lam.shape)}")
    lam = lam.reshape(()).to(reward_advantages.dtype)
    mixed = reward_advantages - lam * cost_advantages
    if normalize:
        mixed = mixed / (1.0 + lam)
    if unsafe is None:
        return mixed
    return torch.where(unsafe.bool().unsqueeze(1), mixed, reward_advantages)
