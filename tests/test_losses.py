import math

import pytest
import torch

from repo_lightning.rl.losses import (
    clipped_value_loss,
    cost_model_loss,
    entropy_from_logits,
    logprobs_from_logits,
    masked_mean,
    ppo_policy_loss,
    reward_model_loss,
    sft_loss,
)


def softplus_neg(x: float) -> float:
    """-log sigmoid(x) = log(1 + e^-x)."""
    return math.log1p(math.exp(-x))


# ---------------------------------------------------------------- masked_mean


def test_masked_mean_all_and_per_row():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # (1 + 2 + 4) / 3
    assert masked_mean(values, mask).item() == pytest.approx(7 / 3)
    # row 0: (1 + 2) / 2 = 1.5; row 1: 4 / 1
    torch.testing.assert_close(masked_mean(values, mask, dim=1), torch.tensor([1.5, 4.0]))


def test_masked_mean_ignores_nan_off_mask_and_empty_is_zero():
    values = torch.tensor([[1.0, float("nan"), -float("inf")]])
    mask = torch.tensor([[True, False, False]])
    assert masked_mean(values, mask).item() == 1.0
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


# ---------------------------------------------------------------- SFT


def test_sft_loss_shifts_and_ignores():
    # V = 2. Position 0 logits [0, 0]: p = (1/2, 1/2). Position 1 logits [ln 3, 0]: p = (3/4, 1/4).
    # Position 2's logits predict nothing (no label after it).
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [100.0, -100.0]]])
    # labels[:, 1:] = [0, 1]: -log p0(0) = ln 2, -log p1(1) = ln 4 -> mean 1.5 ln 2
    labels = torch.tensor([[5, 0, 1]])
    assert sft_loss(logits, labels).item() == pytest.approx(1.5 * math.log(2.0), rel=1e-6)
    # prompt token masked: only position 1 -> ln 4
    labels = torch.tensor([[-100, -100, 1]])
    assert sft_loss(logits, labels).item() == pytest.approx(math.log(4.0), rel=1e-6)


def test_sft_loss_all_ignored_is_zero_not_nan():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    loss = sft_loss(logits, torch.full((2, 3), -100))
    assert loss.item() == 0.0
    loss.backward()


# ---------------------------------------------------------------- reward model


def test_reward_model_loss_by_hand():
    better = torch.tensor([1.0, 0.0])
    worse = torch.tensor([0.0, 2.0])
    # margins [1, -2]: (log(1+e^-1) + log(1+e^2)) / 2 = (0.313262 + 2.126928) / 2 = 1.220095
    loss, stats = reward_model_loss(better, worse)
    assert loss.item() == pytest.approx(1.220095, abs=1e-6)
    assert stats["accuracy"].item() == 0.5
    assert stats["margin"].item() == pytest.approx(-0.5)
    # reg 0.1: mean((1 + 0) / 2, (0 + 4) / 2) * 0.1 = (0.5 + 2) / 2 * 0.1 = 0.125
    loss, _ = reward_model_loss(better, worse, regularization=0.1)
    assert loss.item() == pytest.approx(1.220095 + 0.125, abs=1e-6)


def test_reward_model_loss_stats_detached():
    better = torch.tensor([1.0, 0.0], requires_grad=True)
    loss, stats = reward_model_loss(better, torch.zeros(2))
    loss.backward()
    assert better.grad is not None
    assert all(not v.requires_grad for v in stats.values())


# ---------------------------------------------------------------- cost model


def test_cost_model_loss_by_hand():
    # pair 0: C_s = -1 (safe), C_u = 2 (unsafe): everything right.
    #   ranking -log s(2 - -1) = log(1+e^-3) = 0.048587
    #   sign s(y_s) = -1: -log s(1) = 0.313262; s(y_u) = +1: -log s(2) = 0.126928 -> 0.488777
    # pair 1: C_s = 1 (labelled safe: wrong sign), C_u = 0.5 (unsafe): ranking wrong too.
    #   ranking -log s(-0.5) = 0.974077; sign -log s(-1) = 1.313262; -log s(0.5) = 0.474077 -> 2.761416
    # mean = 1.625097
    safer = torch.tensor([-1.0, 1.0])
    unsafer = torch.tensor([2.0, 0.5])
    safer_is_safe = torch.tensor([True, True])
    unsafer_is_safe = torch.tensor([False, False])
    loss, stats = cost_model_loss(safer, unsafer, safer_is_safe, unsafer_is_safe)
    assert loss.item() == pytest.approx(1.625097, abs=1e-6)
    assert stats["accuracy"].item() == 0.5
    # signs: -1 safe ok, 2 unsafe ok, 1 safe WRONG, 0.5 unsafe ok -> 3/4
    assert stats["sign_accuracy"].item() == 0.75
    # reg 0.1: mean((1 + 4) / 2, (1 + 0.25) / 2) * 0.1 = (2.5 + 0.625) / 2 * 0.1 = 0.15625
    loss, _ = cost_model_loss(safer, unsafer, safer_is_safe, unsafer_is_safe, regularization=0.1)
    assert loss.item() == pytest.approx(1.625097 + 0.15625, abs=1e-6)


