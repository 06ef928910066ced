#!/usr/bin/env python3
"""This project's ``PolicyModule`` on a PPO workload, like-for-like with ``peer_trl_ppo.py`` beside it (TRL 0.24).

Derived from ``shared/bench/perf_w1_project.py`` (the script behind issue 10's first table): the same offline
tokenizer (word level), GPT-2 policy / reward (/ cost) models built from the same seeds, random one-word-per-token
prompts, and ``python -m repo_lightning fit`` run in-process. Changes against that script: the workload is
parameterised with the peer script's flag names (so ``throughput.py`` passes one flag set to both), the phase
split is the peer's (generate / rollout scoring / PPO update / other), the timer callback is importable under any
``__main__`` (cProfile), and ``--profile`` profiles the timed iterations only.

Settings that make it like-for-like with TRL (see docs/performance.md): ``samples_per_prompt: 1``, exactly
``--response-length`` new tokens at T=1 (top_k 0, top_p 1), ``kl_coef`` in the reward (k1), GAE gamma 1 /
lambda 0.95, whitened advantages, no reward whitening, no score clip, no missing-eos penalty, ratio clip 0.2,
value clip 0.2, value coef 0.1, ``ppo_epochs`` x minibatches of ``batch / mini_batches``, no gradient clipping,
``torch.set_num_threads(--threads)``; and, where this project's defaults differ from what TRL runs: dropout 0 in
the saved models (TRL's ``PPOTrainer`` calls ``disable_dropout_in_model`` on all four; ``--dropout 0.1`` is GPT-2's
default that our module would train with) and ``AdamW(weight_decay=0)`` with ``update.fused_optimizer: true`` (so
``fused=True``) at one lr for actor and critic (TRL's ``adamw_torch_fused``; ``--optimizer adamw`` is the module's
default, unfused, weight decay 0.01); and the old log-probs read from the sampling logits
(``sampling.logprobs_from_generation: true``, as TRL does; ``--old-logprobs forward`` is the module's default, one
more no-grad actor forward pass).

Phases (median over the timed iterations): ``generate`` = ``rollout.sample_responses`` (with ``--old-logprobs
generation`` this includes reading the old log-probs off the sampling logits, which TRL counts in its scoring);
``rollout_scoring`` = the rest of ``collect_rollout`` (the old log-probs' actor forward with ``--old-logprobs
forward``, reference, reward / cost, critic values, decoding); ``ppo_update`` = ``ppo_update``; ``other`` = the
iteration minus those (advantages, dual update, logging, Lightning's loop).

Last stdout line: one JSON object with the keys of ``peer_trl_ppo.py``'s.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# This checkout's repo_lightning, not whichever one the venv has installed in editable mode.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    w = p.add_argument_group("workload (defaults = W1; flag names as peer_trl_ppo.py)")
    w.add_argument("--n-embd", type=int, default=256)
    w.add_argument("--n-layer", type=int, default=4)
    w.add_argument("--n-head", type=int, default=4)
    w.add_argument("--vocab", type=int, default=4096)
    w.add_argument("--n-positions", type=int, default=128)
    w.add_argument("--num-prompts", type=int, default=512)
    w.add_argument("--prompt-len", type=int, default=16)
    w.add_argument("--batch-size", type=int, default=32)
    w.add_argument("--response-length", type=int, default=32)
    w.add_argument("--ppo-epochs", type=int, default=4)
    w.add_argument("--mini-batches", type=int, default=4)
    w.add_argument("--temperature", type=float, default=1.0)
    w.add_argument("--kl-coef", type=float, default=0.05)
    w.add_argument("--lr", type=float, default=5e-5)
    r = p.add_argument_group("run")
    r.add_argument("--algorithm", default="ppo", choices=["ppo", "ppo_lag", "repo"])
    r.add_argument(
        "--estimator",
        default="gae",
        choices=["gae", "rloo", "grpo", "reinforce_pp"],
        help="advantage estimator; rloo / grpo load no critics (need --samples-per-prompt >= 2)",
    )
    r.add_argument(
        "--critics",
        default="separate",
        choices=["separate", "shared"],
        help="with a cost and gae: a reward and a cost critic (separate) or one backbone with two heads (shared)",
    )
    r.add_argument(
        "--samples-per-prompt",
        type=int,
        default=1,
        help="k responses per prompt; the prompt batch is divided by k so the rollout size stays --batch-size",
    )
    r.add_argument("--iters", type=int, default=6)
    r.add_argument("--warmup", type=int, default=1)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--seed", type=int, default=1234)
    r.add_argument("--bf16", action="store_true", help="trainer precision bf16-mixed (CPU autocast)")
    r.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="GPT-2 resid/embd/attn dropout of the saved models (TRL's PPOTrainer switches dropout off: 0)",
    )
    r.add_argument(
        "--optimizer",
        choices=["adamw_fused", "adamw"],
        default="adamw_fused",
        help="adamw_fused: AdamW(weight_decay=0), update.fused_optimizer (TRL's adamw_torch_fused); adamw: default",
    )
    r.add_argument(
        "--old-logprobs",
        choices=["generation", "forward"],
        default="generation",
        help="generation: sampling.logprobs_from_generation (from the sampling logits, as TRL); forward: the "
        "module default, one more no-grad actor forward pass",
    )
    r.add_argument(
        "--attn-implementation",
        default=None,
        help="model.attn_implementation (sdpa, eager); default: the library's (sdpa)",
    )
    r.add_argument("--profile", choices=["cprofile", "torch"], default=None, help="profile the timed iterations")
    r.add_argument("--profile-out", default=None, help="profile output path (.prof / .json trace)")
    r.add_argument("--workdir", default=None)
    r.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    os.environ.setdefault("OMP_NUM_THREADS", str(ARGS.threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(ARGS.threads))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    PreTrainedTokenizerFast,
)

PAD, EOS, UNK = "[PAD]", "[EOS]", "[UNK]"
TIMES: list[float] = []
PHASES: dict[str, list[float]] = {"rollout": [], "generate": [], "update": []}
PROFILE: dict = {}
# The CLI imports the callback by class path; under ``python -m cProfile`` ``__main__`` is cProfile, so the
# callback is registered under a fixed module name.
sys.modules.setdefault("perf_project", sys.modules[__name__])


class IterTimer(Callback):
    """Times each training_step (one iteration); starts the profiler after the warm-up iterations."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if PROFILE.get("start_at") == batch_idx:
            PROFILE["profiler"].__enter__() if PROFILE["kind"] == "torch" else PROFILE["profiler"].enable()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        TIMES.append(time.perf_counter() - self._t)


