"""A policy run stopped at an epoch boundary and resumed from ``last.ckpt`` ends where an uninterrupted run does.

Two prompts per batch, two batches per epoch, two epochs. Sampling is re-seeded every iteration from
``(seed, iteration, rank)`` and the DataModule's sampler shuffles from ``(seed, epoch)``, so on CPU the resumed run
draws the same prompts and samples and must reproduce weights, multiplier and optimizer state.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from repo_lightning.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(tmp_path: Path, run: str, exports: dict[str, str], max_epochs: int, critics: str = "separate") -> str:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": max_epochs,
            "log_every_n_steps": 1,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path / run),
            "logger": False,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp_path / run / "ckpt"), "save_last": True, "save_top_k": 0},
                }
            ],
        },
        "model": {
            "class_path": "repo_lightning.modules.PolicyModule",
            "init_args": {
                "actor_path": exports["sft"],
                "reward_model_path": exports["reward"],
                "cost_model_path": exports["cost"],
                "objective": {"class_path": "repo_lightning.objectives.RePO"},
                "sampling": {"samples_per_prompt": 2, "max_new_tokens": 6},
                "update": {
                    "minibatch_size": 2,
                    "actor_lr": 1e-2,
                    "critic_lr": 1e-2,
                },  # two optimizer steps per iteration: Adam state and global_step both matter
                "dual": {
                    "class_path": "repo_lightning.rl.dual.DualVariable",
                    "init_args": {
                        "rule": {"class_path": "repo_lightning.rl.dual.AdditiveRule", "init_args": {"lr": 0.5}}
                    },
                },
                "seed": 3,
                "critics": critics,
            },
        },
        "data": {
            "mode": "prompts",
            "dataset": "safetyworld",
            "world": {"num_topics": 6, "num_rl_prompts": 32, "num_eval_prompts": 16},
            "tokenizer": exports["tokenizer"],
            "cache_dir": str(tmp_path / "cache"),
            "max_rows": 4,
            "batch_size": 2,
            "max_prompt_length": 32,
            "max_length": 48,
            "val_fraction": 0.0,
        },
    }
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _trained_state(checkpoint: dict) -> dict[str, torch.Tensor]:
    state = checkpoint["state_dict"]
    assert not any(key.split(".", 1)[0] in ("ref_model", "reward_model", "cost_model") for key in state)
    return state


@pytest.mark.parametrize("critics", ["separate", "shared"])
def test_resumed_run_matches_uninterrupted_run(tmp_path, tiny_exports, critics):
    main(["fit", "--config", _config(tmp_path, "a", tiny_exports, max_epochs=2, critics=critics)])
    full = torch.load(tmp_path / "a" / "ckpt" / "last.ckpt", weights_only=False)

    config_b = _config(tmp_path, "b", tiny_exports, max_epochs=1, critics=critics)
    main(["fit", "--config", config_b])
    last_b = tmp_path / "b" / "ckpt" / "last.ckpt"
    half = torch.load(last_b, weights_only=False)
    assert half["epoch"] == 1 and half["global_step"] == 4 and int(half["state_dict"]["iteration"]) == 2
    cli = main(["fit", "--config", config_b, "--trainer.max_epochs=2", f"--ckpt_path={last_b}"])
    resumed = torch.load(last_b, weights_only=False)

    # Both runs did 2 epochs x 2 iterations x 2 minibatches; the resumed one did only the second epoch itself.
    assert full["epoch"] == resumed["epoch"] == 2  # Lightning stores the epoch count reached
    assert full["global_step"] == resumed["global_step"] == 8
    assert int(cli.model.iteration) == 4 and len(cli.model.lambda_history) == 4

    full_state, resumed_state, half_state = _trained_state(full), _trained_state(resumed), _trained_state(half)
    assert full_state.keys() == resumed_state.keys()
    for prefix in ("actor.", "reward_critic.", *(("cost_critic.",) if critics == "separate" else ())):
        assert any(key.startswith(prefix) for key in full_state), prefix
    assert critics == "separate" or not any(key.startswith("cost_critic.") for key in full_state)
    for key, value in full_state.items():
        torch.testing.assert_close(resumed_state[key], value, rtol=0, atol=1e-6, msg=key)
    # The second epoch did train: the comparison above is not between two copies of the first epoch.
    assert any(not torch.equal(half_state[k], full_state[k]) for k in full_state if k.startswith("actor."))

    lam_full = full_state["dual.lagrange_multiplier"]
    torch.testing.assert_close(resumed_state["dual.lagrange_multiplier"], lam_full, rtol=0, atol=1e-6)
    assert not torch.equal(lam_full, torch.ones_like(lam_full)), "the multiplier never moved"
    assert resumed["lambda_history"] == full["lambda_history"]
    assert resumed["dual_statistic_history"] == full["dual_statistic_history"]
    assert len(full["dual_statistic_history"]) == 4

    (opt_full,), (opt_resumed,) = full["optimizer_states"], resumed["optimizer_states"]
    assert opt_full["state"].keys() == opt_resumed["state"].keys() and opt_full["state"]
    for index, state in opt_full["state"].items():
        assert int(opt_resumed["state"][index]["step"]) == int(state["step"]) == 8
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_resumed["state"][index][name], state[name], rtol=0, atol=1e-6)
