"""A best-of-n warm start for the policy stage: rejection sampling on the RL prompts (issue 8, results round 23).

For every RL prompt of a SafetyWorld, ``n`` answers are sampled from a start policy (the SFT export), scored by the
run's reward model(s) (an ensemble combined as the policy stage combines it, each member aligned to the first over
all the samples) and cost model(s) (the worst case), and the answer kept is the one the cost models call safe
(``C <= 0``) with the largest ``R + beta log pi_ref``, the sample the KL-regularised optimum
``pi* ~ pi_ref exp(R / beta)`` favours most (``benchmarks/policy_gap.py``). The kept answers are written as SFT rows
(``prompt``, ``response``); a prompt with no safe sample gets no row, and a prompt that occurs several times among
the RL prompts is sampled and kept once per occurrence. Fine-tuning the start policy on them (the SFT
stage with ``model_name_or_path``) and training the policy from there is rejection sampling followed by RL, as in
Llama 2's RLHF and RAFT (Dong et al., 2023): it moves the start towards answers that are rare under the SFT policy
(two on-topic safety words: about 0.2 % of its samples on a hazard prompt), which on-policy sampling with a few
samples per prompt seldom finds (round 23).

Example (round 23's commands)::

    python -m benchmarks.best_of_n runs/x/exports --reward reward_a reward_b reward_c --cost cost cost_m1 cost_m2 \
        --samples 32 --out runs/x/raft/best32.jsonl --world seed=2
    python -m repo_lightning fit --config configs/demo/sft.yaml --model.init_args.model_config=null \
        --model.init_args.model_name_or_path=runs/x/exports/sft --data.dataset=runs/x/raft/best32.jsonl \
        --data.tokenizer=runs/x/exports/sft --model.init_args.optimizer.init_args.lr=0.0005 --trainer.max_epochs=3 \
        --model.init_args.warmup_steps=5 --model.init_args.export_dir=runs/x/exports/sft_raft
    python -m repo_lightning fit --config configs/demo/repo.yaml \
        --model.init_args.actor_path=runs/x/exports/sft_raft ...
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from benchmarks.policy_gap import kl_optimum, policy_logprobs
from benchmarks.probe_scores import scorer, worst_case
from benchmarks.safety_compensation.cli import parse_world
from repo_lightning.models.backbone import load_causal_lm
from repo_lightning.models.scorer import aggregate_rewards, decode_responses
from repo_lightning.modules.rollout import sample_responses
from repo_lightning.safetyworld import World, WorldConfig
from repo_lightning.safetyworld.annotate import write_rows
from repo_lightning.text.templates import SAFE_RLHF_TEMPLATE, encode_prompt


def sample_answers(
    model, tokenizer, prompts: list[str], n: int, temperature: float, max_new_tokens: int, batch_prompts: int = 32
) -> list[list[str]]:
    """``n`` decoded answers per prompt, sampled with the policy stage's ``sample_responses`` (KV cache)."""
    answers = []
    for start in range(0, len(prompts), batch_prompts):
        encoded = [
            encode_prompt(tokenizer, p, SAFE_RLHF_TEMPLATE, 32)[0] for p in prompts[start : start + batch_prompts]
        ]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(encoded):  # left-padded, as the policy stage's prompt batches
            ids[i, width - len(e) :] = torch.tensor(e)
            mask[i, width - len(e) :] = 1
        ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
        with torch.no_grad():
            sequences, _, response_mask, _ = sample_responses(
                model, ids, mask, max_new_tokens, temperature, 1.0, 0, tokenizer.eos_token_id, tokenizer.pad_token_id
            )
        decoded = decode_responses(tokenizer, sequences[:, width:], response_mask)
        answers += [decoded[i : i + n] for i in range(0, len(decoded), n)]
    return answers


def select(rewards: torch.Tensor, costs: torch.Tensor, reference_logprobs: torch.Tensor, beta: float) -> int:
    """Index of the kept sample of one prompt (the safe one with the largest ``R + beta log pi_ref``), or -1."""
    return kl_optimum(rewards, costs <= 0, reference_logprobs, beta)


