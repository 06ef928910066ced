"""Every stage under DDP and the policy under FSDP2 (``ModelParallelStrategy``), with 2 CPU processes on gloo.

Each run is ``python -m repo_lightning fit`` in a subprocess (Lightning's launchers re-execute the command for the
second rank). A test-only callback (``tests/rank_records.py``) makes every rank write what it trained on, what it
logged and its multiplier, so the tests compare ranks after the fact.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_WORLD
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from repo_lightning.cli import main

pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("one_torch_thread")]

REPO = Path(__file__).resolve().parents[1]
DDP = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
MODEL_PARALLEL = {
    "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
    "init_args": {"data_parallel_size": 1, "tensor_parallel_size": 2},
}
SGD = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}}
STAGES = {
    "sft": ("SFTModule", "sft"),
    "reward": ("RewardModule", "preference"),
    "cost": ("CostModule", "preference"),
    "policy": ("PolicyModule", "prompts"),
}


def _model_args(stage: str, exports: dict[str, str]) -> dict:
    if stage == "policy":
        return {
            "actor_path": exports["sft"],
            "reward_model_path": exports["reward"],
            "cost_model_path": exports["cost"],
            "objective": {"class_path": "repo_lightning.objectives.RePO"},
            "sampling": {"samples_per_prompt": 2, "max_new_tokens": 6},
            "update": {"minibatch_size": 4, "actor_lr": 1e-2, "critic_lr": 1e-2},
            "dual": {
                "class_path": "repo_lightning.rl.dual.DualVariable",
                "init_args": {"rule": {"class_path": "repo_lightning.rl.dual.AdditiveRule", "init_args": {"lr": 0.5}}},
            },
            "seed": 3,
        }
    # The reward and cost stages start from their own exports so that no weight is initialised at random and a
    # single-process run can be compared with a DDP run weight for weight.
    return {"model_name_or_path": exports[stage], "optimizer": SGD}


def _config(
    root: Path, stage: str, exports: dict[str, str], trainer: dict | None = None, model: dict | None = None
) -> str:
    """A tiny stage config under ``root`` (2 steps on one device unless overridden); returns its path."""
    class_name, mode = STAGES[stage]
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 1,
            "limit_train_batches": 2,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": False,
            "logger": False,
            "default_root_dir": str(root),
            "callbacks": [{"class_path": "rank_records.RankRecords", "init_args": {"out_dir": str(root / "ranks")}}],
            **(trainer or {}),
        },
        "model": {
            "class_path": f"repo_lightning.modules.{class_name}",
            "init_args": {**_model_args(stage, exports), "export_dir": str(root / "export"), **(model or {})},
        },
        "data": {
            "mode": mode,
            "dataset": "safetyworld",
            "world": dict(TINY_WORLD),
            "tokenizer": exports["tokenizer"],
            "cache_dir": str(root.parent / "cache"),
            "batch_size": 2 if stage == "policy" else 4,
            "max_prompt_length": 32,
            "max_length": 48,
            "val_fraction": 0.1,
        },
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config: str, *args: str) -> None:
    """``python -m repo_lightning fit --config config *args`` in a subprocess; fails the test on a non-zero exit."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]),
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
    )
    command = [sys.executable, "-m", "repo_lightning", "fit", "--config", config, *args]
    done = subprocess.run(command, cwd=Path(config).parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def _ranks(root: Path) -> list[dict]:
    return [json.loads((root / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _assert_ranks_agree(ranks: list[dict], steps: int, strategy: str) -> None:
    """Both ranks ran ``steps`` steps on different batches and logged identical (reduced) statistics."""
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["strategy"] for r in ranks] == [strategy, strategy]
    first, second = (r["steps"] for r in ranks)
    assert len(first) == len(second) == steps
    for a, b in zip(first, second, strict=True):
        assert a["global_step"] == b["global_step"]
        assert a["batch"] != b["batch"]  # each rank its own share of the data (DistributedSampler)
        assert a["metrics"].keys() == b["metrics"].keys() and a["metrics"]
        assert a["metrics"] == b["metrics"]  # reduced across ranks: bit-identical
        assert a.get("lambda") == b.get("lambda")


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, tiny_exports) -> dict[str, Path]:
    """Each stage's DDP run, launched on first use and shared by the tests of this module."""
    base = tmp_path_factory.mktemp("ddp")
    runs: dict[str, Path] = {}

    def run(stage: str) -> Path:
        if stage not in runs:
            root = base / stage
            _launch(_config(root, stage, tiny_exports), *DDP)
            runs[stage] = root
        return runs[stage]

    return run


# --- data parallel ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_runs_under_ddp(stage, ddp_runs, tiny_exports):
    root = ddp_runs(stage)
    ranks = _ranks(root)
    _assert_ranks_agree(ranks, steps=2, strategy="DDPStrategy")
    # The export is written once (rank 0), atomically: no staging folder left behind, and it loads.
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []
    loader = AutoModelForCausalLM if stage in ("sft", "policy") else AutoModelForSequenceClassification
    exported = loader.from_pretrained(root / "export")
    start = _weights(Path(tiny_exports["sft" if stage == "policy" else stage]))
    trained = _weights(root / "export")
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    assert exported.config.vocab_size == len(AutoTokenizer.from_pretrained(root / "export"))
    if stage == "policy":
        lambdas = [step["lambda"] for step in ranks[0]["steps"]]
        assert lambdas[0] != lambdas[1]  # the multiplier moved, in step on both ranks
        assert ranks[0]["lambda_history"] == ranks[1]["lambda_history"]


def test_reward_under_ddp_matches_one_process_on_the_same_global_batches(ddp_runs, tiny_exports, tmp_path):
    # DDP: 2 ranks x 4 pairs. The DistributedSampler gives rank r the positions r, r + 2, ... of one shuffled
    # permutation of the training rows (seeded by data.seed and the epoch, the same for any world size), so the
    # global batch k of the DDP run is positions 8k .. 8k + 7, exactly batch k of one process with 8 pairs. The
    # loss is a mean over pairs and DDP averages the two ranks' gradients, so plain SGD takes identical steps.
    ddp = ddp_runs("reward")
    single = _config(tmp_path / "single", "reward", tiny_exports)
    main(["fit", "--config", single, "--data.batch_size=8"])
    start = _weights(Path(tiny_exports["reward"]))
    one, two = _weights(tmp_path / "single" / "export"), _weights(ddp / "export")
    assert one.keys() == two.keys() == start.keys()
    moved = max((one[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-2  # a real training signal, far above the tolerance below
    for key in start:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)


# --- fully sharded (FSDP2) ----------------------------------------------------------------------------------


def test_policy_under_fsdp2_keeps_ranks_in_step_and_resumes_from_a_sharded_checkpoint(tmp_path, tiny_exports):
    checkpoints = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(tmp_path / "a" / "ckpt"), "filename": "{epoch}", "save_top_k": -1},
    }
    trainer = {
        "strategy": MODEL_PARALLEL,
        "devices": 2,
        "max_epochs": 3,
        "limit_train_batches": 1,  # one iteration per epoch: a checkpoint at every epoch boundary
        "enable_checkpointing": True,
    }
    config_a = _config(tmp_path / "a", "policy", tiny_exports, trainer=trainer)
    text = yaml.safe_load(Path(config_a).read_text())
    text["trainer"]["callbacks"].append(checkpoints)
    Path(config_a).write_text(yaml.safe_dump(text))
    _launch(config_a)

    ranks = _ranks(tmp_path / "a")
    _assert_ranks_agree(ranks, steps=3, strategy="ModelParallelStrategy")
    lambdas = [step["lambda"] for step in ranks[0]["steps"]]
    assert len(set(lambdas)) == 3  # the multiplier moved at every iteration, identically on both ranks

    # Sharded checkpoint: a folder with one shard file per rank and the Lightning metadata.
    ckpt = tmp_path / "a" / "ckpt" / "epoch=1.ckpt"
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2 and (ckpt / "meta.pt").is_file()

    # Resume after two iterations (with the frozen models replicated instead of sharded this time): the third
    # iteration reproduces the uninterrupted run's multiplier and actor.
    config_b = _config(
        tmp_path / "b", "policy", tiny_exports, trainer=trainer, model={"memory": {"sharding": {"frozen": "replicate"}}}
    )
    _launch(config_b, f"--ckpt_path={ckpt}")
    resumed = _ranks(tmp_path / "b")
    assert [s["iteration"] for s in resumed[0]["steps"]] == [3]
    assert resumed[0]["lambda_history"] == resumed[1]["lambda_history"] == ranks[0]["lambda_history"]
    assert resumed[0]["steps"][0]["lambda"] == lambdas[-1]

    # The consolidated export is a plain Hugging Face model: full (unsharded) tensors, loadable and usable.
    sft, uninterrupted, after_resume = (
        _weights(Path(tiny_exports["sft"])),
        _weights(tmp_path / "a" / "export"),
        _weights(tmp_path / "b" / "export"),
    )
    assert {k: v.shape for k, v in uninterrupted.items()} == {k: v.shape for k, v in sft.items()}
    assert any(not torch.equal(uninterrupted[k], sft[k]) for k in sft)
    for key in sft:
        torch.testing.assert_close(after_resume[key], uninterrupted[key], rtol=1e-5, atol=1e-6, msg=key)
    actor = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "export").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "a" / "export")
    ids = torch.tensor([[tokenizer.bos_token_id]])
    out = actor.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > 1


