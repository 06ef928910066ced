"""GPU smoke run: the reward stage and the RePO policy stage under FSDP2 (``ModelParallelStrategy``) in bf16.

Builds a ~0.6B Llama from a config (no download; SafetyWorld data and its word-level tokenizer), saves it as the
SFT, reward and cost "exports", then runs a few reward-model steps and a few RePO iterations through the project's
CLI (``repo_lightning.cli.main``) on one device, and prints one JSON line: tokens/s of generation and training and
the peak GPU memory of each stage. On one H100 it takes a few minutes.

    python benchmarks/gpu_smoke.py                 # one GPU
    python benchmarks/gpu_smoke.py --tiny          # a tiny model on the CPU (what the test runs)

Generation and training times are measured by wrapping ``rollout.sample_responses`` and ``ppo_update``
(benchmark instrumentation only); the first step of each stage is left out as warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from lightning.pytorch.callbacks import Callback

import repo_lightning.modules.policy as policy_module
import repo_lightning.modules.rollout as rollout_module
from repo_lightning.cli import main
from repo_lightning.models.backbone import load_causal_lm, load_score_model
from repo_lightning.safetyworld import World, WorldConfig

#: ~0.6B parameters: 24 blocks of hidden size 1536 (head dim 128, grouped-query attention with 4 kv heads).
MODEL = {
    "model_type": "llama",
    "hidden_size": 1536,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
TINY_MODEL = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}
WORLD = {"num_topics": 24, "num_sft_rows": 64, "num_preference_rows": 1024, "num_rl_prompts": 256}
TINY_WORLD = {"num_topics": 6, "num_sft_rows": 64, "num_preference_rows": 64, "num_rl_prompts": 32}


class _Timer:
    """Seconds and token counts of the calls after the first (warm-up) one."""

    def __init__(self) -> None:
        self.calls, self.seconds, self.tokens = 0, 0.0, 0

    def add(self, seconds: float, tokens: int) -> None:
        self.calls += 1
        if self.calls > 1:
            self.seconds += seconds
            self.tokens += tokens

    def rate(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class _StepTimer(Callback):
    """Times training batches (tokens: the batch's attention mask)."""

    def __init__(self, device: str) -> None:
        self.device, self.timer, self.start = device, _Timer(), 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        _sync(self.device)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        _sync(self.device)
        self.timer.add(time.perf_counter() - self.start, int(batch.attention_mask.sum()))


def _instrument_policy(device: str) -> dict[str, _Timer]:
    timers = {"generation": _Timer(), "training": _Timer()}
    sample, update = rollout_module.sample_responses, policy_module.ppo_update

    def timed_sample(*args, **kwargs):
        _sync(device)
        start = time.perf_counter()
        samples = sample(*args, **kwargs)  # (sequences, attention_mask, response_mask, logprobs)
        _sync(device)
        timers["generation"].add(time.perf_counter() - start, int(samples[2].sum()))
        return samples

    def timed_update(models, rollout, targets, config, *args, **kwargs):
        _sync(device)
        start = time.perf_counter()
        stats = update(models, rollout, targets, config, *args, **kwargs)
        _sync(device)
        tokens = int(rollout.attention_mask.sum()) * config.ppo_epochs
        timers["training"].add(time.perf_counter() - start, tokens)
        return stats

    rollout_module.sample_responses, policy_module.ppo_update = timed_sample, timed_update
    return timers


def _peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _build_models(root: Path, world: WorldConfig, model: dict, dtype: str) -> tuple[str, int]:
    """Save a fresh causal LM (the SFT export) and two score models; returns the tokenizer folder and size."""
    tokenizer = World(world).build_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    lm = load_causal_lm(tokenizer, model_config=dict(model), dtype=dtype)
    size = sum(p.numel() for p in lm.parameters())
    lm.save_pretrained(root / "sft")
    del lm
    for seed, name in ((1, "reward"), (2, "cost")):
        torch.manual_seed(seed)
        load_score_model(tokenizer, model_config=dict(model), dtype=dtype).save_pretrained(root / name)
    for name in ("sft", "reward", "cost"):
        tokenizer.save_pretrained(root / name)
    return str(root / "tokenizer"), size


def _trainer(args, root: Path, stage: str, steps: int) -> dict:
    return {
        "accelerator": args.accelerator,
        "devices": 1,
        "strategy": {
            "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
            "init_args": {"data_parallel_size": 1, "tensor_parallel_size": 1},
        },
        "precision": "bf16-true" if args.dtype == "bfloat16" else "32-true",
        "max_steps": steps,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False,
        "default_root_dir": str(root / stage),
    }


def _run(config: dict, root: Path, stage: str, callbacks: list[Callback]):
    path = root / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = main(["--config", str(path)], run=False)
    cli.trainer.callbacks.extend(callbacks)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def run(args) -> dict:
    """Build the models, run both stages, return the measurements."""
    device = "cuda" if args.accelerator == "gpu" else "cpu"
    root = Path(args.out or tempfile.mkdtemp(prefix="gpu_smoke-"))
    root.mkdir(parents=True, exist_ok=True)
    world = WorldConfig(**(TINY_WORLD if args.tiny else WORLD))
    data = {
        "dataset": "safetyworld",
        "world": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(world).items()},
        "cache_dir": str(root / "cache"),
        "max_prompt_length": 64,
        "max_length": 128,
        "val_fraction": 0.0,
    }
    started = time.perf_counter()
    tokenizer, size = _build_models(root / "models", world, TINY_MODEL if args.tiny else MODEL, args.dtype)
    data["tokenizer"] = tokenizer
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "model_parameters": size,
        "dtype": args.dtype,
        "strategy": "ModelParallelStrategy (FSDP2 fully_shard per block)",
    }

    _reset_peak(device)
    timer = _StepTimer(device)
    reward = {
        "seed_everything": 0,
        "trainer": _trainer(args, root, "reward", args.steps),
        "model": {
            "class_path": "repo_lightning.modules.RewardModule",
            "init_args": {
                "model_name_or_path": str(root / "models" / "sft"),
                "dtype": args.dtype,
                "gradient_checkpointing": not args.tiny,
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-5}},
            },
        },
        "data": {**data, "mode": "preference", "batch_size": args.batch_size},
    }
    _run(reward, root, "reward", [timer])
    result["reward"] = {
        "train_tokens_per_s": timer.timer.rate(),
        "step_s": timer.timer.seconds / max(1, timer.timer.calls - 1),
        "peak_memory_gib": _peak_gib(device),
    }

    _reset_peak(device)
    timers = _instrument_policy(device)
    step = _StepTimer(device)
    policy = {
        "seed_everything": 0,
        "trainer": _trainer(args, root, "policy", args.steps),
        "model": {
            "class_path": "repo_lightning.modules.PolicyModule",
            "init_args": {
                "actor_path": str(root / "models" / "sft"),
                "reward_model_path": str(root / "models" / "reward"),
                "cost_model_path": str(root / "models" / "cost"),
                "objective": {"class_path": "repo_lightning.objectives.RePO"},
                "sampling": {"samples_per_prompt": 4, "max_new_tokens": args.max_new_tokens},
                # one optimizer step per iteration: max_steps = iterations
                "update": {"minibatch_size": 4 * args.batch_size},
                "memory": {"dtype": args.dtype, "gradient_checkpointing": not args.tiny},
            },
        },
        "data": {**data, "mode": "prompts", "batch_size": args.batch_size},
    }
    cli = _run(policy, root, "policy", [step])
    result["policy"] = {
        "generation_tokens_per_s": timers["generation"].rate(),
        "train_tokens_per_s": timers["training"].rate(),
        "iteration_s": step.timer.seconds / max(1, step.timer.calls - 1),
        "peak_memory_gib": _peak_gib(device),
        "lagrange_multiplier": float(cli.model.dual.value[0]),
    }
    result["total_s"] = time.perf_counter() - started
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (for tests)")
    parser.add_argument("--steps", type=int, default=None, help="steps of each stage (default 6; 2 with --tiny)")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs / prompts per step (default 16; 2)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="response length (default 128; 6)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--out", default=None, help="working folder (default: a new temporary folder)")
    args = parser.parse_args(argv)
    args.accelerator = "cpu" if args.tiny else "gpu"
    args.steps = args.steps or (2 if args.tiny else 6)
    args.batch_size = args.batch_size or (2 if args.tiny else 16)
    args.max_new_tokens = args.max_new_tokens or (6 if args.tiny else 128)
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --tiny for the CPU path")
    return args


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    arguments = parse_args()
    sys.argv = sys.argv[:1]  # the stages are configured through main([...]) alone
    print(json.dumps(run(arguments), sort_keys=True))
