"""compute_advantages / dual_statistic on hand-made rollouts (no models)."""

import pytest
import torch

from repo_lightning.modules.policy_steps import compute_advantages, cost_kl_coef, dual_statistic
from repo_lightning.modules.rollout import Rollout

HP = {
    "kl_coef": 0.0,
    "cost_kl_coef": None,
    "score_clip": None,
    "gamma": 1.0,
    "gae_lambda": 1.0,
    "algorithm": "repo",
    "samples_per_prompt": 2,
    "rectify": "sample",
    "normalize_advantage_mix": False,
    "whiten_advantages": False,
    "missing_eos_penalty": None,
    "threshold": 0.0,
    "tolerance": 0.0,
    "repo_constraint": "rectified_cost",
    "target_unsafe_rate": 0.02,
    "advantage_estimator": "gae",
    "kl_placement": "reward",
}


def _rollout(rewards, costs, finished, logprobs=None):
    n = len(rewards)
    zeros = torch.zeros(n, 2)
    return Rollout(
        sequences=torch.zeros(n, 3, dtype=torch.long),
        attention_mask=torch.ones(n, 3, dtype=torch.long),
        response_mask=torch.ones(n, 2),
        prompt_length=1,
        logprobs=zeros if logprobs is None else torch.tensor(logprobs),
        ref_logprobs=zeros,
        reward_values=zeros,
        cost_values=zeros,
        rewards=torch.tensor(rewards),
        costs=torch.tensor(costs),
        finished=torch.tensor(finished),
    )


def test_missing_eos_penalty_is_added_to_unfinished_responses_only():
    rollout = _rollout([1.0, 1.0], [-1.0, -1.0], [True, False])
    # Zero values, gamma = lambda = 1, no KL: every token's advantage is the (penalised) score.
    plain = compute_advantages(rollout, HP, torch.tensor([1.0])).advantages
    assert torch.equal(plain, torch.ones(2, 2))
    penalised = compute_advantages(rollout, {**HP, "missing_eos_penalty": -2.0}, torch.tensor([1.0])).advantages
    assert torch.equal(penalised, torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))


