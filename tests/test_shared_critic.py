"""The shared critic (``PolicyModule(critics="shared")``): one backbone, a reward and a cost value head.

What it must do: start the backbone and the cost head from the cost model and the reward head at zero (the cost
value is the one the multiplier scales, so it is the one that starts trained); give each stream's values
from one forward pass; train each head on its own stream's value loss only and the backbone on both; keep the
cost critic out of the module and its checkpoints; and change nothing for an objective without a cost.
"""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from repo_lightning.models.backbone import append_score_head, load_score_model, score_head, token_scores
from repo_lightning.modules.policy_config import PPOUpdate
from repo_lightning.modules.policy_steps import compute_advantages, ppo_update
from repo_lightning.modules.rollout import critic_values, response_values
from repo_lightning.rl.losses import clipped_value_loss
from tests.test_policy import _fit, _policy_config, _scalars, objective

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _shared_fit(tmp_path, exports, world, algorithm="repo", **model):
    config = _policy_config(
        tmp_path, exports, world, model={"critics": "shared", "objective": objective(algorithm), **model}
    )
    return _fit(config)


@pytest.mark.parametrize("keep_as", [0, 1])
def test_append_score_head_keeps_the_saved_output_and_starts_the_other_at_zero(tiny_exports, keep_as):
    tokenizer = AutoTokenizer.from_pretrained(tiny_exports["reward"])
    model = load_score_model(tokenizer, tiny_exports["reward"]).eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    mask = torch.ones_like(ids)
    before = token_scores(model, ids, mask)
    append_score_head(model, keep_as)
    after = token_scores(model, ids, mask)
    assert after.shape == (*before.shape, 2) and model.config.num_labels == 2
    torch.testing.assert_close(after[..., keep_as], before, rtol=0, atol=1e-6)
    assert torch.equal(after[..., 1 - keep_as], torch.zeros_like(before))
    with pytest.raises(ValueError, match="one-output score model, got 2"):
        append_score_head(model)


def test_shared_critic_trains_one_backbone_with_two_heads(tmp_path, tiny_exports, tiny_world_config):
    cli = _shared_fit(tmp_path, tiny_exports, tiny_world_config)
    module = cli.model
    cost = AutoModelForSequenceClassification.from_pretrained(tiny_exports["cost"])
    assert module.cost_critic is None and module.models.shared_critic
    head = score_head(module.reward_critic)
    assert head.out_features == 2
    # Both heads moved (the reward head from zero, the cost head from the cost model's), and so did the backbone.
    assert not torch.equal(head.weight[0], torch.zeros_like(head.weight[0]))
    assert not torch.equal(head.weight[1], score_head(cost).weight[0])
    trunk = {k: v for k, v in module.reward_critic.state_dict().items() if not k.startswith("score.")}
    saved = cost.state_dict()
    assert trunk.keys() <= saved.keys()
    assert any(not torch.equal(v, saved[k]) for k, v in trunk.items())
    # One trained critic: no cost critic in the module's state (so none in checkpoints), and one critic group.
    assert not any(k.startswith("cost_critic.") for k in module.state_dict())
    critic_params = {id(p) for p in module.reward_critic.parameters()}
    groups = module.optimizers().optimizer.param_groups
    assert len(groups) == 2 and {id(p) for p in groups[1]["params"]} == critic_params
    scalars = _scalars(str(tmp_path / "logs" / "policy" / "version_0"))
    assert "train/value_loss_reward" in scalars and "train/value_loss_cost" in scalars
    # The one iteration's rollout ran before the update: its reward values are the zero head's, its cost values the
    # cost model's own per-token scores.
    rollout = module.last_rollout
    assert torch.equal(rollout.reward_values, torch.zeros_like(rollout.reward_values))
    expected = response_values(module.cost_model, rollout.sequences, rollout.attention_mask, rollout.prompt_length)
    torch.testing.assert_close(rollout.cost_values, expected, rtol=1e-5, atol=1e-5)
    assert expected.abs().sum() > 0


