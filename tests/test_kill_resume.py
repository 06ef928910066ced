"""A policy run killed with SIGKILL between iterations, at any iteration, and resumed from ``last.ckpt`` ends
bit for bit where an uninterrupted run ends: weights, optimizer state, multiplier and its window, data order.

Three prompt batches per epoch, two epochs, a checkpoint after every iteration. The killed runs are subprocesses
(``python -m repo_lightning fit``) that die without any clean-up (``tests/kill_switch.py``): after iteration 1 (mid
epoch 0), after iteration 3 (the last batch of epoch 0) and after iteration 4 (mid epoch 1). Before the data
loader was resumable, a run resumed mid-epoch restarted the epoch's batches and drifted from the next iteration on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from kill_switch import KILL_ENV

from repo_lightning.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
ITERATIONS_PER_EPOCH = 3
KILL_POINTS = (1, 3, 4)


def _config(tmp_path: Path, run: str, exports: dict[str, str]) -> str:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 2,
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
                    # Two optimizer steps per iteration (minibatch_size 2 of 4 samples): a checkpoint per iteration.
                    "init_args": {
                        "dirpath": str(tmp_path / run / "ckpt"),
                        "every_n_train_steps": 2,
                        "save_top_k": 0,
                        "save_last": True,
                    },
                },
                {"class_path": "kill_switch.KillAfterIteration"},
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
                "update": {"minibatch_size": 2, "actor_lr": 1e-2, "critic_lr": 1e-2},
                "dual": {
                    "class_path": "repo_lightning.rl.dual.DualVariable",
                    # integral and previous statistic: rule state beyond the multiplier
                    "init_args": {
                        "rule": {"class_path": "repo_lightning.rl.dual.PIDRule", "init_args": {"kp": 0.5}},
                        "window": 2,
                    },
                },
                "seed": 3,
            },
        },
        "data": {
            "mode": "prompts",
            "dataset": "safetyworld",
            "world": {"num_topics": 6, "num_rl_prompts": 32, "num_eval_prompts": 16},
            "tokenizer": exports["tokenizer"],
            "cache_dir": str(tmp_path / "cache"),
            "max_rows": 2 * ITERATIONS_PER_EPOCH,
            "batch_size": 2,
            "max_prompt_length": 32,
            "max_length": 48,
            "val_fraction": 0.0,
        },
    }
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _kill_run(config: str, after: int) -> None:
    env = dict(os.environ)
    env.update(
        {
            KILL_ENV: str(after),
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
    )
    result = subprocess.run(
        [sys.executable, "-m", "repo_lightning", "fit", "--config", config],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == -9, result.stderr[-3000:]


def _assert_same(full: dict, resumed: dict) -> None:
    assert (
        full["global_step"] == resumed["global_step"] == 2 * 2 * ITERATIONS_PER_EPOCH
    )  # epochs x iterations x minibatches
    assert full["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in full["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    assert resumed["lambda_history"] == full["lambda_history"]
    assert len(full["lambda_history"]) == 2 * ITERATIONS_PER_EPOCH
    (opt_full,), (opt_resumed,) = full["optimizer_states"], resumed["optimizer_states"]
    assert opt_full["state"].keys() == opt_resumed["state"].keys() and opt_full["state"]
    for index, state in opt_full["state"].items():
        for name, value in state.items():
            assert torch.equal(opt_resumed["state"][index][name], value), (index, name)


def test_killed_runs_resume_bit_for_bit(tmp_path, tiny_exports):
    main(["fit", "--config", _config(tmp_path, "full", tiny_exports)])
    full = torch.load(tmp_path / "full" / "ckpt" / "last.ckpt", weights_only=False)
    dual = {k: v for k, v in full["state_dict"].items() if k.startswith("dual.")}
    assert float(dual["dual.rule.integral"][0]) > 0, "the PID integral never moved: the test would not see its state"

    for after in KILL_POINTS:
        run = f"killed_after_{after}"
        config = _config(tmp_path, run, tiny_exports)
        _kill_run(config, after)
        last = tmp_path / run / "ckpt" / "last.ckpt"
        killed = torch.load(last, weights_only=False)
        assert int(killed["state_dict"]["iteration"]) == after
        loader_state = killed["loops"]["fit_loop"]["state_dict"]["combined_loader"]
        assert loader_state == [{"epoch": (after - 1) // ITERATIONS_PER_EPOCH, "batches": (after - 1) % 3 + 1}]

        main(["fit", "--config", config, f"--ckpt_path={last}"])
        _assert_same(full, torch.load(last, weights_only=False))