def test_policy_with_a_shared_critic_under_fsdp2_keeps_ranks_in_step(tmp_path, tiny_exports):
    trainer = {"strategy": MODEL_PARALLEL, "devices": 2}
    config = _config(tmp_path, "policy", tiny_exports, trainer=trainer, model={"critics": "shared"})
    _launch(config)
    ranks = _ranks(tmp_path)
    _assert_ranks_agree(ranks, steps=2, strategy="ModelParallelStrategy")
    assert {"train/value_loss_reward", "train/value_loss_cost"} <= ranks[0]["steps"][0]["metrics"].keys()


def test_cost_under_fsdp2_with_lora_checkpointing_and_bf16_exports_merged_weights(tmp_path, tiny_exports):
    pytest.importorskip("peft")
    memory = {
        "lora": {"rank": 4, "alpha": 8.0},
        "gradient_checkpointing": True,
        "sharding": {"compute_dtype": "bfloat16"},
    }
    trainer = {"strategy": MODEL_PARALLEL, "devices": 2, "gradient_clip_val": 1.0}
    _launch(_config(tmp_path, "cost", tiny_exports, trainer=trainer, model=memory))
    _assert_ranks_agree(_ranks(tmp_path), steps=2, strategy="ModelParallelStrategy")
    # The export merged the adapters: plain Hugging Face names and shapes, loadable without peft.
    start, merged = _weights(Path(tiny_exports["cost"])), _weights(tmp_path / "export")
    assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in start.items()}
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "export")
    changed = {k for k in start if not torch.equal(merged[k], start[k])}
    # Adapted: the linear layers of the blocks, and the score head; frozen: embeddings and norms.
    assert "score.weight" in changed and "model.layers.0.self_attn.q_proj.weight" in changed
    assert not any("embed_tokens" in k or "norm" in k for k in changed)
