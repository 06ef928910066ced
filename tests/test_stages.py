"""Stages 0-2 end to end through the command line, ``main([...])``, on a tiny SafetyWorld and a tiny Llama.

One module-scoped pipeline runs SFT, then the reward and the cost model from the SFT export (two epochs of two
steps each, one validation batch per epoch); the tests check what each stage left behind.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_MODEL, TINY_WORLD
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from repo_lightning.cli import main
from repo_lightning.models.backbone import load_causal_lm

STAGES = {
    "sft": ("repo_lightning.modules.SFTModule", "sft"),
    "reward": ("repo_lightning.modules.RewardModule", "preference"),
    "cost": ("repo_lightning.modules.CostModule", "preference"),
}


def _config(root: Path, stage: str, start: dict) -> str:
    """Write a tiny stage config under ``root`` and return its path."""
    class_path, mode = STAGES[stage]
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 2,
            "limit_train_batches": 2,
            "limit_val_batches": 1,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": False,
            "default_root_dir": str(root),
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(root / "logs"), "name": stage},
            },
        },
        "model": {
            "class_path": class_path,
            "init_args": {
                **start,
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01, "weight_decay": 0.0}},
                "export_dir": str(root / "exports" / stage),
            },
        },
        "data": {
            "mode": mode,
            "world": dict(TINY_WORLD),
            "batch_size": 8,
            "eval_batch_size": 32,
            "max_prompt_length": 32,
            "max_length": 64,
            "cache_dir": str(root / "cache"),
        },
    }
    path = root / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run SFT, reward and cost ``fit`` once; returns ``{stage: cli, "<stage>_config": path, "root": root}``."""
    root = tmp_path_factory.mktemp("pipeline")
    out: dict = {"root": root}
    out["sft_config"] = _config(root, "sft", {"model_config": dict(TINY_MODEL)})
    out["sft"] = main(["fit", "--config", out["sft_config"]])
    for stage in ("reward", "cost"):
        out[f"{stage}_config"] = _config(root, stage, {"model_name_or_path": str(root / "exports" / "sft")})
        out[stage] = main(["fit", "--config", out[f"{stage}_config"]])
    return out


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _val_batch(cli):
    batches = list(cli.datamodule.val_dataloader())
    assert len(batches) == 1  # round(64 * 0.1) = 6 pairs, one batch: what limit_val_batches=1 validated on
    return batches[0]


def _pair_scores(model, batch) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return logits[:, 0].view(2, batch.num_pairs).T


# --- stage 0 ------------------------------------------------------------------------------------------------


def test_sft_fit_trains_every_weight_and_exports_a_causal_lm(pipeline):
    cli = pipeline["sft"]
    assert cli.trainer.global_step == 4
    assert {"train/loss", "val/loss", "val/perplexity"} <= set(cli.trainer.callback_metrics)
    # The model the CLI starts from is a same-seed fresh build (checked without running) ...
    unrun = main(["--config", pipeline["sft_config"]], run=False)
    unrun.model.configure_model()
    torch.manual_seed(0)
    fresh = _state(load_causal_lm(unrun.model.tokenizer, model_config=dict(TINY_MODEL)))
    initial = _state(unrun.model.model)
    assert all(torch.equal(fresh[k], initial[k]) for k in fresh)
    # ... and training moved every tensor away from it.
    export = pipeline["root"] / "exports" / "sft"
    loaded = AutoModelForCausalLM.from_pretrained(export).eval()
    trained = _state(loaded)
    assert trained.keys() == fresh.keys()
    assert [k for k in fresh if torch.equal(fresh[k], trained[k])] == []
    final = _state(cli.model.model)
    assert all(torch.equal(final[k], trained[k]) for k in final)  # the export is the trained model

    tok = unrun.model.tokenizer
    prompt = tok("BEGINNING OF CONVERSATION: USER: how do i help ? ASSISTANT:", return_tensors="pt")
    ids = torch.cat([torch.tensor([[tok.bos_token_id]]), prompt["input_ids"]], dim=1)
    generated = loaded.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert generated.shape[0] == 1 and ids.shape[1] < generated.shape[1] <= ids.shape[1] + 4
    assert torch.equal(generated[:, : ids.shape[1]], ids)


# --- stage 1 ------------------------------------------------------------------------------------------------


def test_reward_starts_from_the_sft_backbone(pipeline):
    unrun = main(["--config", pipeline["reward_config"]], run=False)
    unrun.model.configure_model()
    sft = AutoModelForCausalLM.from_pretrained(pipeline["root"] / "exports" / "sft")
    start, sft_backbone = _state(unrun.model.model.model), _state(sft.model)
    assert all(torch.equal(start[k], sft_backbone[k]) for k in sft_backbone)
    trained = _state(pipeline["reward"].model.model.model)
    assert not torch.equal(trained["embed_tokens.weight"], sft_backbone["embed_tokens.weight"])