def _wrap(mod, name, key):
    fn = getattr(mod, name)

    def inner(*a, **k):
        t = time.perf_counter()
        out = fn(*a, **k)
        PHASES[key].append(time.perf_counter() - t)
        return out

    setattr(mod, name, inner)


def build(root: str, a) -> None:
    """Tokenizer, policy, reward and cost models and prompts, as peer_trl_ppo.py builds them."""
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for i in range(3, a.vocab):
        vocab[f"w{i}"] = i
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left")
    cfg = GPT2Config(
        vocab_size=a.vocab,
        n_positions=a.n_positions,
        n_embd=a.n_embd,
        n_layer=a.n_layer,
        n_head=a.n_head,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
        resid_pdrop=a.dropout,
        embd_pdrop=a.dropout,
        attn_pdrop=a.dropout,
    )
    torch.manual_seed(a.seed)
    pol = os.path.join(root, "policy")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(pol)
    tok.save_pretrained(pol)
    for j, name in enumerate(("reward", "cost")):
        torch.manual_seed(a.seed + 1 + j)
        c = copy.deepcopy(cfg)
        c.num_labels = 1
        d = os.path.join(root, name)
        AutoModelForSequenceClassification.from_config(c).save_pretrained(d)
        tok.save_pretrained(d)
    rng = np.random.default_rng(a.seed)
    words = rng.integers(3, a.vocab, size=(a.num_prompts, a.prompt_len))
    with open(os.path.join(root, "prompts.jsonl"), "w") as f:
        for row in words:
            f.write(json.dumps({"prompt": " ".join(f"w{i}" for i in row)}) + "\n")


