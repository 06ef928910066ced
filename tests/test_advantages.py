import math

import pytest
import torch

from repo_lightning.rl.advantages import combine_advantages, gae, rectified_costs, shape_rewards, whiten

# ---------------------------------------------------------------- shaping


def test_shape_rewards_kl_everywhere_score_at_last_token():
    scores = torch.tensor([2.0, 10.0, 3.0])
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, -0.5, 1.0, 9.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    # kl_coef 0.5, clip 5:
    # row 0: -0.05, -0.1, -0.15 + 2 = 1.85, 0 (pad)
    # row 1: -0.25, +0.25 + clip(10) = 5.25, 0, 0
    # row 2: empty mask -> zeros
    rewards = shape_rewards(scores, kl, mask, kl_coef=0.5, score_clip=5.0)
    expected = torch.tensor([[-0.05, -0.1, 1.85, 0.0], [-0.25, 5.25, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)


def test_shape_rewards_no_clip_and_cost_stream_sign():
    scores = torch.tensor([10.0])
    kl = torch.tensor([[0.2, 0.4]])
    mask = torch.tensor([[True, True]])
    # no clip: -0.1, -0.2 + 10
    torch.testing.assert_close(
        shape_rewards(scores, kl, mask, kl_coef=0.5, score_clip=None), torch.tensor([[-0.1, 9.8]])
    )
    # cost stream, kl_coef = -beta_c = -0.5: c = +0.5 kl, + cost at the end: 0.1, 0.2 + 10
    torch.testing.assert_close(
        shape_rewards(scores, kl, mask, kl_coef=-0.5, score_clip=None), torch.tensor([[0.1, 10.2]])
    )


# ---------------------------------------------------------------- GAE

# r = [0, 0, 1], V = [0.5, 0.4, 0.2], gamma 1, lambda 0.95, V after the end = 0:
# t=2: delta = 1 + 0 - 0.2 = 0.8;       A2 = 0.8
# t=1: delta = 0 + 0.2 - 0.4 = -0.2;    A1 = -0.2 + 0.95 * 0.8 = 0.56
# t=0: delta = 0 + 0.4 - 0.5 = -0.1;    A0 = -0.1 + 0.95 * 0.56 = 0.432
# Ret = A + V = [0.932, 0.96, 1.0]
HAND_ADV = [0.432, 0.56, 0.8]
HAND_RET = [0.932, 0.96, 1.0]


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.2]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.95)
    torch.testing.assert_close(advantages, torch.tensor([HAND_ADV]))
    torch.testing.assert_close(returns, torch.tensor([HAND_RET]))


