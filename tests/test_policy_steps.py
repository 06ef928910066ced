"""compute_advantages / dual_statistic on hand-made rollouts (no models)."""

import pytest
import torch

from repo_lightning.errors import ConfigError
from repo_lightning.modules.policy_config import Estimation
from repo_lightning.modules.policy_steps import compute_advantages
from repo_lightning.modules.rollout import Rollout
from repo_lightning.objectives import PPO, Objective, PPOLagrangian, RePO

#: Zero KL, no clip, gamma = lambda = 1: every token's advantage is score - value-to-go, by hand.
EST = Estimation(kl_coef=0.0, score_clip=None, gamma=1.0, gae_lambda=1.0)
REPO = RePO(normalize_advantage_mix=False, constraint="rectified_cost")


def _objective(name: str, **args) -> Objective:
    return {"ppo": PPO, "ppo_lag": PPOLagrangian, "repo": RePO}[name](**args)


def _advantages(rollout, objective=REPO, k=2, lam=1.0, **estimation):
    est = Estimation(**{**EST.__dict__, **estimation})
    return compute_advantages(rollout, objective, est, k, torch.tensor([lam]))


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
    assert torch.equal(_advantages(rollout).advantages, torch.ones(2, 2))
    penalised = _advantages(rollout, missing_eos_penalty=-2.0).advantages
    assert torch.equal(penalised, torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))