def test_repo_mixes_only_unsafe_samples_without_normalisation():
    rollout = _rollout([1.0, 1.0], [-0.5, 0.5], [True, True])
    adv = compute_advantages(rollout, HP, torch.tensor([2.0]))
    # safe sample: A_R = 1; unsafe: A_R - lam * A_C = 1 - 2 * relu(0.5) = 0.
    assert torch.equal(adv.advantages, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    assert adv.unsafe.tolist() == [False, True]


def test_dual_statistic():
    costs = torch.tensor([-1.0, 3.0, -1.0, -1.0])
    assert float(dual_statistic(costs, {**HP, "algorithm": "ppo_lag"})) == 0.0  # mean(C) - 0
    assert float(dual_statistic(costs, HP)) == 0.75  # mean(relu(C))
    # rectify: prompt averages the k=2 samples first: relu([1, -1]) mean = 0.5
    assert float(dual_statistic(costs, {**HP, "rectify": "prompt"})) == 0.5
    # unsafe_rate: 1 of 4 samples has C > 0: 0.25 - 0.05 = 0.2; per prompt (means [1, -1]): 0.5 - 0.05 = 0.45
    rate = {**HP, "repo_constraint": "unsafe_rate", "target_unsafe_rate": 0.05}
    assert abs(float(dual_statistic(costs, rate)) - 0.2) < 1e-7
    assert abs(float(dual_statistic(costs, {**rate, "rectify": "prompt"})) - 0.45) < 1e-7
    # all safe: the statistic is negative, so the multiplier can fall (unlike rectified_cost with tolerance 0)
    assert abs(float(dual_statistic(-costs.abs(), rate)) + 0.05) < 1e-7
    with pytest.raises(ValueError, match="no constraint statistic"):
        dual_statistic(costs, {**HP, "algorithm": "fixed_penalty"})


def test_cost_kl_default_gives_every_algorithm_the_same_kl_weight():
    assert cost_kl_coef({**HP, "kl_coef": 0.1}) == 0.0
    assert cost_kl_coef({**HP, "kl_coef": 0.1, "normalize_advantage_mix": True}) == 0.1
    assert cost_kl_coef({**HP, "kl_coef": 0.1, "cost_kl_coef": 0.3}) == 0.3
    # Zero scores and values, gamma = lambda = 1, per-token kl [0.5, 1.5] on every sample, beta = 0.1:
    # the KL part of the return from token t is -beta * sum_{s >= t} kl_s = [-0.2, -0.15] for every sample of
    # every algorithm, whatever lam and the normalisation (costs 0.5 > 0: every sample is mixed).
    rollout = _rollout([0.0, 0.0], [0.5, 0.5], [True, True], logprobs=[[0.5, 1.5], [0.5, 1.5]])
    rollout.costs = torch.zeros(2)  # scores 0 so only the KL remains; unsafe flags come from C > 0 -> none
    expected = torch.tensor([[-0.2, -0.15], [-0.2, -0.15]])
    for normalize in (False, True):
        for algorithm in ("ppo", "ppo_lag", "repo"):
            hp = {**HP, "kl_coef": 0.1, "algorithm": algorithm, "normalize_advantage_mix": normalize}
            adv = compute_advantages(rollout, hp, torch.tensor([3.0])).advantages
            torch.testing.assert_close(adv, expected, msg=f"{algorithm} normalize={normalize}")
    # RePO's mixed (unsafe) samples too: make both unsafe with a cost that a clip of 0 removes from the signal
    unsafe = _rollout([0.0, 0.0], [1.0, 1.0], [True, True], logprobs=[[0.5, 1.5], [0.5, 1.5]])
    for normalize in (False, True):
        hp = {**HP, "kl_coef": 0.1, "normalize_advantage_mix": normalize, "score_clip": 0.0}
        adv = compute_advantages(unsafe, hp, torch.tensor([3.0]))
        assert adv.unsafe.all()
        torch.testing.assert_close(adv.advantages, expected, msg=f"repo unsafe normalize={normalize}")


def test_group_estimators_need_no_values_and_use_the_other_samples_as_baseline():
    # Two prompts, k = 2: rewards [1, 3 | 0, 0]; RLOO: A_i = s_i - s_other -> [-2, 2 | 0, 0] on both tokens.
    rollout = _rollout([1.0, 3.0, 0.0, 0.0], [-1.0, -1.0, -1.0, 2.0], [True] * 4)
    rollout.reward_values = rollout.cost_values = None
    hp = {**HP, "advantage_estimator": "rloo"}
    adv = compute_advantages(rollout, {**hp, "algorithm": "ppo"}, torch.tensor([1.0]))
    torch.testing.assert_close(adv.advantages, torch.tensor([[-2.0, -2.0], [2.0, 2.0], [0.0, 0.0], [0.0, 0.0]]))
    assert adv.reward_returns is None and adv.cost_returns is None
    # RePO, lam = 2: cost signal relu(C) = [0, 0 | 0, 2] -> A_C = [0, 0 | -2, 2]; only sample 3 is unsafe:
    # A = A_R - lam A_C = 0 - 2 * 2 = -4 there, A_R elsewhere.
    adv = compute_advantages(rollout, hp, torch.tensor([2.0]))
    torch.testing.assert_close(adv.advantages[:, 0], torch.tensor([-2.0, 2.0, 0.0, -4.0]))
    # GRPO: (s - mean) / (std + eps); group [1, 3]: mean 2, unbiased std sqrt(2) -> -+0.7071
    adv = compute_advantages(rollout, {**hp, "algorithm": "ppo", "advantage_estimator": "grpo"}, torch.tensor([1.0]))
    torch.testing.assert_close(adv.advantages[:2, 0], torch.tensor([-(2**-0.5), 2**-0.5]), atol=1e-5, rtol=0)


def test_group_estimator_kl_in_reward_is_summed_over_the_response():
    # k = 2, zero scores, per-token kl [0.5, 1.5] for sample 0 and 0 for sample 1, beta = 0.1:
    # sequence scores [-0.2, 0]; RLOO: [-0.2, 0.2]. With the KL placed in the loss the advantages are 0.
    rollout = _rollout([0.0, 0.0], [-1.0, -1.0], [True, True], logprobs=[[0.5, 1.5], [0.0, 0.0]])
    hp = {**HP, "algorithm": "ppo", "advantage_estimator": "rloo", "kl_coef": 0.1}
    adv = compute_advantages(rollout, hp, torch.tensor([1.0])).advantages
    torch.testing.assert_close(adv, torch.tensor([[-0.2, -0.2], [0.2, 0.2]]))
    adv = compute_advantages(rollout, {**hp, "kl_placement": "loss"}, torch.tensor([1.0])).advantages
    assert torch.equal(adv, torch.zeros(2, 2))
