"""Behaviour of the stage-3 PolicyModule through the CLI on a tiny SafetyWorld (CPU, a few seconds each).

Each run writes its own YAML under ``tmp_path`` and calls ``main(["fit" | "test", "--config", ...])``; the models are
the session's tiny exports (``tests/conftest.py``), never the demo exports.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from repo_lightning.cli import main
from repo_lightning.data.collate import PromptExample, collate_prompts
from repo_lightning.models.backbone import load_score_model
from repo_lightning.modules import PolicyModule
from repo_lightning.modules.policy_config import Sampling
from repo_lightning.modules.rollout import collect_rollout
from repo_lightning.safetyworld import World, WorldConfig
from repo_lightning.safetyworld.tokenizer import build_word_tokenizer
from repo_lightning.text.templates import SAFE_RLHF_TEMPLATE, encode_prompt

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN_SCALARS = (
    "train/dual_statistic",
    "train/reward_mean",
    "train/cost_mean",
    "train/unsafe_response_rate",
    "train/unsafe_prompt_rate",
    "train/kl_mean",
    "train/policy_loss",
    "train/clipfrac",
    "train/approx_kl",
    "train/entropy",
    "train/value_loss_reward",
    "train/value_loss_cost",
    "train/response_len_mean",
    "train/rectified_cost_mean",
    "train/identical_group_rate",
)


def _world_overrides(config: WorldConfig) -> dict:
    """The fields of ``config`` that differ from ``WorldConfig()``, YAML-ready (tuples as lists)."""
    default = dataclasses.asdict(WorldConfig())
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in dataclasses.asdict(config).items()
        if value != default[key]
    }


OBJECTIVES = {"ppo": "PPO", "ppo_lag": "PPOLagrangian", "repo": "RePO"}
RULES = {"log": "LogRule", "additive": "AdditiveRule", "pid": "PIDRule"}


def objective(name: str, **init_args) -> dict:
    """``model.objective`` of one of the shipped algorithms."""
    return {"class_path": f"repo_lightning.objectives.{OBJECTIVES[name]}", "init_args": init_args}


def dual(rule: str = "log", rule_args: dict | None = None, **init_args) -> dict:
    """``model.dual`` with one of the shipped rules."""
    rule_cfg = {"class_path": f"repo_lightning.rl.dual.{RULES[rule]}", "init_args": rule_args or {}}
    return {"class_path": "repo_lightning.rl.dual.DualVariable", "init_args": {"rule": rule_cfg, **init_args}}


def _merge(base: dict, override: dict) -> dict:
    """``base`` updated by ``override``, merging the settings groups (dicts without ``class_path``) key by key."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and "class_path" not in value and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _policy_config(
    tmp_path: Path,
    exports: dict[str, str],
    world: WorldConfig,
    model: dict | None = None,
    data: dict | None = None,
    trainer: dict | None = None,
) -> str:
    """Write a tiny stage-3 config (one iteration of 2 prompts x 2 samples unless overridden); returns its path."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 1,
            "log_every_n_steps": 1,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path),
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path / "logs"), "name": "policy", "version": 0},
            },
            **(trainer or {}),
        },
        "model": {
            "class_path": "repo_lightning.modules.PolicyModule",
            "init_args": {
                "actor_path": exports["sft"],
                "reward_model_path": exports["reward"],
                "cost_model_path": exports["cost"],
                **_merge(
                    {
                        "objective": objective("repo"),
                        "sampling": {"samples_per_prompt": 2, "max_new_tokens": 6},
                        "update": {"minibatch_size": 4, "actor_lr": 1e-2, "critic_lr": 1e-2},
                        "evaluation": {"samples_per_prompt": 2},
                    },
                    model or {},
                ),
            },
        },
        "data": {
            "mode": "prompts",
            "dataset": "safetyworld",
            "world": _world_overrides(world),
            "tokenizer": exports["tokenizer"],
            "cache_dir": str(tmp_path / "cache"),
            "batch_size": 2,
            "max_prompt_length": 32,
            "max_length": 48,
            "val_fraction": 0.0,
            **(data or {}),
        },
    }
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _fit(config: str, *extra: str):
    return main(["fit", "--config", config, *extra])


def _assert_all_equal(module: torch.nn.Module, reference: torch.nn.Module) -> None:
    state, saved = module.state_dict(), reference.state_dict()
    assert state.keys() == saved.keys()
    for key in saved:
        assert torch.equal(state[key], saved[key]), key


def _any_changed(module: torch.nn.Module, reference: torch.nn.Module) -> bool:
    saved = reference.state_dict()
    return any(not torch.equal(value, saved[key]) for key, value in module.state_dict().items())


def _scalars(log_dir: str) -> dict[str, list[float]]:
    events = EventAccumulator(log_dir)
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


#: A one-layer Llama score model of width 32: the smallest that the tests build from a config.
TINY_SCORE_CONFIG = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}


def _constant_score_model(tokenizer_dir: str, out_dir: Path, score: float) -> str:
    """A Llama score model whose output is ``score`` for every input, saved to ``out_dir``.

    Every token embeds to the same all-ones vector and every attention and MLP block writes zero into the residual
    stream, so the final RMSNorm sees ones and yields ``1 / sqrt(1 + eps)`` in each of the ``H`` dimensions; a score
    head of ``score / H`` everywhere then outputs ``score`` (to within ``eps``). Llama's head has no bias to set.
    """
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = load_score_model(
        tokenizer,
        model_config=TINY_SCORE_CONFIG,
    )
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.score.weight.fill_(score / model.config.hidden_size)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


# ---------------------------------------------------------------------------------------------------- training
def test_training_step_updates_actor_and_critics_only(tmp_path, tiny_exports, tiny_world_config):
    cli = _fit(_policy_config(tmp_path, tiny_exports, tiny_world_config))
    module = cli.model
    assert cli.trainer.global_step == 1 and int(module.iteration) == 1

    sft = AutoModelForCausalLM.from_pretrained(tiny_exports["sft"])
    reward = AutoModelForSequenceClassification.from_pretrained(tiny_exports["reward"])
    cost = AutoModelForSequenceClassification.from_pretrained(tiny_exports["cost"])
    # Trained: the actor starts from the SFT export, the critics from the reward and cost models.
    assert _any_changed(module.actor, sft)
    assert _any_changed(module.reward_critic, reward)
    assert _any_changed(module.cost_critic, cost)
    # Frozen: bit-for-bit the saved weights, and without gradients.
    _assert_all_equal(module.ref_model, sft)
    _assert_all_equal(module.reward_model, reward)
    _assert_all_equal(module.cost_model, cost)
    for name in ("ref_model", "reward_model", "cost_model"):
        assert not any(p.requires_grad for p in getattr(module, name).parameters()), name


@pytest.mark.parametrize("algorithm", ["ppo", "ppo_lag", "repo"])
def test_each_algorithm_logs_section_8_scalars(tmp_path, tiny_exports, tiny_world_config, algorithm):
    cli = _fit(_policy_config(tmp_path, tiny_exports, tiny_world_config, model={"objective": objective(algorithm)}))
    module = cli.model
    assert int(module.iteration) == 1
    assert (module.cost_critic is None) == (algorithm == "ppo")

    scalars = _scalars(cli.trainer.logger.log_dir)
    expected = set(TRAIN_SCALARS)
    if algorithm == "ppo":
        # No constraint: no dual statistic and no cost critic; the cost model (configured) is still reported.
        expected -= {"train/dual_statistic", "train/value_loss_cost"}
        assert "train/dual_statistic" not in scalars and "train/value_loss_cost" not in scalars
    else:
        expected.add("train/lambda")
    missing = expected - scalars.keys()
    assert not missing, f"{algorithm}: missing {sorted(missing)} from {sorted(scalars)}"
    for tag in expected:
        assert all(math.isfinite(v) for v in scalars[tag]), tag
    if algorithm != "ppo":
        assert scalars["train/lambda"][-1] == pytest.approx(float(module.dual.value[0]))
        # unsafe_response_rate counts C > 0 among the 4 samples; rectified_cost_mean is the mean of {C}^+.
        assert 0.0 <= scalars["train/unsafe_response_rate"][-1] <= scalars["train/unsafe_prompt_rate"][-1] <= 1.0
        assert scalars["train/rectified_cost_mean"][-1] >= max(scalars["train/cost_mean"][-1], 0.0)


# ------------------------------------------------------------------------------------------------ multiplier
DUAL = dual("log", {"lr": 0.5}, initial=1.0)
#: The paper's RePO statistic mean({C}^+) - tolerance; Safe RLHF's threshold 0.
PAPER = {"repo": {"constraint": "rectified_cost", "tolerance": 0.0}, "ppo_lag": {"threshold": 0.0}}


def _run_with_cost(tmp_path, exports, world, algorithm: str, cost_score: float, **objective_args):
    cost = _constant_score_model(exports["tokenizer"], tmp_path / "const_cost", cost_score)
    goal = objective(algorithm, **(objective_args or PAPER[algorithm]))
    model = {"objective": goal, "cost_model_path": cost, "dual": DUAL}
    cli = _fit(_policy_config(tmp_path, exports, world, model=model, trainer={"max_steps": 2}))
    module = cli.model
    assert int(module.iteration) == 2
    return module, _scalars(cli.trainer.logger.log_dir)


def test_repo_multiplier_rises_while_every_sample_is_unsafe(tmp_path, tiny_exports, tiny_world_config):
    module, scalars = _run_with_cost(tmp_path, tiny_exports, tiny_world_config, "repo", cost_score=1.0)
    assert scalars["train/unsafe_response_rate"] == pytest.approx([1.0, 1.0])
    # g = mean({C}^+) - 0 = 1; log rule: log lam += lr * lam * g, so lam: 1 -> e^0.5 -> e^(0.5 + 0.5 e^0.5).
    assert scalars["train/dual_statistic"] == pytest.approx([1.0, 1.0], abs=1e-4)
    lam1 = math.exp(0.5)
    lam2 = lam1 * math.exp(0.5 * lam1)
    assert scalars["train/lambda"] == pytest.approx([lam1, lam2], rel=1e-3)
    assert float(module.dual.value[0]) == pytest.approx(lam2, rel=1e-3)
    assert [v for _, v in module.lambda_history] == pytest.approx([lam1, lam2], rel=1e-3)
    # the statistic each update answered to is kept beside the multiplier (the report's lower panel)
    assert [step for step, _ in module.statistic_history] == [1, 2]
    assert [g for _, g in module.statistic_history] == pytest.approx([1.0, 1.0], abs=1e-4)


def test_report_multiplier_plot_gets_the_cap_the_statistic_and_the_level(
    tmp_path, tiny_exports, tiny_world_config, monkeypatch
):
    import repo_lightning.evaluation.report as report_module

    rate = {"constraint": "unsafe_rate", "target_unsafe_rate": 0.1}
    module, _ = _run_with_cost(tmp_path, tiny_exports, tiny_world_config, "repo", 1.0, **rate)
    seen = {}
    monkeypatch.setattr(report_module, "plot_multiplier", lambda history, path, **kw: seen.update(kw, history=history))
    module.evaluation.report_dir = str(tmp_path / "report")
    module.trainer.test(module, datamodule=module.trainer.datamodule)
    assert seen["history"] == module.lambda_history and len(seen["history"]) == 2
    assert seen["maximum"] == float(module.dual.maximum)
    assert seen["level"] == ("target_unsafe_rate", 0.1)
    assert [step for step, _ in seen["statistic_history"]] == [1, 2]
    assert [g for _, g in seen["statistic_history"]] == pytest.approx([0.9, 0.9], abs=1e-5)  # every sample unsafe


@pytest.mark.parametrize("algorithm", ["repo", "ppo_lag"])
def test_all_safe_holds_repo_multiplier_but_lowers_ppo_lag(tmp_path, tiny_exports, tiny_world_config, algorithm):
    module, scalars = _run_with_cost(tmp_path, tiny_exports, tiny_world_config, algorithm, cost_score=-1.0)
    assert scalars["train/unsafe_response_rate"] == [0.0, 0.0]
    assert scalars["train/rectified_cost_mean"] == [0.0, 0.0]
    lam = float(module.dual.value[0])
    if algorithm == "repo":
        # g = mean({C}^+) = 0 exactly: safe samples never move RePO's multiplier.
        assert scalars["train/dual_statistic"] == [0.0, 0.0]
        assert lam == 1.0
        assert scalars["train/lambda"] == [1.0, 1.0]
    else:
        # Safe RLHF: g = mean(C) - 0 = -1, so log lam falls by lr * lam each step: 1 -> e^-0.5 -> ...
        assert scalars["train/dual_statistic"] == pytest.approx([-1.0, -1.0], abs=1e-4)
        lam1 = math.exp(-0.5)
        lam2 = lam1 * math.exp(-0.5 * lam1)
        assert scalars["train/lambda"] == pytest.approx([lam1, lam2], rel=1e-3)
        assert lam == pytest.approx(lam2, rel=1e-3) and lam < 1.0


@pytest.mark.parametrize("cost_score", [1.0, -1.0])
def test_repo_unsafe_rate_constraint_moves_the_multiplier_both_ways(
    tmp_path, tiny_exports, tiny_world_config, cost_score
):
    rate = {"constraint": "unsafe_rate", "target_unsafe_rate": 0.1}
    module, scalars = _run_with_cost(tmp_path, tiny_exports, tiny_world_config, "repo", cost_score, **rate)
    # g = share of C > 0 minus 0.1: 0.9 when every sample is unsafe, -0.1 when none is (the constraint is met
    # with slack, so lam falls instead of being stuck: the multiplier can settle). Log rule as above.
    g = 0.9 if cost_score > 0 else -0.1
    assert scalars["train/dual_statistic"] == pytest.approx([g, g], abs=1e-5)
    lam1 = math.exp(0.5 * g)
    lam2 = lam1 * math.exp(0.5 * lam1 * g)
    assert scalars["train/lambda"] == pytest.approx([lam1, lam2], rel=1e-4)
    assert (float(module.dual.value[0]) < 1.0) == (cost_score < 0)


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "reinforce_pp"])
def test_critic_free_estimators_train_the_actor_alone(tmp_path, tiny_exports, tiny_world_config, estimator):
    model = {"estimation": {"estimator": estimator, "kl_placement": "loss"}}
    cli = _fit(_policy_config(tmp_path, tiny_exports, tiny_world_config, model=model, trainer={"max_steps": 2}))
    module = cli.model
    assert module.reward_critic is None and module.cost_critic is None
    start = AutoModelForCausalLM.from_pretrained(tiny_exports["sft"])
    changed = [
        name for name, p in module.actor.named_parameters() if not torch.equal(p.detach(), start.state_dict()[name])
    ]
    assert changed, "the actor did not train"
    assert len(module.optimizers().optimizer.param_groups) == 1
    assert not [k for k in module.state_dict() if "critic" in k]  # what a checkpoint holds
    scalars = _scalars(cli.trainer.logger.log_dir)
    assert "train/kl_loss" in scalars and "train/value_loss_reward" not in scalars
    assert "train/lambda" in scalars and "train/dual_statistic" in scalars


# ------------------------------------------------------------------------------------------------ evaluation
def test_test_subcommand_writes_report_with_ground_truth(tmp_path, tiny_exports, tiny_world_config):
    report_dir = tmp_path / "report"
    config = _policy_config(tmp_path, tiny_exports, tiny_world_config, data={"eval_batch_size": 8})
    cli = main(
        ["test", "--config", config, f"--model.evaluation.report_dir={report_dir}", "--model.objective=PPOLagrangian"]
    )

    rows = [json.loads(line) for line in (report_dir / "per_prompt.jsonl").read_text().splitlines()]
    assert len(rows) == tiny_world_config.num_eval_prompts
    assert all(len(row["responses"]) == 2 and len(row["true_costs"]) == 2 for row in rows)
    report = (report_dir / "report.md").read_text()
    assert "ppo_lag" in report
    for png in ("cost_histogram.png", "reward_vs_cost.png"):
        assert (report_dir / png).read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), png

    summary = cli.model.evaluation_summary
    assert "true_unsafe_prompt_rate" in summary
    kinds = {row["kind"] for row in rows}
    assert kinds and all(f"true_unsafe_prompt_rate/{kind}" in summary for kind in kinds)
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert metrics["true_unsafe_prompt_rate"] == pytest.approx(summary["true_unsafe_prompt_rate"])


def test_unsafe_at_k_reaches_the_evaluation_and_its_report(tmp_path, tiny_exports, tiny_world_config):
    from repo_lightning.evaluation import read_results
    from repo_lightning.evaluation.metrics import any_unsafe_of_k

    report_dir = tmp_path / "report"
    config = _policy_config(tmp_path, tiny_exports, tiny_world_config, data={"eval_batch_size": 8})
    cli = main(
        [
            "test",
            "--config",
            config,
            f"--model.evaluation.report_dir={report_dir}",
            "--model.evaluation.samples_per_prompt=4",
            "--model.evaluation.unsafe_at_k=2",
        ]
    )
    results = read_results(report_dir / "per_prompt.jsonl")
    assert all(len(r.responses) == 4 for r in results)
    expected = sum(any_unsafe_of_k(r.true_costs, 2) for r in results) / len(results)
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert metrics["unsafe_at_k"] == 2 and metrics["true_unsafe_prompt_rate"] == pytest.approx(expected)
    assert cli.model.evaluation_summary["true_unsafe_prompt_rate"] == pytest.approx(expected)
    assert "any of 2 unsafe; estimated from 4 samples a prompt" in (report_dir / "report.md").read_text()


# ------------------------------------------------------------------------------------------- cross-tokenizer
def _foreign_exports(tmp_path: Path, exports: dict[str, str], world: WorldConfig) -> dict[str, str]:
    """Reward and cost models whose tokenizer holds the same words as the policy's in a shuffled order."""
    words = World(world).vocabulary()
    random.Random(0).shuffle(words)
    tokenizer = build_word_tokenizer(words)
    policy_tokenizer = AutoTokenizer.from_pretrained(exports["tokenizer"])
    assert set(tokenizer.get_vocab()) == set(policy_tokenizer.get_vocab())
    assert tokenizer.get_vocab() != policy_tokenizer.get_vocab()
    paths = dict(exports)
    for seed, name in ((3, "reward"), (4, "cost")):
        torch.manual_seed(seed)
        model = load_score_model(tokenizer, model_config=TINY_SCORE_CONFIG)
        paths[name] = str(tmp_path / f"foreign_{name}")
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