def config(root: str, a) -> str:
    """The fit config of the workload (the like-for-like settings of the module docstring)."""
    n_iter = a.warmup + a.iters
    objectives = {"ppo": "PPO", "ppo_lag": "PPOLagrangian", "repo": "RePO"}
    model = {
        "actor_path": f"{root}/policy",
        "reward_model_path": f"{root}/reward",
        "objective": {"class_path": f"repo_lightning.objectives.{objectives[a.algorithm]}"},
        "estimation": {
            "estimator": a.estimator,
            "kl_coef": a.kl_coef,
            "missing_eos_penalty": None,
            "score_clip": None,
            "gamma": 1.0,
            "gae_lambda": 0.95,
            "whiten_advantages": True,
        },
        "sampling": {
            "samples_per_prompt": a.samples_per_prompt,
            "max_new_tokens": a.response_length,
            "temperature": a.temperature,
            "top_p": 1.0,
            "top_k": 0,
            "logprobs_from_generation": a.old_logprobs == "generation",
        },
        "update": {
            "clip_ratio": 0.2,
            "value_clip": 0.2,
            "value_loss_coef": 0.1,
            "ppo_epochs": a.ppo_epochs,
            "minibatch_size": a.batch_size // a.mini_batches,
            "actor_lr": a.lr,
            "critic_lr": a.lr,
            "max_grad_norm": None,
        },
        "export_dir": None,
        "seed": a.seed,
    }
    if a.attn_implementation:
        model["memory"] = {"attn_implementation": a.attn_implementation}
    if a.optimizer == "adamw_fused":
        model["optimizer"] = {"class_path": "torch.optim.AdamW", "init_args": {"weight_decay": 0.0}}
        model["update"]["fused_optimizer"] = True
    if a.algorithm != "ppo":
        model["cost_model_path"] = f"{root}/cost"
        model["critics"] = a.critics
    cfgd = {
        "seed_everything": a.seed,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 1,
            "limit_train_batches": n_iter,
            "log_every_n_steps": 1,
            "limit_val_batches": 0,
            "enable_checkpointing": False,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "precision": "bf16-mixed" if a.bf16 else "32-true",
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": f"{root}/logs", "name": "bench"},
            },
            "callbacks": [{"class_path": "perf_project.IterTimer"}],
        },
        "model": {"class_path": "repo_lightning.modules.PolicyModule", "init_args": model},
        "data": {
            "mode": "prompts",
            "dataset": f"{root}/prompts.jsonl",
            "tokenizer": f"{root}/policy",
            "template": "{prompt}",
            "max_prompt_length": a.prompt_len + 1,
            "max_length": a.prompt_len + a.response_length + 1,
            "batch_size": a.batch_size // a.samples_per_prompt,  # prompts: the rollout holds batch_size samples
            "val_fraction": 0.0,
        },
    }
    path = os.path.join(root, "bench.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfgd, f)
    return path


def _install_profiler(a) -> None:
    if a.profile is None:
        return
    if a.profile == "cprofile":
        import cProfile

        PROFILE["profiler"] = cProfile.Profile()
    else:
        PROFILE["profiler"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    PROFILE["kind"] = a.profile
    PROFILE["start_at"] = a.warmup


def _finish_profiler(a) -> None:
    if a.profile is None:
        return
    out = a.profile_out or os.path.join(tempfile.gettempdir(), f"perf_project.{a.profile}")
    prof = PROFILE["profiler"]
    if a.profile == "cprofile":
        prof.disable()
        prof.dump_stats(out)
    else:
        prof.__exit__(None, None, None)
        with open(out, "w") as f:
            f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=60))
    print(f"profile written to {out}", file=sys.stderr)


