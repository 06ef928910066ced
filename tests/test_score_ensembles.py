"""Ensembles of independently trained reward / cost models in the policy stage (``*_ensemble_paths``)."""

from __future__ import annotations

import pytest
import torch
from test_policy import TINY_SCORE_CONFIG, _fit, _policy_config, _scalars

from repo_lightning.data.collate import PromptExample, collate_prompts
from repo_lightning.models.backbone import load_score_model, sequence_scores
from repo_lightning.models.scorer import aggregate_heads, aggregate_rewards
from repo_lightning.modules.policy_config import Scoring
from repo_lightning.modules.rollout import collect_rollout
from repo_lightning.safetyworld import World
from repo_lightning.text.templates import SAFE_RLHF_TEMPLATE, encode_prompt
from repo_lightning.text.tokenizers import load_tokenizer


def test_aggregate_rewards_by_hand():
    # member 1 = (10, 30, 20): standardised (-1.22, 1.22, 0), mapped to member 0's mean 2 and std 0.816 -> (1, 3, 2)
    scores = torch.tensor([[1.0, 10.0], [2.0, 30.0], [3.0, 20.0]])
    rewards, spread = aggregate_rewards(scores, "mean")
    torch.testing.assert_close(rewards, torch.tensor([1.0, 2.5, 2.5]))
    torch.testing.assert_close(spread, torch.tensor([0.0, 0.5**0.5, 0.5**0.5]))  # std of two values |a - b| / sqrt 2
    torch.testing.assert_close(
        aggregate_rewards(scores, "mean_minus_std", 2.0)[0], torch.tensor([1.0, 2.5, 2.5]) - 2 * spread
    )
    torch.testing.assert_close(aggregate_rewards(scores, "min")[0], torch.tensor([1.0, 2.0, 2.0]))
    # a member that agrees up to an affine map changes nothing: the first model's scores come back exactly
    agree = torch.tensor([[1.0, 5.0], [2.0, 7.0], [3.0, 9.0]])
    rewards, spread = aggregate_rewards(agree, "mean_minus_std", 1.0)
    torch.testing.assert_close(rewards, agree[:, 0])
    torch.testing.assert_close(spread, torch.zeros(3))
    with pytest.raises(ValueError, match="mean, mean_minus_std or min"):
        aggregate_rewards(scores, "max")


def _member(tok, folder, seed: int, num_labels: int = 1) -> str:
    torch.manual_seed(seed)
    model = load_score_model(tok, model_config=TINY_SCORE_CONFIG, num_labels=num_labels)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_policy_stage_scores_with_every_member(tmp_path, tiny_exports, tiny_world_config):
    tok = load_tokenizer(tiny_exports["tokenizer"])
    rewards = [_member(tok, tmp_path / f"reward{i}", seed=i) for i in (1, 2)]
    costs = [_member(tok, tmp_path / "cost1", seed=3, num_labels=2)]
    model = {
        "reward_ensemble_paths": rewards,
        "cost_ensemble_paths": costs,
        "scoring": {"reward_aggregate": "mean_minus_std", "reward_kappa": 0.5, "cost_aggregate": "max"},
    }
    cli = _fit(_policy_config(tmp_path, tiny_exports, tiny_world_config, model=model))
    module = cli.model
    assert len(module.reward_members) == 2 and len(module.cost_members) == 1
    frozen = [*module.reward_members.parameters(), *module.cost_members.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert not module.reward_members[0].training
    assert not [k for k in module.state_dict() if "members" in k]  # reloaded from their paths, never checkpointed
    scalars = _scalars(cli.trainer.logger.log_dir)
    assert "train/reward_ensemble_std" in scalars and "train/cost_ensemble_std" in scalars

    prompts = [row["prompt"] for row in World(tiny_world_config).rl_prompts()[:2]]
    examples = [PromptExample(encode_prompt(tok, p, SAFE_RLHF_TEMPLATE, 32)[0], p, i) for i, p in enumerate(prompts)]
    torch.manual_seed(0)
    batch = collate_prompts(examples, tok.pad_token_id)
    rollout = collect_rollout(module.models, batch, module.sampling, 2, 1.0, scoring=module.scoring)
    seq, mask = rollout.sequences, rollout.attention_mask
    with torch.no_grad():
        each = [sequence_scores(m, seq, mask) for m in (module.reward_model, *module.reward_members)]
        expected, spread = aggregate_rewards(torch.stack(each, 1), "mean_minus_std", 0.5)
        heads = torch.cat(
            [
                sequence_scores(module.cost_model, seq, mask)[:, None],
                sequence_scores(module.cost_members[0], seq, mask),
            ],
            1,
        )
    torch.testing.assert_close(rollout.rewards, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(rollout.reward_spread, spread, atol=1e-5, rtol=0)
    assert heads.shape[1] == 3  # one head of the first cost model, two of the member
    torch.testing.assert_close(rollout.costs, aggregate_heads(heads, "max"), atol=1e-5, rtol=0)

    # without members the first models are used as they are
    torch.manual_seed(0)
    module.models.reward_members, module.models.cost_members = [], []
    rollout = collect_rollout(module.models, batch, module.sampling, 2, 1.0, scoring=Scoring())
    torch.testing.assert_close(rollout.rewards, each[0], atol=1e-5, rtol=0)
    assert rollout.reward_spread is None