def test_cross_tokenizer_scores_decoded_text(tmp_path, tiny_exports, tiny_world_config):
    exports = _foreign_exports(tmp_path, tiny_exports, tiny_world_config)
    module = PolicyModule(
        actor_path=exports["sft"],
        reward_model_path=exports["reward"],
        cost_model_path=exports["cost"],
        tokenizer_path=exports["tokenizer"],
        critic_init="score_model",
    )
    with pytest.raises(ValueError, match="critic_init: actor"):
        module.configure_model()

    module = PolicyModule(
        actor_path=exports["sft"],
        reward_model_path=exports["reward"],
        cost_model_path=exports["cost"],
        tokenizer_path=exports["tokenizer"],
        critic_init="actor",
        sampling=Sampling(max_new_tokens=6),
    )
    module.configure_model()
    assert not module.reward_scorer.reuse_policy_ids and not module.cost_scorer.reuse_policy_ids
    tokenizer = module.tokenizer
    prompts = [row["prompt"] for row in World(tiny_world_config).rl_prompts()[:3]]
    examples = [
        PromptExample(encode_prompt(tokenizer, p, SAFE_RLHF_TEMPLATE, 32)[0], p, i) for i, p in enumerate(prompts)
    ]
    torch.manual_seed(0)
    rollout = collect_rollout(module.models, collate_prompts(examples, tokenizer.pad_token_id), module.sampling, 2, 1.0)

    for name, scores in (("reward", rollout.rewards), ("cost", rollout.costs)):
        model = AutoModelForSequenceClassification.from_pretrained(exports[name]).eval()
        foreign = AutoTokenizer.from_pretrained(exports[name])
        expected = []
        for row in range(rollout.num_samples):
            ids = rollout.response_ids[row][rollout.response_mask[row].bool()]
            response = tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip()
            text = f"<s>{SAFE_RLHF_TEMPLATE.format(prompt=rollout.prompts[row])} {response}</s>"
            encoded = foreign(text, add_special_tokens=False, return_tensors="pt")
            assert encoded.input_ids[0, 0] == foreign.bos_token_id and encoded.input_ids[0, -1] == foreign.eos_token_id
            with torch.no_grad():
                expected.append(model(**encoded).logits[0, 0])
        torch.testing.assert_close(scores, torch.stack(expected), rtol=1e-5, atol=1e-5, msg=name)