def test_reward_export_loads_with_auto_class_and_scores_like_the_module(pipeline):
    cli = pipeline["reward"]
    assert cli.trainer.global_step == 4
    assert {"train/loss", "train/accuracy", "val/loss", "val/accuracy"} <= set(cli.trainer.callback_metrics)
    export = AutoModelForSequenceClassification.from_pretrained(pipeline["root"] / "exports" / "reward").eval()
    assert export.config.num_labels == 1 and export.score.weight.shape == (1, 32)
    batch = _val_batch(cli)
    module = cli.model.eval()
    with torch.no_grad():
        ours = module(batch)
    assert ours.shape == (batch.num_pairs, 2)
    torch.testing.assert_close(_pair_scores(export, batch), ours, rtol=0, atol=1e-5)
    # val/accuracy is the share of validation pairs whose better response scores higher.
    better = ours.gather(1, batch.better_response_id[:, None]).squeeze(1)
    worse = ours.gather(1, 1 - batch.better_response_id[:, None]).squeeze(1)
    expected = (better > worse).float().mean()
    assert cli.trainer.callback_metrics["val/accuracy"] == pytest.approx(expected.item(), abs=1e-6)


def test_reward_test_reports_oracle_accuracy(pipeline):
    export = str(pipeline["root"] / "exports" / "reward")
    cli = main(["test", "--config", pipeline["reward_config"], "--model.init_args.model_name_or_path", export])
    metrics = cli.trainer.callback_metrics
    assert {"test/loss", "test/accuracy", "test/oracle_accuracy"} <= set(metrics)
    # Recompute by hand: among held-out pairs whose true rewards differ by >= oracle_margin (1.0), the share the
    # trained model orders like the oracle.
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    agree, clear = 0, 0
    for batch in cli.datamodule.test_dataloader():
        scores = _pair_scores(model, batch)
        gap = batch.true_rewards[:, 0] - batch.true_rewards[:, 1]
        mask = gap.abs() >= 1.0
        agree += int((((scores[:, 0] - scores[:, 1]) * gap)[mask] > 0).sum())
        clear += int(mask.sum())
    assert clear > 0
    assert metrics["test/oracle_accuracy"] == pytest.approx(agree / clear, abs=1e-6)


# --- stage 2 ------------------------------------------------------------------------------------------------


def test_cost_fit_logs_sign_accuracy(pipeline):
    cli = pipeline["cost"]
    metrics = cli.trainer.callback_metrics
    assert {"train/sign_accuracy", "val/sign_accuracy", "val/accuracy", "val/cost_mean"} <= set(metrics)
    assert 0.0 <= float(metrics["train/sign_accuracy"]) <= 1.0
    # val/sign_accuracy: share of the 2 * 6 validation responses with sign(C) > 0 exactly when labelled unsafe.
    export = AutoModelForSequenceClassification.from_pretrained(pipeline["root"] / "exports" / "cost").eval()
    batch = _val_batch(cli)
    costs = _pair_scores(export, batch)
    expected = ((costs > 0) == ~batch.is_safe).float().mean()
    assert metrics["val/sign_accuracy"] == pytest.approx(expected.item(), abs=1e-6)
    assert metrics["val/cost_mean"] == pytest.approx(costs.mean().item(), abs=1e-5)


def test_cost_metrics_reach_tensorboard(pipeline):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (pipeline["root"] / "logs" / "cost").rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/sign_accuracy", "val/sign_accuracy", "train/loss"} <= tags
    assert len(accumulator.Scalars("val/sign_accuracy")) == 2  # one per epoch


# --- bad configs --------------------------------------------------------------------------------------------


def test_both_model_sources_fail_with_a_clear_message(pipeline, capsys, tmp_path):
    export = str(pipeline["root"] / "exports" / "sft")
    args = ["fit", "--config", pipeline["sft_config"], "--model.init_args.model_name_or_path", export]
    args += ["--model.init_args.export_dir", str(tmp_path / "sft")]  # not the start model (that is its own error)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(r"error: model.init_args: set exactly one of model_name_or_path .* and model_config", err)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data.batchsize", "4"], "unrecognized arguments: --data.batchsize"),
        (["--model.init_args.regularisation", "0.1"], "'regularisation' is not accepted"),
        (["--data.mode", "rl"], "data.mode: Expected a typing.Literal['sft', 'preference', 'prompts']. Got value: rl"),
    ],
)
def test_bad_keys_stop_the_cli_before_running(pipeline, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", pipeline["sft_config"], *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1  # one line, no usage text, no traceback
    assert message in err


# --- model cards ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["sft", "reward", "cost"])
def test_every_stage_export_has_a_model_card(pipeline, stage):
    from repo_lightning.models.model_card import read_model_card

    front, body = read_model_card(pipeline["root"] / "exports" / stage)
    block = front["repo_lightning"]
    assert block["stage"] == stage
    assert block["data"]["dataset"] == "safetyworld" and front["datasets"] == ["safetyworld"]
    assert any(key.startswith("val/") for key in block["metrics"])
    if stage == "sft":
        assert "base_model" not in front and block["model_config"]["model_type"] == "llama"  # built from a config
    else:
        assert front["base_model"] == str(pipeline["root"] / "exports" / "sft")
    config = yaml.safe_load(body.split("```yaml\n")[1].split("```")[0])
    assert config["model"]["class_path"] == STAGES[stage][0]  # the run's resolved config
