"""Ground-truth scores in the policy stage (``scoring.reward_source`` / ``cost_source: oracle``): the ceiling check."""

from __future__ import annotations

import pytest
import torch
from test_policy import _fit, _policy_config, _scalars

from repo_lightning.data.collate import PromptExample, collate_prompts
from repo_lightning.errors import ConfigError
from repo_lightning.models.backbone import sequence_scores
from repo_lightning.modules.policy_config import Scoring
from repo_lightning.modules.rollout import collect_rollout
from repo_lightning.safetyworld import World
from repo_lightning.text.templates import SAFE_RLHF_TEMPLATE, encode_prompt
from repo_lightning.text.tokenizers import load_tokenizer


def _batch(tok, world: World, n: int = 3):
    prompts = [row["prompt"] for row in world.rl_prompts()[:n]]
    examples = [PromptExample(encode_prompt(tok, p, SAFE_RLHF_TEMPLATE, 32)[0], p, i) for i, p in enumerate(prompts)]
    return collate_prompts(examples, tok.pad_token_id)


def test_oracle_sources_train_and_score_with_the_ground_truth(tmp_path, tiny_exports, tiny_world_config):
    model = {"scoring": {"reward_source": "oracle", "cost_source": "oracle"}}
    cli = _fit(_policy_config(tmp_path, tiny_exports, tiny_world_config, model=model))
    module = cli.model
    assert module.scoring.reward_source == "oracle" and cli.model.hparams.scoring["cost_source"] == "oracle"
    # the rollout the policy trained on was scored by the oracle: its learned-judgement figures are the truth's
    scalars = _scalars(cli.trainer.logger.log_dir)
    assert scalars["train/reward_mean"] == pytest.approx(scalars["train/true_reward_mean"], abs=1e-5)
    assert scalars["train/unsafe_response_rate"] == pytest.approx(scalars["train/true_unsafe_response_rate"])

    world = World(tiny_world_config)
    tok = load_tokenizer(tiny_exports["tokenizer"])
    batch = _batch(tok, world)
    torch.manual_seed(0)
    rollout = collect_rollout(module.models, batch, module.sampling, 2, 1.0, scoring=module.scoring, oracle=world)
    pairs = list(zip(rollout.prompts, rollout.responses, strict=True))
    assert rollout.rewards.tolist() == pytest.approx([world.helpfulness(p, r) for p, r in pairs])
    assert rollout.costs.tolist() == pytest.approx([world.harm(p, r) for p, r in pairs])
    assert rollout.cost_spread is None

    # one source each: the other comes from its model, read at the response's eos as always
    torch.manual_seed(0)
    mixed = Scoring(reward_source="model", cost_source="oracle")
    rollout = collect_rollout(module.models, batch, module.sampling, 2, 1.0, scoring=mixed, oracle=world)
    with torch.no_grad():
        learned = sequence_scores(module.reward_model, rollout.sequences, rollout.attention_mask)
    torch.testing.assert_close(rollout.rewards, learned, atol=1e-5, rtol=0)
    assert rollout.costs.tolist() == pytest.approx([world.harm(p, r) for p, r in pairs])


def test_scoring_source_is_checked():
    with pytest.raises(ConfigError, match="scoring.cost_source must be model or oracle, got 'truth'"):
        Scoring(cost_source="truth")