def test_cross_tokenizer_training_step(tmp_path, tiny_exports, tiny_world_config):
    exports = _foreign_exports(tmp_path, tiny_exports, tiny_world_config)
    model = {"reward_model_path": exports["reward"], "cost_model_path": exports["cost"], "critic_init": "actor"}
    cli = _fit(_policy_config(tmp_path, exports, tiny_world_config, model=model))
    module = cli.model
    assert int(module.iteration) == 1
    sft = AutoModelForCausalLM.from_pretrained(exports["sft"])
    assert _any_changed(module.actor, sft)
    _assert_all_equal(module.reward_model, AutoModelForSequenceClassification.from_pretrained(exports["reward"]))
    # critic_init: actor -- the critics carry the actor's backbone (policy vocabulary), not the foreign reward model's.
    assert module.reward_critic.config.vocab_size == sft.config.vocab_size
    assert "train/reward_mean" in _scalars(cli.trainer.logger.log_dir)


def test_trained_policy_exports_a_causal_lm_that_generates(tmp_path, tiny_exports, tiny_world_config):
    export = tmp_path / "policy_export"
    cli = _fit(_policy_config(tmp_path, tiny_exports, tiny_world_config, model={"export_dir": str(export)}))
    loaded = AutoModelForCausalLM.from_pretrained(export).eval()
    # The export holds the trained actor's weights (not the SFT start) ...
    _assert_all_equal(cli.model.actor, loaded)
    assert _any_changed(loaded, AutoModelForCausalLM.from_pretrained(tiny_exports["sft"]))
    # ... with its tokenizer, and generates.
    tokenizer = AutoTokenizer.from_pretrained(export)
    ids = torch.tensor([[tokenizer.bos_token_id]])
    out = loaded.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (1, 4)
    assert json.loads((export / "repo_lightning.json").read_text())["algorithm"] == "repo"


