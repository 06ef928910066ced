"""A cost-model ensemble: E heads on one backbone, each on its bootstrap resample; conservative aggregation."""

from __future__ import annotations

import math

import pytest
import torch
from test_stages import _config, _val_batch
from transformers import AutoModelForSequenceClassification

from repo_lightning.cli import main
from repo_lightning.models.backbone import load_score_model, sequence_scores
from repo_lightning.models.scorer import aggregate_heads
from repo_lightning.rl.losses import cost_model_loss
from repo_lightning.text.tokenizers import load_tokenizer


def test_weighted_cost_loss_by_hand():
    # Two pairs; the second has weight 0 -> the loss is the first pair's alone:
    # -log s(1 - 0) - log s(-1 * 0) - log s(1 * 1) = 2 * softplus(-1) + log 2 (safer labelled safe, unsafer unsafe).
    safer, unsafer = torch.tensor([0.0, 5.0]), torch.tensor([1.0, -5.0])
    safe, unsafe = torch.tensor([True, True]), torch.tensor([False, False])
    loss, _ = cost_model_loss(safer, unsafer, safe, unsafe, weights=torch.tensor([2.0, 0.0]))
    expected = 2 * math.log1p(math.exp(-1.0)) + math.log(2.0)
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_aggregate_heads_by_hand():
    scores = torch.tensor([[1.0, 3.0], [-2.0, -2.0]])  # std of [1, 3] (unbiased) = sqrt(2)
    torch.testing.assert_close(aggregate_heads(scores, "mean"), torch.tensor([2.0, -2.0]))
    torch.testing.assert_close(aggregate_heads(scores, "mean_plus_std", 0.5), torch.tensor([2.0 + 0.5 * 2**0.5, -2.0]))
    torch.testing.assert_close(aggregate_heads(scores, "max"), torch.tensor([3.0, -2.0]))
    assert torch.equal(aggregate_heads(torch.tensor([1.0, 2.0]), "max"), torch.tensor([1.0, 2.0]))


def test_cost_ensemble_trains_distinct_heads_exports_them_and_collapses_for_a_critic(tmp_path):
    sft_config = _config(
        tmp_path,
        "sft",
        {
            "model_config": {
                "model_type": "llama",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "max_position_embeddings": 128,
            }
        },
    )
    main(["fit", "--config", sft_config])
    cost_config = _config(
        tmp_path, "cost", {"model_name_or_path": str(tmp_path / "exports" / "sft"), "ensemble_size": 3}
    )
    cli = main(["fit", "--config", cost_config])
    export = tmp_path / "exports" / "cost"
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    assert model.config.num_labels == 3
    batch = _val_batch(cli)
    with torch.no_grad():
        heads = sequence_scores(model, batch.input_ids, batch.attention_mask)
    assert heads.shape == (batch.input_ids.shape[0], 3)
    assert heads.std(1).mean() > 1e-4  # the heads disagree: bootstrap resamples and separate initial heads
    # The stage's metrics use the heads' mean.
    assert float(cli.trainer.callback_metrics["val/cost_mean"]) == pytest.approx(heads.mean().item(), abs=1e-5)
    tok = load_tokenizer(str(export))
    critic = load_score_model(tok, str(export)).eval()  # one head: the mean of the three
    with torch.no_grad():
        single = sequence_scores(critic, batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(single, heads.mean(1), atol=1e-5, rtol=0)


def test_policy_stage_scores_with_the_conservative_ensemble_cost(tmp_path, tiny_exports, tiny_world_config):
    from test_policy import TINY_SCORE_CONFIG, _fit, _policy_config, _scalars

    from repo_lightning.data.collate import PromptExample, collate_prompts
    from repo_lightning.modules.rollout import collect_rollout
    from repo_lightning.safetyworld import World
    from repo_lightning.text.templates import SAFE_RLHF_TEMPLATE, encode_prompt

    tok = load_tokenizer(tiny_exports["tokenizer"])
    torch.manual_seed(5)
    ensemble = load_score_model(tok, model_config=TINY_SCORE_CONFIG, num_labels=3)
    ensemble.save_pretrained(tmp_path / "ensemble")
    tok.save_pretrained(tmp_path / "ensemble")
    model = {
        "cost_model_path": str(tmp_path / "ensemble"),
        "scoring": {"cost_aggregate": "mean_plus_std", "cost_kappa": 2.0},
    }
    cli = _fit(_policy_config(tmp_path, tiny_exports, tiny_world_config, model=model))
    module = cli.model
    assert module.cost_critic.config.num_labels == 1 and module.cost_model.config.num_labels == 3
    assert "train/cost_ensemble_std" in _scalars(cli.trainer.logger.log_dir)
    prompts = [row["prompt"] for row in World(tiny_world_config).rl_prompts()[:2]]
    examples = [PromptExample(encode_prompt(tok, p, SAFE_RLHF_TEMPLATE, 32)[0], p, i) for i, p in enumerate(prompts)]
    torch.manual_seed(0)
    rollout = collect_rollout(module.models, collate_prompts(examples, tok.pad_token_id), module.sampling, 2, 1.0)
    with torch.no_grad():
        heads = sequence_scores(module.cost_model, rollout.sequences, rollout.attention_mask)
    torch.testing.assert_close(rollout.costs, heads.mean(1) + 2.0 * heads.std(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(rollout.cost_spread, heads.std(1), atol=1e-5, rtol=0)