def test_gae_masked_tail_is_zero_and_ignored():
    # Same row padded with garbage: the tail must neither bootstrap nor receive values.
    rewards = torch.tensor([[0.0, 0.0, 1.0, 3.0, 3.0]])
    values = torch.tensor([[0.5, 0.4, 0.2, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    advantages, returns = gae(rewards, values, mask)
    torch.testing.assert_close(advantages, torch.tensor([HAND_ADV + [0.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([HAND_RET + [0.0, 0.0]]))


def test_gae_two_rows_of_different_lengths():
    # row 1, length 2: r = [0.1, -1], V = [1, 2]
    # t=1: delta = -1 + 0 - 2 = -3;         A1 = -3
    # t=0: delta = 0.1 + 2 - 1 = 1.1;       A0 = 1.1 + 0.95 * -3 = -1.75
    # Ret = [-0.75, -1.0]
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.1, -1.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.2], [1.0, 2.0, 4.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(advantages, torch.tensor([HAND_ADV, [-1.75, -3.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([HAND_RET, [-0.75, -1.0, 0.0]]))


def test_gae_discount():
    # gamma 0.5, lambda 0.5, r = [1, 2], V = [1, 1]
    # t=1: delta = 2 - 1 = 1;               A1 = 1
    # t=0: delta = 1 + 0.5 * 1 - 1 = 0.5;   A0 = 0.5 + 0.25 * 1 = 0.75
    advantages, returns = gae(torch.tensor([[1.0, 2.0]]), torch.ones(1, 2), torch.ones(1, 2), gamma=0.5, lam=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[0.75, 1.0]]))
    torch.testing.assert_close(returns, torch.tensor([[1.75, 2.0]]))


def test_gae_outputs_carry_no_grad():
    values = torch.ones(1, 2, requires_grad=True)
    advantages, returns = gae(torch.ones(1, 2), values, torch.ones(1, 2))
    assert not advantages.requires_grad and not returns.requires_grad


# ---------------------------------------------------------------- whitening


def test_whiten_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # masked: 1, 2, 3, 4; mean 2.5; unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    std = math.sqrt(5 / 3)
    expected = torch.tensor([[-1.5 / std, -0.5 / std, 0.5 / std], [1.5 / std, 0.0, 0.0]])
    torch.testing.assert_close(whiten(values, mask), expected)
    expected_shifted = torch.where(mask.bool(), expected + 2.5, torch.zeros_like(expected))
    torch.testing.assert_close(whiten(values, mask, shift_mean=False), expected_shifted)


# ---------------------------------------------------------------- rectified costs


def test_rectified_costs_sample():
    costs = torch.tensor([-1.0, 2.0, 0.5, -3.0, 0.0, -0.5])
    signal, unsafe = rectified_costs(costs, samples_per_prompt=2, rectify="sample")
    torch.testing.assert_close(signal, torch.tensor([0.0, 2.0, 0.5, 0.0, 0.0, 0.0]))
    # C = 0 is safe (C <= 0)
    assert unsafe.tolist() == [False, True, True, False, False, False]


def test_rectified_costs_prompt_keeps_each_samples_own_cost():
    costs = torch.tensor([-1.0, 2.0, 0.5, -3.0, 0.0, -0.5])
    # k = 2: prompt means [0.5, -1.25, -0.25]: only prompt 0 is unsafe, and its samples keep their own costs
    signal, unsafe = rectified_costs(costs, samples_per_prompt=2, rectify="prompt")
    torch.testing.assert_close(signal, torch.tensor([-1.0, 2.0, 0.0, 0.0, 0.0, 0.0]))
    assert unsafe.tolist() == [True, True, False, False, False, False]
    # k = 3: means [(-1 + 2 + 0.5) / 3 = 0.5, (-3 + 0 - 0.5) / 3 < 0]
    signal, unsafe = rectified_costs(costs, samples_per_prompt=3, rectify="prompt")
    torch.testing.assert_close(signal, torch.tensor([-1.0, 2.0, 0.5, 0.0, 0.0, 0.0]))
    assert unsafe.tolist() == [True, True, True, False, False, False]


def test_rectified_costs_prompt_gives_the_exact_bandit_gradient():
    # A 4-armed bandit with a uniform softmax policy (theta = 0, pi = 1/4) and one sample of each arm, k = 4.
    # Costs [2, -0.5, -0.5, -0.5]: mean 0.125 > 0, so the prompt is unsafe.
    # Exact gradient of E[C] w.r.t. theta_0: pi_0 * (C_0 - E[C]) = 0.25 * (2 - 0.125) = 0.46875.
    # Score-function estimate from the k samples: (1/k) sum_i signal_i * (1[i = 0] - pi_0)
    #   own costs:        (1/4) * (2 * 0.75 - 0.25 * (-1.5)) = (1/4) * 1.875 = 0.46875 (exact)
    #   broadcast mean:   (1/4) * (0.125 * 0.75 - 0.25 * 0.375) = 0 (the unsafe arm is not told apart)
    costs = torch.tensor([2.0, -0.5, -0.5, -0.5])
    signal, unsafe = rectified_costs(costs, samples_per_prompt=4, rectify="prompt")
    assert unsafe.all()
    score = torch.tensor([0.75, -0.25, -0.25, -0.25])  # d log pi(arm i) / d theta_0
    estimate = (signal * score).mean()
    torch.testing.assert_close(estimate, torch.tensor(0.46875))
    broadcast = torch.full((4,), costs.mean().item())
    torch.testing.assert_close((broadcast * score).mean(), torch.tensor(0.0))


def test_rectified_costs_rejects_bad_grouping():
    with pytest.raises(ValueError, match="samples_per_prompt"):
        rectified_costs(torch.zeros(5), samples_per_prompt=2)
    with pytest.raises(ValueError, match="rectify"):
        rectified_costs(torch.zeros(4), samples_per_prompt=2, rectify="batch")  # type: ignore[arg-type]


# ---------------------------------------------------------------- combining

A_R = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
A_C = torch.tensor([[2.0, 0.0], [-1.0, 4.0]])


def test_combine_ppo_is_reward_advantage():
    assert torch.equal(combine_advantages(A_R, None, 5.0, None), A_R)


def test_combine_repo_all_safe_is_exactly_reward_advantage():
    out = combine_advantages(A_R, A_C, torch.tensor([3.7]), torch.tensor([False, False]))
    assert torch.equal(out, A_R)


def test_combine_repo_unsafe_row_is_mixed():
    # lam 1: (A_R - A_C) / 2 = [[-0.5, 1], [2, 0]]; only row 1 is unsafe
    out = combine_advantages(A_R, A_C, torch.tensor([1.0]), torch.tensor([False, True]))
    assert torch.equal(out[0], A_R[0])
    torch.testing.assert_close(out[1], torch.tensor([2.0, 0.0]))


def test_combine_ppo_lag_mixes_every_row():
    # lam 3: (A_R - 3 A_C) / 4 = [[-5/4, 2/4], [6/4, -8/4]]
    out = combine_advantages(A_R, A_C, 3.0, None)
    torch.testing.assert_close(out, torch.tensor([[-1.25, 0.5], [1.5, -2.0]]))


def test_combine_without_normalisation():
    # lam 0.5: A_R - 0.5 A_C = [[0, 2], [3.5, 2]]
    out = combine_advantages(A_R, A_C, 0.5, None, normalize=False)
    torch.testing.assert_close(out, torch.tensor([[0.0, 2.0], [3.5, 2.0]]))
    out = combine_advantages(A_R, A_C, 0.5, torch.tensor([True, False]), normalize=False)
    torch.testing.assert_close(out, torch.tensor([[0.0, 2.0], [3.0, 4.0]]))


def test_combine_rejects_several_multipliers():
    with pytest.raises(ValueError, match="lagrange_multiplier"):
        combine_advantages(A_R, A_C, torch.tensor([1.0, 2.0]), None)


# ---------------------------------------------------------------- group baselines (critic-free)


def test_group_advantages_rloo_and_grpo_by_hand():
    from repo_lightning.rl.advantages import broadcast_to_tokens, group_advantages

    scores = torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0, 5.0])  # k = 3: groups [1, 2, 6] and [5, 5, 5]
    # RLOO: s_i - mean of the other two: 1 - 4 = -3, 2 - 3.5 = -1.5, 6 - 1.5 = 4.5; equal group -> 0
    torch.testing.assert_close(group_advantages(scores, 3, "rloo"), torch.tensor([-3.0, -1.5, 4.5, 0.0, 0.0, 0.0]))
    # GRPO: mean 3, unbiased std sqrt(((-2)^2 + 1 + 9) / 2) = sqrt(7) -> [-2, -1, 3] / sqrt(7); equal group -> 0
    root7 = 7**0.5
    torch.testing.assert_close(
        group_advantages(scores, 3, "grpo", eps=0.0)[:3], torch.tensor([-2 / root7, -1 / root7, 3 / root7])
    )
    assert torch.equal(group_advantages(scores, 3, "grpo")[3:], torch.zeros(3))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(
        broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask), torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]])
    )
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        group_advantages(scores, 1, "rloo")
    with pytest.raises(ValueError, match="baseline"):
        group_advantages(scores, 3, "ppo")  # type: ignore[arg-type]


def test_reinforce_pp_by_hand():
    from repo_lightning.rl.advantages import reinforce_pp_advantages

    # row 0: 3 tokens, r = [-0.1, -0.2, 2.0]; row 1: 1 token, r = [1.0] (then padding)
    rewards = torch.tensor([[-0.1, -0.2, 2.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # gamma 1: returns-to-go [1.7, 1.8, 2.0] and [1.0]; batch mean over the 4 tokens = 6.5 / 4 = 1.625
    expected = torch.tensor([[1.7 - 1.625, 1.8 - 1.625, 2.0 - 1.625], [1.0 - 1.625, 0.0, 0.0]])
    torch.testing.assert_close(reinforce_pp_advantages(rewards, mask, 1.0), expected)
    # gamma 0.5: returns [-0.1 - 0.1 + 0.5, -0.2 + 1.0, 2.0] = [0.3, 0.8, 2.0] and [1.0]; mean 4.1 / 4 = 1.025
    expected = torch.tensor([[0.3 - 1.025, 0.8 - 1.025, 2.0 - 1.025], [1.0 - 1.025, 0.0, 0.0]])
    torch.testing.assert_close(reinforce_pp_advantages(rewards, mask, 0.5), expected)
    # no gradient flows into the rewards
    assert not reinforce_pp_advantages(rewards.requires_grad_(), mask).requires_grad