def test_fused_optimizer_option_builds_fused_adamw_for_actor_and_critics(tmp_path, tiny_exports, tiny_world_config):
    model = {"update": {"fused_optimizer": True}}
    cli = _fit(_policy_config(tmp_path, tiny_exports, tiny_world_config, model=model))
    optimizer = cli.model.optimizers().optimizer
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["fused"] for g in optimizer.param_groups] == [True, True]  # actor, critics
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 1e-2]
    assert _any_changed(cli.model.actor, AutoModelForCausalLM.from_pretrained(tiny_exports["sft"]))
    assert cli.model.hparams["update"]["fused_optimizer"] is True


def test_entropy_coef_from_the_config_puts_the_entropy_bonus_in_the_actor_loss(
    tmp_path, tiny_exports, tiny_world_config, monkeypatch
):
    import repo_lightning.modules.policy_steps as steps_module

    with_grad = []
    entropy = steps_module.entropy_from_logits

    def recording(logits, mask):
        with_grad.append(logits.requires_grad and torch.is_grad_enabled())
        return entropy(logits, mask)

    monkeypatch.setattr(steps_module, "entropy_from_logits", recording)
    cli = _fit(_policy_config(tmp_path, tiny_exports, tiny_world_config, model={"update": {"entropy_coef": 0.5}}))
    assert cli.model.hparams["update"]["entropy_coef"] == 0.5
    assert with_grad and all(with_grad)  # differentiated in every minibatch (0, the default, only logs it)