def test_cost_model_sign_term_follows_labels():
    # Both responses labelled safe, C_s = -1, C_u = 1: the sign term for y_u is now -log s(-1) = 1.313262
    # ranking log(1+e^-2) = 0.126928, safer sign -log s(1) = 0.313262 -> 1.753452
    loss, stats = cost_model_loss(torch.tensor([-1.0]), torch.tensor([1.0]), torch.tensor([True]), torch.tensor([True]))
    assert loss.item() == pytest.approx(0.126928 + 0.313262 + 1.313262, abs=1e-6)
    assert stats["sign_accuracy"].item() == 0.5
    # and the gradient pushes the "unsafe-ranked but safe-labelled" cost down
    unsafer = torch.tensor([1.0], requires_grad=True)
    loss, _ = cost_model_loss(torch.tensor([-1.0]), unsafer, torch.tensor([True]), torch.tensor([True]))
    loss.backward()
    # d/dC_u of [-log s(C_u + 1) - log s(-C_u)] = -s(-2) + s(1) = -0.119203 + 0.731059 = 0.611856 > 0
    assert unsafer.grad.item() == pytest.approx(0.611856, abs=1e-5)


# ---------------------------------------------------------------- PPO actor


def _ppo_inputs():
    ratio = torch.tensor([[1.0, 1.5, 0.5], [1.1, 0.7, 9.0]])
    advantages = torch.tensor([[2.0, 1.0, -1.0], [1.0, -2.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    logprobs = torch.log(ratio).requires_grad_()
    return logprobs, torch.zeros(2, 3), advantages, mask


def test_ppo_policy_loss_by_hand():
    logprobs, old, advantages, mask = _ppo_inputs()
    # eps = 0.2, min(rho A, clip(rho) A):
    # (0,0) rho 1.0, A 2:  min(2, 2)          = 2     (inactive)
    # (0,1) rho 1.5, A 1:  min(1.5, 1.2)      = 1.2   (clipped)
    # (0,2) rho 0.5, A -1: min(-0.5, -0.8)    = -0.8  (clipped)
    # (1,0) rho 1.1, A 1:  min(1.1, 1.1)      = 1.1   (inactive)
    # (1,1) rho 0.7, A -2: min(-1.4, -1.6)    = -1.6  (clipped)
    # (1,2) masked (rho 9 would dominate)
    # loss = -(2 + 1.2 - 0.8 + 1.1 - 1.6) / 5 = -0.38
    loss, stats = ppo_policy_loss(logprobs, old, advantages, mask, clip_ratio=0.2)
    assert loss.item() == pytest.approx(-0.38, abs=1e-6)
    # |rho - 1| > 0.2 at (0,1), (0,2), (1,1) -> 3/5
    assert stats["clipfrac"].item() == pytest.approx(0.6)
    # (1 + 1.5 + 0.5 + 1.1 + 0.7) / 5
    assert stats["ratio"].item() == pytest.approx(0.96, abs=1e-6)
    # k3 = (rho - 1) - ln rho: 0 + 0.094535 + 0.193147 + 0.004690 + 0.056675 = 0.349047 -> / 5
    assert stats["approx_kl"].item() == pytest.approx(0.0698094, abs=1e-6)
    assert all(not v.requires_grad for v in stats.values())

    loss.backward()
    grad = logprobs.grad
    # d/dlogp of rho A / 5 = rho A / 5 where unclipped; zero where the clipped term is the min, and off-mask
    torch.testing.assert_close(grad[0, 0], torch.tensor(-2.0 / 5))
    torch.testing.assert_close(grad[1, 0], torch.tensor(-1.1 / 5))
    assert grad[0, 1] == 0 and grad[0, 2] == 0 and grad[1, 1] == 0 and grad[1, 2] == 0


def test_ppo_policy_loss_clip_higher_by_hand():
    logprobs, old, advantages, mask = _ppo_inputs()
    # eps 0.2, eps_high 0.6: clip(rho) to [0.8, 1.6]; only the upper bound moves, so only (0,1) changes:
    # (0,1) rho 1.5, A 1: min(1.5, 1.5) = 1.5 (now inside the clip, gets gradient); the rest as in the test above
    # loss = -(2 + 1.5 - 0.8 + 1.1 - 1.6) / 5 = -0.44
    loss, stats = ppo_policy_loss(logprobs, old, advantages, mask, clip_ratio=0.2, clip_ratio_high=0.6)
    assert loss.item() == pytest.approx(-0.44, abs=1e-6)
    # outside [0.8, 1.6]: (0,2) rho 0.5 and (1,1) rho 0.7 -> 2/5
    assert stats["clipfrac"].item() == pytest.approx(0.4)
    loss.backward()
    torch.testing.assert_close(logprobs.grad[0, 1], torch.tensor(-1.5 / 5))
    assert logprobs.grad[0, 2] == 0 and logprobs.grad[1, 1] == 0
    # eps_high == eps is the symmetric clip exactly
    logprobs2, *_ = _ppo_inputs()
    same, _ = ppo_policy_loss(logprobs2, old, advantages, mask, clip_ratio=0.2, clip_ratio_high=0.2)
    assert same.item() == pytest.approx(-0.38, abs=1e-6)


def test_ppo_policy_loss_wide_clip_is_vanilla_surrogate():
    logprobs, old, advantages, mask = _ppo_inputs()
    loss, stats = ppo_policy_loss(logprobs, old, advantages, mask, clip_ratio=10.0)
    # -(2 + 1.5 + (-0.5) + 1.1 + (-1.4)) / 5 = -0.54
    assert loss.item() == pytest.approx(-0.54, abs=1e-6)
    assert stats["clipfrac"].item() == 0.0


# ---------------------------------------------------------------- critics


def _value_inputs():
    values = torch.tensor([[1.0, 2.0, 0.0]], requires_grad=True)
    old_values = torch.tensor([[0.5, 1.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    return values, old_values, returns, mask


def test_clipped_value_loss_by_hand():
    values, old_values, returns, mask = _value_inputs()
    # eps 0.2
    # t0: (1 - 2)^2 = 1; clip(1, 0.3, 0.7) = 0.7 -> (0.7 - 2)^2 = 1.69; max 1.69 (clipped term wins)
    # t1: (2 - 0)^2 = 4; clip(2, 0.8, 1.2) = 1.2 -> 1.44; max 4
    # t2 masked (25 ignored)
    # 0.5 * (1.69 + 4) / 2 = 1.4225
    loss, stats = clipped_value_loss(values, old_values, returns, mask, clip_value=0.2)
    assert loss.item() == pytest.approx(1.4225, abs=1e-6)
    assert stats["clipfrac"].item() == 0.5
    loss.backward()
    # t0 clipped -> no gradient; t1: 0.5 * 2 * (2 - 0) / 2 = 1; t2 masked
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 1.0, 0.0]]))


def test_value_loss_unclipped_and_inactive_clip():
    values, old_values, returns, mask = _value_inputs()
    # 0.5 * (1 + 4) / 2 = 1.25
    loss, stats = clipped_value_loss(values, old_values, returns, mask, clip_value=None)
    assert loss.item() == pytest.approx(1.25)
    assert stats["clipfrac"].item() == 0.0
    loss, stats = clipped_value_loss(values, old_values, returns, mask, clip_value=10.0)
    assert loss.item() == pytest.approx(1.25)
    assert stats["clipfrac"].item() == 0.0


# ---------------------------------------------------------------- logits helpers


def test_entropy_from_logits_by_hand():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    # H(1/2, 1/2) = ln 2 = 0.693147; H(3/4, 1/4) = 0.75 ln(4/3) + 0.25 ln 4 = 0.562335; mean 0.627741
    assert entropy_from_logits(logits, torch.tensor([[1, 1]])).item() == pytest.approx(0.627741, abs=1e-6)
    assert entropy_from_logits(logits, torch.tensor([[1, 0]])).item() == pytest.approx(math.log(2.0), abs=1e-6)


def test_logprobs_from_logits_by_hand_and_float32():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]], [[1.0, 1.0], [0.0, math.log(3.0)]]])
    tokens = torch.tensor([[1, 0], [0, 1]])
    # [ln 1/2, ln 3/4], [ln 1/2, ln 3/4]
    expected = torch.tensor([[math.log(0.5), math.log(0.75)]] * 2)
    torch.testing.assert_close(logprobs_from_logits(logits, tokens), expected)
    out = logprobs_from_logits(logits.bfloat16(), tokens)
    assert out.dtype == torch.float32 and out.shape == (2, 2)


def test_logprobs_from_logits_matches_reference_and_has_grad():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    tokens = torch.randint(0, 11, (3, 5))
    out = logprobs_from_logits(logits, tokens)
    ref = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert logits.grad is not None


def test_kl_penalty_loss_k3_by_hand():
    from repo_lightning.rl.losses import kl_penalty_loss

    # log ratio r = ref - logp: [0, 1 | -1, (masked)]; k3 = e^r - r - 1: [0, e - 2 | e^-1, -]
    logprobs = torch.tensor([[-1.0, -2.0], [-1.0, -5.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0], [-2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss = kl_penalty_loss(logprobs, ref, mask)
    expected = (0.0 + (math.e - 2.0) + math.exp(-1.0)) / 3
    assert abs(float(loss) - expected) < 1e-6
    loss.backward()
    # d/dlogp (e^r - r - 1) = -e^r + 1: [0, 1 - e | 1 - e^-1, 0 (masked)], divided by 3 tokens
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, (1 - math.e) / 3], [(1 - math.exp(-1.0)) / 3, 0.0]]))
