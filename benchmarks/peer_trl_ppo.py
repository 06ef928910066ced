#!/usr/bin/env python3
"""CPU baseline of Hugging Face TRL's PPOTrainer (trl==0.24.0) on a synthetic RLHF workload.

Copied from ``shared/bench/peer_trl_ppo.py`` (issue 10's TRL baseline; its notes are ``shared/bench/peer_trl.md``)
for ``benchmarks/throughput.py``, which runs it in the TRL venv ``.bench-venv`` that ``make throughput`` builds.
Only changes: ruff formatting and ``zip(..., strict=False)``; what it runs and measures is the original's.

Fully offline: the tokenizer, the four GPT-2 models (policy, reference, reward, value) and the
prompt set are built here from a fixed seed, saved to local folders and loaded back. Nothing is
downloaded. Run it with the peer venv (see shared/bench/peer_trl.md), e.g.

    $PEER/venv/bin/python ../shared/bench/peer_trl_ppo.py            # workload W1 defaults

Timing: one PPO iteration = one `update` of PPOTrainer.train() (rollout of `--batch-size`
prompts x `--response-length` new tokens, scoring, GAE, `--ppo-epochs` x `--mini-batches`
optimizer steps). Iteration boundaries are taken from a TrainerCallback's on_step_end (called
once per update); the first `--warmup` iterations are discarded. Phase split (generation /
rollout scoring / PPO update / other) comes from thin timing wrappers around TRL's own
`batch_generation` and `forward` functions; they only call through. "rollout scoring" holds
the ref/value/reward forwards and one of TRL's two gc.collect() calls per iteration; "other"
holds the second gc.collect() and the next DataLoader batch.

Peer venv (see shared/bench/peer_trl.md for versions and timings):
    python3 -m venv $PEER/venv
    $PEER/venv/bin/pip install torch==2.13.0          # CPU wheel on this disk; install it FIRST
    $PEER/venv/bin/pip install trl==0.24.0 "transformers<5" accelerate

Prints one human-readable summary and, as the LAST line, one JSON object.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    w = p.add_argument_group("workload (defaults = W1)")
    w.add_argument("--n-embd", type=int, default=256)
    w.add_argument("--n-layer", type=int, default=4)
    w.add_argument("--n-head", type=int, default=4)
    w.add_argument("--vocab", type=int, default=4096, help="tokenizer (and model) vocabulary size, specials included")
    w.add_argument("--n-positions", type=int, default=128)
    w.add_argument("--num-prompts", type=int, default=512)
    w.add_argument("--prompt-len", type=int, default=16)
    w.add_argument(
        "--batch-size", type=int, default=32, help="rollouts per PPO iteration (per_device_train_batch_size)"
    )
    w.add_argument(
        "--response-length", type=int, default=32, help="max new tokens; no stop token, so always all of them"
    )
    w.add_argument("--ppo-epochs", type=int, default=4)
    w.add_argument("--mini-batches", type=int, default=4, help="num_mini_batches; minibatch = batch-size / this")
    w.add_argument("--temperature", type=float, default=1.0)
    w.add_argument("--kl-coef", type=float, default=0.05)
    w.add_argument("--lr", type=float, default=5e-5, help="TrainingArguments' default learning rate")
    w.add_argument(
        "--rollout-forward-batch-size",
        type=int,
        default=64,
        help="TRL local_rollout_forward_batch_size (its default 64; >= batch-size means one generate call)",
    )
    r = p.add_argument_group("run")
    r.add_argument("--iters", type=int, default=6, help="timed iterations")
    r.add_argument("--warmup", type=int, default=1, help="untimed warm-up iterations before them")
    r.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    r.add_argument("--seed", type=int, default=1234)
    r.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 autocast as TRL's OnPolicyConfig defaults to (bf16=None -> True); default here: fp32",
    )
    r.add_argument(
        "--workdir",
        default=os.path.join(os.environ.get("PEER", tempfile.gettempdir() + "/peer"), "work"),
        help="where the tokenizer/models are saved and loaded from",
    )
    r.add_argument("--verbose", action="store_true", help="print per-iteration times and TRL metrics")
    return p.parse_args(argv)


ARGS = parse_args()

# ---- environment: offline, quiet, CPU, fixed threads (before torch/transformers import) ----
for k, v in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HOME": os.path.join(os.environ.get("PEER", tempfile.gettempdir() + "/peer"), "hf"),
    "TRANSFORMERS_VERBOSITY": "error",
    "TRL_EXPERIMENTAL_SILENCE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "CUDA_VISIBLE_DEVICES": "",
    "WANDB_DISABLED": "true",
    "OMP_NUM_THREADS": str(ARGS.threads),
    "MKL_NUM_THREADS": str(ARGS.threads),
}.items():
    os.environ.setdefault(k, v)

import copy  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(ARGS.threads)

import accelerate  # noqa: E402
import datasets  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
import trl.trainer.ppo_trainer as ppo_mod  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    PreTrainedTokenizerFast,
    TrainerCallback,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback  # noqa: E402
from trl import PPOConfig, PPOTrainer  # noqa: E402

transformers.logging.set_verbosity_error()
datasets.disable_progress_bars()

PAD, EOS, UNK = "[PAD]", "[EOS]", "[UNK]"


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_tokenizer(vocab_size: int, out_dir: str) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: ids 0..2 are [PAD], [EOS], [UNK]; the rest are words w3..w{V-1}."""
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for i in range(3, vocab_size):
        vocab[f"w{i}"] = i
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )
    fast.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def build_models(a, tok, root: str):
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=a.n_positions,
        n_embd=a.n_embd,
        n_layer=a.n_layer,
        n_head=a.n_head,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    pol_dir, rm_dir = os.path.join(root, "policy"), os.path.join(root, "reward")
    seed_all(a.seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(pol_dir)
    seed_all(a.seed + 1)
    rm_cfg = copy.deepcopy(cfg)
    rm_cfg.num_labels = 1  # from_config() takes no num_labels kwarg (transformers 4.57); set it on the config
    AutoModelForSequenceClassification.from_config(rm_cfg).save_pretrained(rm_dir)
    # as TRL's examples/scripts/ppo/ppo.py: ref from the SFT (policy) path, value model from the reward path
    policy = AutoModelForCausalLM.from_pretrained(pol_dir)
    ref = AutoModelForCausalLM.from_pretrained(pol_dir)
    reward = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1)
    for m in (policy, ref, reward, value):
        m.config.pad_token_id = tok.pad_token_id
    return policy, ref, reward, value