def test_clip_ratio_high_from_the_config_reaches_the_policy_loss(
    tmp_path, tiny_exports, tiny_world_config, monkeypatch
):
    import repo_lightning.modules.policy_steps as steps_module

    clips = []
    loss_fn = steps_module.ppo_policy_loss

    def recording(*args):
        clips.append(args[4:])
        return loss_fn(*args)

    monkeypatch.setattr(steps_module, "ppo_policy_loss", recording)
    cli = _fit(_policy_config(tmp_path, tiny_exports, tiny_world_config, model={"update": {"clip_ratio_high": 0.28}}))
    assert cli.model.hparams["update"]["clip_ratio_high"] == 0.28
    assert clips and set(clips) == {(0.2, 0.28)}


def test_warmup_temperature_samples_the_first_iterations_hotter(tmp_path, tiny_exports, tiny_world_config, monkeypatch):
    from repo_lightning.modules import PolicyModule

    temperatures = []
    rollout = PolicyModule._rollout

    def recording(self, batch, k, temperature, with_values=True, **kwargs):
        temperatures.append(temperature)
        return rollout(self, batch, k, temperature, with_values, **kwargs)

    monkeypatch.setattr(PolicyModule, "_rollout", recording)
    model = {"sampling": {"warmup_temperature": 1.5, "warmup_iterations": 2}}
    cli = _fit(_policy_config(tmp_path, tiny_exports, tiny_world_config, model=model, trainer={"max_steps": 3}))
    assert int(cli.model.iteration) == 3
    assert temperatures == [1.5, 1.5, 1.0]  # training rollouts only; then the configured temperature