def test_each_head_learns_from_its_own_stream_only(tmp_path, tiny_exports, tiny_world_config):
    """One update step's critic gradients, against each stream's value loss differentiated on its own."""
    cli = _shared_fit(tmp_path, tiny_exports, tiny_world_config)
    module = cli.model
    models, rollout = module.models, module.last_rollout
    k = module.sampling.samples_per_prompt
    targets = compute_advantages(rollout, module.objective, module.estimation, k, module.dual.value)
    update = PPOUpdate(ppo_epochs=1, minibatch_size=rollout.num_samples, value_loss_coef=0.7, value_clip=0.05)
    critic = models.reward_critic
    head = score_head(critic)
    trunk_param = next(p for n, p in critic.named_parameters() if not n.startswith("score."))

    def backward_only(loss):
        module.zero_grad(set_to_none=True)
        loss.backward()

    torch.manual_seed(0)  # the minibatch order; one minibatch of every sample
    ppo_update(models, rollout, targets, update, module.estimation, backward_only)
    got_head, got_trunk = head.weight.grad.clone(), trunk_param.grad.clone()

    p, mask = rollout.prompt_length, rollout.response_mask
    expected = []
    for stream in (0, 1):
        critic.zero_grad(set_to_none=True)
        values = critic_values(models, rollout.sequences, rollout.attention_mask, p)[stream]
        old = (rollout.reward_values, rollout.cost_values)[stream]
        returns = (targets.reward_returns, targets.cost_returns)[stream]
        loss, _ = clipped_value_loss(values, old, returns, mask, update.value_clip)
        (update.value_loss_coef * loss).backward()
        expected.append((head.weight.grad.clone(), trunk_param.grad.clone()))
    (head_r, trunk_r), (head_c, trunk_c) = expected
    assert torch.equal(head_r[1], torch.zeros_like(head_r[1])) and torch.equal(head_c[0], torch.zeros_like(head_c[0]))
    assert head_c[1].abs().sum() > 0 and head_r[0].abs().sum() > 0
    torch.testing.assert_close(got_head[0], head_r[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_head[1], head_c[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_trunk, trunk_r + trunk_c, rtol=1e-4, atol=1e-7)


def test_without_a_cost_shared_is_the_one_critic(tmp_path, tiny_exports, tiny_world_config):
    module = _shared_fit(tmp_path, tiny_exports, tiny_world_config, algorithm="ppo").model
    assert module.cost_critic is None and not module.models.shared_critic
    assert score_head(module.reward_critic).out_features == 1
    assert module.last_rollout.cost_values is None


def test_unknown_critics_value_is_refused(tmp_path, tiny_exports, tiny_world_config):
    config = _policy_config(tmp_path, tiny_exports, tiny_world_config, model={"critics": "pooled"})
    with pytest.raises(SystemExit):
        _fit(config)


def test_with_lora_the_two_output_head_and_the_adapters_train(tmp_path, tiny_exports, tiny_world_config):
    lora = {"rank": 2, "alpha": 4.0, "target_modules": ["q_proj", "v_proj"]}
    module = _shared_fit(tmp_path, tiny_exports, tiny_world_config, memory={"lora": lora}).model
    trainable = {n for n, p in module.reward_critic.named_parameters() if p.requires_grad}
    heads = [n for n in trainable if "score" in n and n.endswith("weight")]
    assert heads and all(dict(module.reward_critic.named_parameters())[n].shape[0] == 2 for n in heads), (
        "the widened head is the one trained"
    )
    assert any(".lora_" in n for n in trainable)
    head = dict(module.reward_critic.named_parameters())[heads[0]]
    assert not torch.equal(head[0], torch.zeros_like(head[0]))  # the reward head, from zero


def test_a_nonfinite_shared_critic_value_is_named_as_the_shared_critic(
    tmp_path, tiny_exports, tiny_world_config, monkeypatch, capsys
):
    import repo_lightning.modules.rollout as rollout_module

    real = rollout_module.critic_values

    def nan_reward_values(*args):
        reward_values, cost_values = real(*args)
        return torch.full_like(reward_values, float("nan")), cost_values

    monkeypatch.setattr(rollout_module, "critic_values", nan_reward_values)
    with pytest.raises(SystemExit):
        _shared_fit(tmp_path, tiny_exports, tiny_world_config)
    source = f"the shared critic (reward_critic, started from model.init_args.cost_model_path={tiny_exports['cost']!r})"
    err = capsys.readouterr().err
    assert re.search(r"error: non-finite reward_values \((\d+) of \1 values NaN\) from ", err), err
    assert f" from {source}; stopped before the optimizer step" in err