def best_of_n(
    prompts: list[str],
    answers: list[list[str]],
    reward_members,
    cost,
    reference,
    beta: float,
    aggregate: str = "mean_minus_std",
    kappa: float = 1.0,
    chunk: int = 512,
) -> tuple[list[dict], dict]:
    """The kept rows and a summary (``prompts``, ``kept``, ``no_safe_sample``, mean reward of all and of kept)."""
    flat_prompts = [p for p, a in zip(prompts, answers, strict=True) for _ in a]
    flat_answers = [x for a in answers for x in a]

    def chunked(fn) -> torch.Tensor:
        return torch.cat(
            [fn(flat_prompts[i : i + chunk], flat_answers[i : i + chunk]) for i in range(0, len(flat_prompts), chunk)]
        )

    members = torch.stack([chunked(f) for f in reward_members], 1)
    rewards = aggregate_rewards(members, aggregate, kappa)[0] if members.shape[1] > 1 else members[:, 0]
    costs = chunked(cost)
    rows, kept_rewards, at = [], [], 0
    for prompt, group in zip(prompts, answers, strict=True):
        r, c = rewards[at : at + len(group)], costs[at : at + len(group)]
        at += len(group)
        best = select(r, c, reference(prompt, group), beta)
        if best >= 0:
            rows.append({"prompt": prompt, "response": group[best]})
            kept_rewards.append(float(r[best]))
    summary = {
        "prompts": len(prompts),
        "kept": len(rows),
        "no_safe_sample": len(prompts) - len(rows),
        "mean_reward_all": float(rewards.mean()),
        "mean_reward_kept": sum(kept_rewards) / max(len(kept_rewards), 1),
        "safe_share_all": float((costs <= 0).float().mean()),
    }
    return rows, summary


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", type=Path, help="folder with the run's exports (sft/, reward/, cost/, ...)")
    parser.add_argument("--out", type=Path, required=True, help="the SFT rows to write (.jsonl)")
    parser.add_argument("--start", default="sft", help="the export sampled from and its reference (default sft)")
    parser.add_argument("--reward", nargs="+", default=["reward"], help="reward export name(s), the first aligned to")
    parser.add_argument("--reward-aggregate", default="mean_minus_std", choices=["mean", "mean_minus_std", "min"])
    parser.add_argument("--reward-kappa", type=float, default=1.0)
    parser.add_argument("--cost", nargs="+", default=["cost"], help="cost export name(s), worst case taken")
    parser.add_argument("--samples", type=int, default=32, help="answers sampled per prompt (default 32)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=12, help="the demo policy stage's 12")
    parser.add_argument("--beta", type=float, default=0.1, help="the policy stage's estimation.kl_coef")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--world", nargs="*", default=[], metavar="KEY=VALUE", help="WorldConfig fields of the run")
    args = parser.parse_args(argv)
    if args.samples < 1 or not args.temperature > 0 or not args.beta > 0 or args.max_new_tokens < 1:
        raise SystemExit("--samples and --max-new-tokens must be >= 1, --temperature and --beta > 0")
    if args.out.suffix != ".jsonl":
        raise SystemExit(f"--out {args.out}: expected a .jsonl file (the SFT stage's data.dataset)")
    for name in (*args.reward, *args.cost, args.start):
        if not (args.exports / name).is_dir():
            raise SystemExit(f"{args.exports}: expected the export folder {name}/ there (--reward / --cost / --start)")
    torch.manual_seed(args.seed)
    world = World(WorldConfig(**parse_world(args.world)))
    prompts = [row["prompt"] for row in world.rl_prompts()]
    tokenizer = AutoTokenizer.from_pretrained(args.exports / args.start)
    start = load_causal_lm(tokenizer, str(args.exports / args.start)).eval()
    rewards = [scorer(args.exports, name, num_labels=1) for name in args.reward]  # loaded before sampling: a bad
    cost = worst_case([scorer(args.exports, name, num_labels=None) for name in args.cost])  # export fails fast
    began = time.perf_counter()
    answers = sample_answers(start, tokenizer, prompts, args.samples, args.temperature, args.max_new_tokens)
    rows, summary = best_of_n(
        prompts,
        answers,
        rewards,
        cost,
        policy_logprobs(start, tokenizer),
        args.beta,
        args.reward_aggregate,
        args.reward_kappa,
    )
    write_rows(rows, args.out)  # through a temporary file: a killed run leaves no half-written rows
    summary.update(seconds=round(time.perf_counter() - began, 1), out=str(args.out))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