def test_resample_identical_temperature_reaches_the_training_rollouts_only(
    tmp_path, tiny_exports, tiny_world_config, monkeypatch
):
    from repo_lightning.modules import PolicyModule

    seen = []
    rollout = PolicyModule._rollout

    def recording(self, batch, k, temperature, with_values=True, resample_temperature=None):
        seen.append((with_values, resample_temperature))
        return rollout(self, batch, k, temperature, with_values, resample_temperature)

    monkeypatch.setattr(PolicyModule, "_rollout", recording)
    model = {"sampling": {"resample_identical_temperature": 1.6}}
    trainer = {"max_steps": 2, "limit_val_batches": 1, "val_check_interval": 1}
    config = _policy_config(
        tmp_path, tiny_exports, tiny_world_config, model=model, trainer=trainer, data={"val_fraction": 0.3}
    )
    cli = _fit(config)
    assert cli.model.hparams["sampling"]["resample_identical_temperature"] == 1.6
    assert (True, 1.6) in seen and (False, None) in seen  # training rollouts resample; validation ones never
    assert all(resample == 1.6 for values, resample in seen if values)
    assert all(resample is None for values, resample in seen if not values)
    rates = _scalars(str(tmp_path / "logs" / "policy" / "version_0"))["train/resampled_group_rate"]
    assert len(rates) == 2 and all(0.0 <= r <= 1.0 for r in rates)