def test_repo_mixes_only_unsafe_samples_without_normalisation():
    rollout = _rollout([1.0, 1.0], [-0.5, 0.5], [True, True])
    adv = _advantages(rollout, lam=2.0)
    # safe sample: A_R = 1; unsafe: A_R - lam * A_C = 1 - 2 * relu(0.5) = 0.
    assert torch.equal(adv.advantages, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    assert adv.unsafe.tolist() == [False, True]


def test_constraint_statistics():
    costs = torch.tensor([-1.0, 3.0, -1.0, -1.0])
    assert float(PPOLagrangian().statistic(costs, 2)) == 0.0  # mean(C) - 0
    assert float(REPO.statistic(costs, 2)) == 0.75  # mean(relu(C))
    # rectify: prompt averages the k=2 samples first: relu([1, -1]) mean = 0.5
    assert float(RePO(rectify="prompt", constraint="rectified_cost").statistic(costs, 2)) == 0.5
    # unsafe_rate: 1 of 4 samples has C > 0: 0.25 - 0.05 = 0.2; per prompt (means [1, -1]): 0.5 - 0.05 = 0.45
    assert abs(float(RePO(target_unsafe_rate=0.05).statistic(costs, 2)) - 0.2) < 1e-7
    assert abs(float(RePO(rectify="prompt", target_unsafe_rate=0.05).statistic(costs, 2)) - 0.45) < 1e-7
    # all safe: the statistic is negative, so the multiplier can fall (unlike rectified_cost with tolerance 0)
    assert abs(float(RePO(target_unsafe_rate=0.05).statistic(-costs.abs(), 2)) + 0.05) < 1e-7
    with pytest.raises(TypeError, match="no constraint statistic"):
        PPO().statistic(costs, 2)


def test_unsafe_prompt_rate_counts_prompts_with_any_unsafe_sample():
    # k = 2: prompts (-1, 3) and (-1, -1): one of two prompts has an unsafe sample -> 0.5 - 0.05, whatever rectify
    costs = torch.tensor([-1.0, 3.0, -1.0, -1.0])
    for rectify in ("sample", "prompt"):
        goal = RePO(constraint="unsafe_prompt_rate", target_unsafe_rate=0.05, rectify=rectify)
        assert abs(float(goal.statistic(costs, 2)) - 0.45) < 1e-7
    # k = 4 per prompt, one unsafe sample each in 1 of 2 prompts: per-sample 1/8, per-prompt 1/2
    costs = torch.tensor([-1.0, -1.0, 0.5, -1.0, -1.0, -1.0, -1.0, -1.0])
    assert abs(float(RePO(target_unsafe_rate=0.0).statistic(costs, 4)) - 0.125) < 1e-7
    assert abs(float(RePO(constraint="unsafe_prompt_rate", target_unsafe_rate=0.0).statistic(costs, 4)) - 0.5) < 1e-7
    # with the margin: C + 1 > 0 on every sample of the first prompt only
    costs = torch.tensor([-0.5, -0.9, -1.5, -2.0])
    goal = RePO(constraint="unsafe_prompt_rate", target_unsafe_rate=0.0, safety_margin=1.0)
    assert abs(float(goal.statistic(costs, 2)) - 0.5) < 1e-7
    assert goal.constraint_level() == {"target_unsafe_rate": 0.0}
    with pytest.raises(ConfigError, match="unsafe_prompt_rate"):
        RePO(constraint="unsafe_share")


def test_safety_margin_counts_answers_near_the_boundary_as_unsafe():
    costs = torch.tensor([-0.5, 0.3, -1.5, 0.0])
    goal = RePO(safety_margin=1.0, target_unsafe_rate=0.25)
    signal, unsafe = goal.cost_signal(costs, 2)
    assert torch.allclose(signal, torch.tensor([0.5, 1.3, 0.0, 1.0]))  # relu(C + 1)
    assert unsafe.tolist() == [True, True, False, True]
    assert abs(float(goal.statistic(costs, 2)) - 0.5) < 1e-7  # 3 of 4 unsafe - 0.25
    # rectified_cost: mean(relu(C + 1)) - tolerance = 2.8 / 4 - 0.2
    assert (
        abs(float(RePO(safety_margin=1.0, constraint="rectified_cost", tolerance=0.2).statistic(costs, 2)) - 0.5) < 1e-6
    )
    # per prompt: means [-0.1, -0.75] + 1 -> both unsafe, each sample keeps its own shifted cost
    signal, unsafe = RePO(safety_margin=1.0, rectify="prompt").cost_signal(costs, 2)
    assert torch.allclose(signal, torch.tensor([0.5, 1.3, -0.5, 1.0])) and unsafe.all()
    # margin 0 is the paper's test
    assert RePO().cost_signal(costs, 2)[1].tolist() == [False, True, False, False]
    with pytest.raises(ConfigError, match="safety_margin must be >= 0"):
        RePO(safety_margin=-0.1)


def test_penalty_shapes_what_an_unsafe_sample_pays():
    costs = torch.tensor([0.1, 2.0, -0.5, 0.0])
    # the paper: {C}^+, so the barely unsafe 0.1 pays a twentieth of the 2.0
    signal, unsafe = RePO().cost_signal(costs, 2)
    assert torch.allclose(signal, torch.tensor([0.1, 2.0, 0.0, 0.0])) and unsafe.tolist() == [True, True, False, False]
    # indicator: every violation pays 1, safe samples (C <= 0) nothing
    signal, unsafe = RePO(penalty="indicator").cost_signal(costs, 2)
    assert torch.equal(signal, torch.tensor([1.0, 1.0, 0.0, 0.0])) and unsafe.tolist() == [True, True, False, False]
    # rectified_step: {C}^+ + 1[C > 0]
    assert torch.allclose(RePO(penalty="rectified_step").cost_signal(costs, 2)[0], torch.tensor([1.1, 3.0, 0.0, 0.0]))
    # with the margin m = 1 the step moves to C > -1: [1, 1, 1, 1] and 1 + {C + 1}^+ = [2.1, 4.0, 1.5, 2.0]
    assert torch.equal(RePO(penalty="indicator", safety_margin=1.0).cost_signal(costs, 2)[0], torch.ones(4))
    signal = RePO(penalty="rectified_step", safety_margin=1.0).cost_signal(costs, 2)[0]
    assert torch.allclose(signal, torch.tensor([2.1, 4.0, 1.5, 2.0]))
    # per prompt: means [1.05, -0.25]: only the first prompt is gated, each of its samples pays its own step
    costs = torch.tensor([-0.1, 2.2, 0.3, -0.8])
    signal, unsafe = RePO(penalty="indicator", rectify="prompt").cost_signal(costs, 2)
    assert torch.equal(signal, torch.tensor([0.0, 1.0, 0.0, 0.0])) and unsafe.tolist() == [True, True, False, False]
    # the dual statistic does not depend on the penalty
    for penalty in ("rectified", "indicator", "rectified_step"):
        assert abs(float(RePO(penalty=penalty, target_unsafe_rate=0.25).statistic(costs, 2)) - 0.25) < 1e-7
    with pytest.raises(ConfigError, match="penalty must be 'rectified', 'indicator' or 'rectified_step'"):
        RePO(penalty="hinge")


def test_cost_kl_default_gives_every_algorithm_the_same_kl_weight():
    assert RePO(normalize_advantage_mix=False).cost_stream_kl_coef(0.1) == 0.0
    assert PPOLagrangian(normalize_advantage_mix=True).cost_stream_kl_coef(0.1) == 0.1
    assert RePO(cost_kl_coef=0.3).cost_stream_kl_coef(0.1) == 0.3
    # Zero values, gamma = lambda = 1, per-token kl [0.5, 1.5] on every sample, beta = 0.1: the KL part of the
    # advantage (with KL minus without) is -beta * sum_{s >= t} kl_s = [-0.2, -0.15] for every sample of every
    # algorithm, whatever lam and the normalisation. Costs 1 > 0: every sample is mixed, RePO's included.
    rollout = _rollout([0.5, 2.0], [1.0, 1.0], [True, True], logprobs=[[0.5, 1.5], [0.5, 1.5]])
    expected = torch.tensor([[-0.2, -0.15], [-0.2, -0.15]])
    for normalize in (False, True):
        for name in ("ppo", "ppo_lag", "repo"):
            goal = _objective(name) if name == "ppo" else _objective(name, normalize_advantage_mix=normalize)
            with_kl = _advantages(rollout, goal, lam=3.0, kl_coef=0.1)
            without = _advantages(rollout, goal, lam=3.0, kl_coef=0.0)
            assert name != "repo" or with_kl.unsafe.all()
            torch.testing.assert_close(with_kl.advantages - without.advantages, expected, msg=f"{name} {normalize}")


def test_group_estimators_need_no_values_and_use_the_other_samples_as_baseline():
    # Two prompts, k = 2: rewards [1, 3 | 0, 0]; RLOO: A_i = s_i - s_other -> [-2, 2 | 0, 0] on both tokens.
    rollout = _rollout([1.0, 3.0, 0.0, 0.0], [-1.0, -1.0, -1.0, 2.0], [True] * 4)
    rollout.reward_values = rollout.cost_values = None
    adv = _advantages(rollout, PPO(), estimator="rloo")
    torch.testing.assert_close(adv.advantages, torch.tensor([[-2.0, -2.0], [2.0, 2.0], [0.0, 0.0], [0.0, 0.0]]))
    assert adv.reward_returns is None and adv.cost_returns is None
    # RePO, lam = 2: cost signal relu(C) = [0, 0 | 0, 2] -> A_C = [0, 0 | -2, 2]; only sample 3 is unsafe:
    # A = A_R - lam A_C = 0 - 2 * 2 = -4 there, A_R elsewhere.
    adv = _advantages(rollout, lam=2.0, estimator="rloo")
    torch.testing.assert_close(adv.advantages[:, 0], torch.tensor([-2.0, 2.0, 0.0, -4.0]))
    # GRPO: (s - mean) / (std + eps); group [1, 3]: mean 2, unbiased std sqrt(2) -> -+0.7071
    adv = _advantages(rollout, PPO(), estimator="grpo")
    torch.testing.assert_close(adv.advantages[:2, 0], torch.tensor([-(2**-0.5), 2**-0.5]), atol=1e-5, rtol=0)


def test_group_estimator_kl_in_reward_is_summed_over_the_response():
    # k = 2, zero scores, per-token kl [0.5, 1.5] for sample 0 and 0 for sample 1, beta = 0.1:
    # sequence scores [-0.2, 0]; RLOO: [-0.2, 0.2]. With the KL placed in the loss the advantages are 0.
    rollout = _rollout([0.0, 0.0], [-1.0, -1.0], [True, True], logprobs=[[0.5, 1.5], [0.0, 0.0]])
    adv = _advantages(rollout, PPO(), estimator="rloo", kl_coef=0.1).advantages
    torch.testing.assert_close(adv, torch.tensor([[-0.2, -0.2], [0.2, 0.2]]))
    adv = _advantages(rollout, PPO(), estimator="rloo", kl_coef=0.1, kl_placement="loss").advantages
    assert torch.equal(adv, torch.zeros(2, 2))


def test_reinforce_pp_token_returns_minus_batch_mean_on_both_streams():
    # 2 samples x 2 tokens, no KL: reward returns-to-go [[1, 1], [3, 3]] (score on the last token, gamma 1);
    # batch mean over the 4 tokens 2 -> A_R = [[-1, -1], [1, 1]]. No critic values are read.
    rollout = _rollout([1.0, 3.0], [-1.0, 2.0], [True, True])
    rollout.reward_values = rollout.cost_values = None
    adv = _advantages(rollout, PPO(), estimator="reinforce_pp")
    torch.testing.assert_close(adv.advantages, torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
    assert adv.reward_returns is None and adv.cost_returns is None
    # RePO, mix all, lam 2, no normalisation: cost signal {C}^+ = [0, 2] -> returns [[0, 0], [2, 2]], mean 1 ->
    # A_C = [[-1, -1], [1, 1]]; A = A_R - 2 A_C = [[1, 1], [-1, -1]]: the safe, less rewarded answer wins.
    goal = RePO(normalize_advantage_mix=False, mix="all")
    adv = _advantages(rollout, goal, lam=2.0, estimator="reinforce_pp")
    torch.testing.assert_close(adv.advantages, torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))
    # KL in the reward, per token: kl [[0.5, 1.5], [0, 0]], beta 0.1 -> sample 0's rewards [-0.05, 1 - 0.15],
    # returns [0.8, 0.85]; sample 1 [3, 3]; mean 7.65 / 4 = 1.9125
    rollout = _rollout([1.0, 3.0], [-1.0, 2.0], [True, True], logprobs=[[0.5, 1.5], [0.0, 0.0]])
    adv = _advantages(rollout, PPO(), estimator="reinforce_pp", kl_coef=0.1).advantages
    expected = torch.tensor([[0.8, 0.85], [3.0, 3.0]]) - 1.9125
    torch.testing.assert_close(adv, expected)


def test_settings_groups_name_the_key_of_a_bad_value():
    from repo_lightning.modules.policy_config import PPOUpdate, Sampling, as_group

    with pytest.raises(ValueError, match=r"model\.init_args\.update\.actor_lr must be > 0, got -1"):
        PPOUpdate(actor_lr=-1)
    with pytest.raises(ValueError, match=r"model\.init_args\.sampling\.top_p"):
        Sampling(top_p=1.5)
    with pytest.raises(ValueError, match=r"model\.init_args\.estimation\.estimator"):
        Estimation(estimator="vtrace")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown key"):
        as_group(Sampling, {"samples": 2})
    assert as_group(Sampling, {"samples_per_prompt": 3}) == Sampling(samples_per_prompt=3)


def test_repo_mix_all_gives_safe_samples_the_baseline_only_cost_advantage():
    # k = 2, one prompt: sample 0 safe (C = -1), sample 1 unsafe (C = 2); rewards [1, 3]; RLOO; lam = 2.
    # A_R = [1 - 3, 3 - 1] = [-2, 2]; cost signal {C}^+ = [0, 2] -> A_C = [0 - 2, 2 - 0] = [-2, 2].
    # mix: unsafe -> [A_R, A_R - lam A_C] = [-2, 2 - 4] = [-2, -2]: the safe answer is pushed down as hard as the
    #   unsafe one (its reward baseline holds the unsafe sibling's reward but not its penalty).
    # mix: all    -> A_R - lam A_C = [-2 + 4, 2 - 4] = [2, -2]: the safe answer wins, as under R - lam {C}^+.
    rollout = _rollout([1.0, 3.0], [-1.0, 2.0], [True, True])
    gated = _advantages(rollout, RePO(normalize_advantage_mix=False), lam=2.0, estimator="rloo").advantages
    torch.testing.assert_close(gated[:, 0], torch.tensor([-2.0, -2.0]))
    full = _advantages(rollout, RePO(normalize_advantage_mix=False, mix="all"), lam=2.0, estimator="rloo").advantages
    torch.testing.assert_close(full[:, 0], torch.tensor([2.0, -2.0]))
    with pytest.raises(ValueError, match="mix"):
        RePO(mix="some")  # type: ignore[arg-type]


def _ppo_update(rollout, advantages, update, step):
    """``ppo_update`` on a rollout with no critics (the actor's logits are monkeypatched by the caller)."""
    from types import SimpleNamespace

    from repo_lightning.modules.policy_steps import Advantages, ppo_update

    models = SimpleNamespace(actor=None, reward_critic=None, cost_critic=None)
    return ppo_update(models, rollout, Advantages(advantages, None, None, None), update, Estimation(), step)


def test_ppo_update_averages_statistics_as_python_floats_did(monkeypatch):
    # Four minibatches whose policy losses sum exactly in float64 (0.5 mean) but not in float32 (1e8 + 1 == 1e8
    # there: 0.25): the statistics are accumulated as float64 tensors and read once, giving the old Python-float
    # numbers bit for bit.
    from repo_lightning.modules import policy_steps
    from repo_lightning.modules.policy_config import PPOUpdate

    losses = iter([1e8, 1.0, -1e8, 1.0])
    zero = torch.tensor(0.0)

    def fake_policy_loss(logprobs, old, advantages, mask, clip, clip_high):
        assert (clip, clip_high) == (0.2, None)
        return torch.tensor(next(losses)) + 0.0 * logprobs.sum(), {"clipfrac": zero, "approx_kl": zero}

    monkeypatch.setattr(policy_steps, "ppo_policy_loss", fake_policy_loss)
    monkeypatch.setattr(
        policy_steps, "response_logits", lambda actor, seq, attn, p: torch.zeros(len(seq), 2, 5, requires_grad=True)
    )
    rollout = _rollout([0.0, 0.0], [0.0, 0.0], [True, True])
    steps = []
    stats = _ppo_update(rollout, torch.zeros(2, 2), PPOUpdate(ppo_epochs=2, minibatch_size=1), steps.append)
    assert len(steps) == 4
    assert set(stats) == {"policy_loss", "clipfrac", "approx_kl", "entropy"}
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" and v.dim() == 0 for v in stats.values())
    assert stats["policy_loss"].item() == 0.5
    assert torch.equal(stats["entropy"], torch.tensor(sum(float(torch.tensor(5.0).log()) for _ in range(4)) / 4))


@pytest.mark.parametrize("coef", [0.0, 0.5])
def test_entropy_bonus_moves_a_policy_whose_samples_are_all_the_same(monkeypatch, coef):
    # Two identical samples of one prompt: zero advantage, so the clipped policy loss has no gradient. Only the
    # entropy bonus -coef * H moves the (peaked) policy, and it moves it towards a flatter distribution.

    from repo_lightning.modules import policy_steps
    from repo_lightning.modules.policy_config import PPOUpdate
    from repo_lightning.rl.losses import entropy_from_logits

    theta = torch.tensor([4.0, 0.0, 0.0, 0.0, 0.0], requires_grad=True)
    monkeypatch.setattr(policy_steps, "response_logits", lambda actor, seq, attn, p: theta.expand(len(seq), 2, 5))
    rollout = _rollout([1.0, 1.0], [0.0, 0.0], [True, True])  # response tokens are id 0, the likely one
    losses = []

    def sgd_step(loss):
        losses.append(loss.detach())
        theta.grad = None
        loss.backward()
        with torch.no_grad():
            theta.sub_(1.0 * theta.grad)

    mask = torch.ones(1, 2)
    before = entropy_from_logits(theta.detach().expand(1, 2, 5), mask).item()
    p = torch.softmax(theta.detach(), 0)
    stats = _ppo_update(rollout, torch.zeros(2, 2), PPOUpdate(minibatch_size=2, entropy_coef=coef), sgd_step)
    after = entropy_from_logits(theta.detach().expand(1, 2, 5), mask).item()
    assert before == pytest.approx(-(p * p.log()).sum().item())
    assert losses[0].item() == pytest.approx(-coef * before, abs=1e-6)  # the policy loss itself is 0
    assert stats["entropy"].item() == pytest.approx(before)
    if coef == 0.0:
        assert after == before  # no gradient: the trap the bonus is for
    else:
        assert after > before + 0.03  # 0.344 -> 0.386 nats after one step of size 1


def test_clip_ratio_high_reaches_the_policy_loss_and_is_checked(monkeypatch):
    # update.clip_ratio_high widens only the upper clip of the ratio: a sample whose ratio is already above 1 + eps
    # keeps its gradient up to 1 + eps_high.

    from repo_lightning.modules import policy_steps
    from repo_lightning.modules.policy_config import PPOUpdate

    theta = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0], requires_grad=True)
    monkeypatch.setattr(policy_steps, "response_logits", lambda actor, seq, attn, p: theta.expand(len(seq), 2, 5))
    old = float(torch.tensor(0.2).log()) - 0.3  # the policy is uniform over 5 now: rho = exp(0.3) = 1.35
    rollout = _rollout([1.0, 1.0], [0.0, 0.0], [True, True], logprobs=[[old, old], [old, old]])  # tokens: id 0
    grads = {}
    for high in (None, 0.5):

        def step(loss, high=high):
            theta.grad = None
            loss.backward()
            grads[high] = theta.grad.clone()

        _ppo_update(rollout, torch.ones(2, 2), PPOUpdate(minibatch_size=2, clip_ratio_high=high), step)
    assert torch.count_nonzero(grads[None]) == 0  # 1.35 > 1.2: clipped, no gradient
    # 1.35 < 1.5: d(-rho A)/dtheta_0 = -rho (1 - p0) = -1.35 * 0.8 on each token, mean over 4 tokens
    assert grads[0.5][0].item() == pytest.approx(-float(torch.tensor(0.3).exp()) * 0.8, rel=1e-5)
    with pytest.raises(ConfigError, match="update.clip_ratio_high must be >= 0.2"):
        PPOUpdate(clip_ratio_high=0.1)


def test_entropy_coef_must_not_be_negative():
    from repo_lightning.modules.policy_config import PPOUpdate

    with pytest.raises(ConfigError, match="update.entropy_coef must be >= 0"):
        PPOUpdate(entropy_coef=-0.1)


def test_identical_group_rate_counts_prompts_whose_samples_are_one_answer():
    from repo_lightning.modules.policy_steps import rollout_metrics

    rollout = _rollout([0.0] * 6, [0.0] * 6, [True] * 6)
    # k = 2: prompt 0's two answers are the same text, prompt 1's differ, prompt 2's are the same -> 2/3
    rollout.responses = ["sorry i cannot", "sorry i cannot", "wear gloves", "wear goggles", "a", "a"]
    assert rollout_metrics(rollout, 2)["identical_group_rate"].item() == pytest.approx(2 / 3)
    # k = 3: [sorry, sorry, gloves], [goggles, a, a] -> 0; k = 1 (validation) has no such statistic
    assert rollout_metrics(rollout, 3)["identical_group_rate"].item() == 0.0
    assert "identical_group_rate" not in rollout_metrics(rollout, 1)
