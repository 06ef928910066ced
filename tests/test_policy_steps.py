"""compute_advantages / dual_statistic on hand-made rollouts (no models)."""

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
}


def _rollout(rewards, costs, finished):
    n = len(rewards)
    zeros = torch.zeros(n, 2)
    return Rollout(
        sequences=torch.zeros(n, 3, dtype=torch.long),
        attention_mask=torch.ones(n, 3, dtype=torch.long),
        response_mask=torch.ones(n, 2),
        prompt_length=1,
        logprobs=zeros,
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


def test_dual_statistic_and_cost_kl_default():
    costs = torch.tensor([-1.0, 3.0, -1.0, -1.0])
    assert float(dual_statistic(costs, {**HP, "algorithm": "ppo_lag"})) == 0.0  # mean(C) - 0
    assert float(dual_statistic(costs, HP)) == 0.75  # mean(relu(C))
    # rectify: prompt averages the k=2 samples first: relu([1, -1]) mean = 0.5
    assert float(dual_statistic(costs, {**HP, "rectify": "prompt"})) == 0.5
    assert cost_kl_coef({**HP, "kl_coef": 0.1}) == 0.0
    assert cost_kl_coef({**HP, "kl_coef": 0.1, "algorithm": "ppo_lag"}) == 0.1