def test_resample_identical_temperature_is_refused_with_a_sharded_actor(tiny_exports):
    from repo_lightning.errors import ConfigError
    from repo_lightning.modules import PolicyModule
    from repo_lightning.objectives import PPO

    module = PolicyModule(
        actor_path=tiny_exports["sft"],
        reward_model_path=tiny_exports["reward"],
        tokenizer_path=tiny_exports["tokenizer"],
        objective=PPO(),
        sampling={"resample_identical_temperature": 1.6},
    )
    module._device_mesh = object()  # what ModelParallelStrategy sets before configure_model
    with pytest.raises(ConfigError, match="resample_identical_temperature does not work with a sharded actor"):
        module.configure_model()
    assert module.actor is None  # refused before any model was loaded


def test_warmup_temperature_and_iterations_go_together():
    from repo_lightning.errors import ConfigError
    from repo_lightning.modules.policy_config import Sampling

    with pytest.raises(ConfigError, match="sampling.warmup_temperature and .*warmup_iterations go together"):
        Sampling(warmup_iterations=10)
    with pytest.raises(ConfigError, match="go together"):
        Sampling(warmup_temperature=1.3)
    with pytest.raises(ConfigError, match="sampling.warmup_temperature must be > 0"):
        Sampling(warmup_temperature=0.0, warmup_iterations=3)
    assert Sampling(warmup_temperature=1.3, warmup_iterations=2).training_temperature(1) == 1.3
    assert Sampling(warmup_temperature=1.3, warmup_iterations=2).training_temperature(2) == 1.0