def build_dataset(a, tok) -> Dataset:
    rng = np.random.default_rng(a.seed)
    words = rng.integers(3, len(tok), size=(a.num_prompts, a.prompt_len))  # never a special token
    texts = [" ".join(f"w{i}" for i in row) for row in words]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert all(len(x) == a.prompt_len for x in ids), "prompt tokenisation is not 1 word = 1 token"
    assert all(tok.pad_token_id not in x for x in ids)
    return Dataset.from_dict({"input_ids": ids})


class IterTimer(TrainerCallback):
    """Records a timestamp at train begin and at the end of each PPO update (on_step_end)."""

    def __init__(self):
        self.t = []
        self.metrics = []

    def on_train_begin(self, args, state, control, **kw):
        self.t.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kw):
        self.t.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kw):
        self.metrics.append(dict(logs or {}))


PH = {"gen": [], "train_start": []}


def _wrap_phases():
    orig_bg, orig_fwd = ppo_mod.batch_generation, ppo_mod.forward

    def batch_generation(*x, **k):
        t0 = time.perf_counter()
        out = orig_bg(*x, **k)
        PH["gen"].append((t0, time.perf_counter(), tuple(out[0].shape)))
        return out

    def forward(*x, **k):
        if torch.is_grad_enabled():  # the PPO update's policy+value forward (rollout forwards run under no_grad)
            n = len(PH["gen"])
            if len(PH["train_start"]) < n:
                PH["train_start"].append(time.perf_counter())
        return orig_fwd(*x, **k)

    ppo_mod.batch_generation = batch_generation
    ppo_mod.forward = forward