def main(a) -> dict:
    assert a.batch_size % a.mini_batches == 0
    torch.set_num_threads(a.threads)
    root = a.workdir or tempfile.mkdtemp(prefix="perfproj-")
    os.makedirs(root, exist_ok=True)
    build(root, a)
    path = config(root, a)
    import repo_lightning
    import repo_lightning.modules.policy as pol
    import repo_lightning.modules.rollout as rollout_mod
    from repo_lightning.cli import main as cli_main

    # The names policy.py calls (it imports them into its namespace) and the one collect_rollout calls.
    _wrap(pol, "collect_rollout", "rollout")
    _wrap(rollout_mod, "sample_responses", "generate")
    _wrap(pol, "ppo_update", "update")
    _install_profiler(a)
    t0 = time.perf_counter()
    cli_main(["fit", "--config", path])
    wall = time.perf_counter() - t0
    _finish_profiler(a)
    n_iter = a.warmup + a.iters
    assert len(TIMES) == n_iter, (len(TIMES), n_iter)
    timed = slice(a.warmup, None)
    it = TIMES[timed]
    gen = PHASES["generate"][:n_iter]  # validation is off, so every call belongs to a training iteration
    score = [r - g for r, g in zip(PHASES["rollout"], gen, strict=True)]
    upd = PHASES["update"]
    other = [x - r - u for x, r, u in zip(TIMES, PHASES["rollout"], upd, strict=True)]
    med = statistics.median(it)
    tok_per_iter = a.batch_size * a.response_length
    out = {
        "peer": f"repo_lightning.PolicyModule[{a.algorithm}]",
        "workload": {
            "n_embd": a.n_embd,
            "n_layer": a.n_layer,
            "n_head": a.n_head,
            "vocab": a.vocab,
            "n_positions": a.n_positions,
            "num_prompts": a.num_prompts,
            "prompt_len": a.prompt_len,
            "batch_size": a.batch_size // a.samples_per_prompt,  # prompts: the rollout holds batch_size samples
            "response_length": a.response_length,
            "ppo_epochs": a.ppo_epochs,
            "mini_batches": a.mini_batches,
            "mini_batch_size": a.batch_size // a.mini_batches,
            "optimizer_steps_per_iter": a.ppo_epochs * a.mini_batches,
            "temperature": a.temperature,
            "kl_coef": a.kl_coef,
            "lr": a.lr,
            "bf16": a.bf16,
            "threads": a.threads,
            "seed": a.seed,
            "warmup_iters": a.warmup,
            "timed_iters": a.iters,
        },
        "algorithm": a.algorithm,
        "estimator": a.estimator,
        "critics": a.critics,
        "samples_per_prompt": a.samples_per_prompt,
        "dropout": a.dropout,
        "optimizer": a.optimizer,
        "old_logprobs": a.old_logprobs,
        "sec_per_iter_median": round(med, 4),
        "sec_per_iter_min": round(min(it), 4),
        "sec_per_iter_max": round(max(it), 4),
        "gen_tokens_per_sec": round(tok_per_iter / med, 1),
        "phase_sec_median": {
            "generate": round(statistics.median(gen[timed]), 4),
            "rollout_scoring": round(statistics.median(score[timed]), 4),
            "ppo_update": round(statistics.median(upd[timed]), 4),
            "other": round(statistics.median(other[timed]), 4),
        },
        "warmup_iter_sec": [round(x, 4) for x in TIMES[: a.warmup]],
        "iter_sec": [round(x, 4) for x in it],
        "train_wall_sec": round(wall, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "lightning": __import__("lightning").__version__,
            "repo_lightning": os.path.dirname(repo_lightning.__file__),
        },
        "torch_threads": torch.get_num_threads(),
    }
    if a.verbose:
        for i, x in enumerate(TIMES):
            print(
                f"iter {i} {x:.3f}s gen={gen[i]:.3f}s score={score[i]:.3f}s update={upd[i]:.3f}s other={other[i]:.3f}s"
            )
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(ARGS)
    sys.stdout.flush()