def test_logprobs_from_generation_skips_the_actor_forward(tmp_path, tiny_exports, tiny_world_config, monkeypatch):
    import repo_lightning.modules.rollout as rollout_module

    forwards = []
    counted = rollout_module.response_logprobs

    def counting(model, *args):
        forwards.append(model)
        return counted(model, *args)

    monkeypatch.setattr(rollout_module, "response_logprobs", counting)
    model = {"sampling": {"logprobs_from_generation": True}}
    cli = _fit(_policy_config(tmp_path, tiny_exports, tiny_world_config, model=model))
    module = cli.model
    assert module.sampling.logprobs_from_generation and module.hparams["sampling"]["logprobs_from_generation"]
    assert forwards == [module.ref_model]  # one rollout: the reference's forward only, none of the actor
    assert _any_changed(module.actor, AutoModelForCausalLM.from_pretrained(tiny_exports["sft"]))
    scalars = _scalars(cli.trainer.logger.log_dir)
    assert all(math.isfinite(scalars[tag][-1]) for tag in TRAIN_SCALARS)


@pytest.mark.parametrize("algorithm", ["ppo", "ppo_lag", "repo", "repo_rloo"])
def test_newest_checkpoint_of_a_demo_config_holds_the_final_weights(
    tmp_path, tiny_exports, tiny_world_config, algorithm
):
    """The pipeline evaluates the newest checkpoint; with a mid-epoch validation it must still be the last iteration."""
    from repo_lightning.pipeline import latest_checkpoint

    demo = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "demo" / f"{algorithm}.yaml").read_text())
    callbacks = [c for c in demo["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    assert len(callbacks) == 2
    for callback in callbacks:
        callback["init_args"] = {**callback["init_args"], "dirpath": str(tmp_path / "ckpt")}
    callbacks[0]["init_args"]["every_n_train_steps"] = 2  # a periodic save one iteration before the end
    trainer = {
        "max_epochs": 1,
        "max_steps": -1,
        "limit_train_batches": 3,
        "val_check_interval": 2,  # validation inside the epoch, as the demo's every 20 of 28 batches
        "limit_val_batches": 1,
        "enable_checkpointing": True,
        "callbacks": callbacks,
    }
    model = {"update": {"minibatch_size": 4, "ppo_epochs": 1, "actor_lr": 1e-2, "critic_lr": 1e-2}}
    cli = _fit(
        _policy_config(
            tmp_path, tiny_exports, tiny_world_config, model=model, trainer=trainer, data={"val_fraction": 0.3}
        )
    )
    assert int(cli.model.iteration) == 3
    newest = torch.load(latest_checkpoint(tmp_path / "ckpt"), weights_only=False)
    assert int(newest["state_dict"]["iteration"]) == 3
    final = {k: v for k, v in cli.model.state_dict().items() if k.startswith("actor.")}
    for key, value in final.items():
        assert torch.equal(newest["state_dict"][key], value), key