def main(a) -> dict:
    assert a.batch_size % a.mini_batches == 0
    os.makedirs(a.workdir, exist_ok=True)
    seed_all(a.seed)
    tok = build_tokenizer(a.vocab, os.path.join(a.workdir, "tokenizer"))
    policy, ref, reward, value = build_models(a, tok, a.workdir)
    train_ds = build_dataset(a, tok)
    n_iter = a.warmup + a.iters

    cfg = PPOConfig(
        output_dir=os.path.join(a.workdir, "out"),
        per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=1,
        num_mini_batches=a.mini_batches,
        num_ppo_epochs=a.ppo_epochs,
        total_episodes=n_iter * a.batch_size,
        response_length=a.response_length,
        temperature=a.temperature,
        stop_token=None,
        stop_token_id=None,
        kl_coef=a.kl_coef,
        learning_rate=a.lr,
        local_rollout_forward_batch_size=a.rollout_forward_batch_size,
        num_sample_generations=0,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        bf16=a.bf16,
        fp16=False,
        gradient_checkpointing=False,
        seed=a.seed,
        data_seed=a.seed,
        dataloader_num_workers=0,
    )
    trainer = PPOTrainer(
        args=cfg,
        processing_class=tok,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        value_model=value,
        train_dataset=train_ds,
        eval_dataset=None,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    timer = IterTimer()
    trainer.add_callback(timer)
    _wrap_phases()
    # PPOTrainer builds its own Accelerator; make sure nothing else crept in
    assert trainer.accelerator.device.type == "cpu", trainer.accelerator.device
    assert not trainer.policy_model.is_gradient_checkpointing

    t_start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t_start

    it = [b - a_ for a_, b in zip(timer.t[:-1], timer.t[1:], strict=False)]
    assert len(it) == n_iter, (len(it), n_iter)
    gen = [e - s for s, e, _ in PH["gen"]]
    gen_shape = PH["gen"][0][2]
    assert gen_shape == (a.batch_size, a.prompt_len + a.response_length), gen_shape
    score = [ts - e for (s, e, _), ts in zip(PH["gen"], PH["train_start"], strict=False)]
    upd = [t1 - ts for ts, t1 in zip(PH["train_start"], timer.t[1:], strict=False)]
    # what falls between on_step_end and the next generate call: TRL's end-of-iteration gc.collect(),
    # empty_cache(), the next DataLoader batch (and, for the first iteration, nothing before on_train_begin)
    other = [x - g - sc - u for x, g, sc, u in zip(it, gen, score, upd, strict=False)]
    timed = slice(a.warmup, None)
    med = statistics.median(it[timed])
    tok_per_iter = a.batch_size * a.response_length
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    n_params = {
        k: sum(p.numel() for p in m.parameters())
        for k, m in (("policy", policy), ("ref", ref), ("reward", reward), ("value", value))
    }
    opt = trainer.optimizer
    opt_inner = getattr(opt, "optimizer", opt)
    last = timer.metrics[-1] if timer.metrics else {}

    res = {
        "peer": "trl.PPOTrainer",
        "workload": {
            "n_embd": a.n_embd,
            "n_layer": a.n_layer,
            "n_head": a.n_head,
            "vocab": len(tok),
            "n_positions": a.n_positions,
            "num_prompts": a.num_prompts,
            "prompt_len": a.prompt_len,
            "batch_size": a.batch_size,
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
        "sec_per_iter_median": round(med, 4),
        "sec_per_iter_min": round(min(it[timed]), 4),
        "sec_per_iter_max": round(max(it[timed]), 4),
        "gen_tokens_per_sec": round(tok_per_iter / med, 1),
        "phase_sec_median": {
            "generate": round(statistics.median(gen[timed]), 4),
            "rollout_scoring": round(statistics.median(score[timed]), 4),
            "ppo_update": round(statistics.median(upd[timed]), 4),
            "other": round(statistics.median(other[timed]), 4),
        },
        "warmup_iter_sec": [round(x, 4) for x in it[: a.warmup]],
        "iter_sec": [round(x, 4) for x in it[timed]],
        "train_wall_sec": round(wall, 3),
        "peak_rss_mib": round(rss_mib, 1),
        "params": n_params,
        "optimizer": f"{type(opt_inner).__name__}(fused={opt_inner.defaults.get('fused')})",
        "last_metrics": {
            k: (round(v, 5) if isinstance(v, float) else v)
            for k, v in last.items()
            if k
            in (
                "objective/kl",
                "objective/scores",
                "policy/approxkl_avg",
                "loss/policy_avg",
                "loss/value_avg",
                "val/ratio",
                "val/num_eos_tokens",
            )
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "accelerate": accelerate.__version__,
            "tokenizers": tokenizers.__version__,
            "datasets": datasets.__version__,
            "numpy": np.__version__,
        },
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    if a.verbose:
        for i, (x, m) in enumerate(zip(it, timer.metrics, strict=False)):
            tag = "warmup" if i < a.warmup else "timed"
            print(
                f"iter {i} [{tag}] {x:.3f}s gen={gen[i]:.3f}s score={score[i]:.3f}s update={upd[i]:.3f}s "
                f"kl={m.get('objective/kl', float('nan')):.4f} score={m.get('objective/scores', float('nan')):.4f}"
            )
    print(
        f"TRL {trl.__version__} PPOTrainer, CPU x{torch.get_num_threads()} threads, "
        f"{'bf16' if a.bf16 else 'fp32'}, {a.iters} timed iters after {a.warmup} warm-up"
    )
    print(
        f"sec/iter median {med:.3f} (min {min(it[timed]):.3f}, max {max(it[timed]):.3f}); "
        f"generated tokens/s {tok_per_iter / med:.1f}; peak RSS {rss_mib:.0f} MiB"
    )
    print(
        f"phases (median s): generate {res['phase_sec_median']['generate']}, "
        f"rollout scoring {res['phase_sec_median']['rollout_scoring']}, "
        f"ppo update {res['phase_sec_median']['ppo_update']}, other {res['phase_sec_median']['other']}"
    )
    print(json.dumps(res, sort_keys=False))
    return res


if __name__ == "__main__":
    main(ARGS)
    sys.stdout.flush()
