r"""A best-of-n warm start for the policy stage: rejection sampling on the RL prompts, then RL from there.

The start policy (the SFT export) is sampled ``n`` times on every RL prompt by an ordinary policy-stage ``test`` run
(the policy stage's own rollout and scoring code: the reward ensemble combined and aligned over each rollout batch
as in training, the cost models' worst case), whose ``per_prompt.jsonl`` carries each answer's learned reward ``R``,
learned cost ``C`` and ``log pi_ref``. Per prompt occurrence the answer kept is the one the cost models call safe
(``C <= 0``) with the largest ``R + beta log pi_ref``: the sample the KL-regularised optimum
``pi* ~ pi_ref exp(R / beta)`` of the policy stage's objective favours most (``beta``: the policy's
``estimation.kl_coef``). A prompt with no safe answer gets no row. The kept answers are SFT rows (``prompt``,
``response``); the start policy is fine-tuned on them and every policy is trained from that model, which is also
its reference. Only the learned models choose: the ground truth of SafetyWorld is never read.

This is rejection sampling followed by RL, as in Llama 2's RLHF and RAFT (Dong et al., 2023). It moves the start
towards answers the SFT policy gives rarely (two on-topic safety words: about 0.3 % of its samples on a hazard
prompt of one world), which on-policy sampling with a few samples a prompt seldom finds (docs/results.md, round
23; docs/algorithm.md, "Warm start"). ``python -m repo_lightning.pipeline --warm-start 32`` runs it as stages;
by hand::

    python -m repo_lightning test --config configs/demo/repo.yaml --data.test_dataset=train_prompts.jsonl \
        --model.init_args.evaluation.samples_per_prompt=32 --model.init_args.evaluation.report_dir=ws/samples
    python -m repo_lightning.warm_start ws/samples/per_prompt.jsonl --beta 0.1 --out ws/best_of_n.jsonl
    python -m repo_lightning fit --config configs/demo/sft.yaml --model.init_args.model_config=null \
        --model.init_args.model_name_or_path=exports/sft --data.dataset=ws/best_of_n.jsonl \
        --data.tokenizer=exports/sft --model.init_args.optimizer.init_args.lr=0.0005 --trainer.max_epochs=3 \
        --model.init_args.warmup_steps=5 --model.init_args.export_dir=exports/sft_warm
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import yaml

from repo_lightning.data.schema import DataValidationError
from repo_lightning.data.sources import read_jsonl
from repo_lightning.evaluation import PromptResult
from repo_lightning.modules.policy_config import Estimation
from repo_lightning.safetyworld.annotate import write_rows

#: The policy-stage argument that sets ``beta`` (the KL coefficient) on the command line.
KL_COEF_ARG = "--model.init_args.estimation.kl_coef="


def policy_kl_coef(config: str | Path, policy_args: list[str] = ()) -> float:
    """The KL coefficient (``beta``) a policy stage trains with.

    The last ``--model.init_args.estimation.kl_coef=`` of ``policy_args``, else the one in the ``config`` YAML, else
    the stage's default.
    """
    for arg in reversed(policy_args):
        if arg.startswith(KL_COEF_ARG):
            return float(arg[len(KL_COEF_ARG) :])
    loaded = yaml.safe_load(Path(config).read_text()) or {}
    estimation = (loaded.get("model", {}).get("init_args", {}) or {}).get("estimation") or {}
    return float(estimation.get("kl_coef", Estimation().kl_coef))


def kl_optimum(rewards: torch.Tensor, safe: torch.Tensor, reference_logprobs: torch.Tensor, beta: float) -> int:
    """Index of the safe answer with the largest ``R + beta log pi_ref``, or -1 when none is safe."""
    if not bool(safe.any()):
        return -1
    objective = rewards.float() + beta * reference_logprobs.float()
    return int(torch.where(safe, objective, torch.full_like(objective, -torch.inf)).argmax())


def read_scored_samples(path: str | Path) -> list[PromptResult]:
    """The records of a policy ``test`` run's ``per_prompt.jsonl`` that carry ``ref_logprobs``.

    Raises:
        DataValidationError: a malformed line, or a record without the fields the warm start ranks by (naming the
            file and row).
    """
    results = []
    for number, row in enumerate(read_jsonl(Path(path))):
        try:
            result = PromptResult.from_json(row)
        except (ValueError, TypeError) as err:
            raise DataValidationError(f"{path}: row {number}: not a per_prompt.jsonl record ({err})") from err
        if result.ref_logprobs is None or len(result.ref_logprobs) != len(result.responses):
            raise DataValidationError(
                f"{path}: row {number}: expected 'ref_logprobs', one per response (written by policy test runs since "
                "the warm start was added; rerun the sampling)"
            )
        results.append(result)
    if not results:
        raise DataValidationError(f"{path}: no records; expected the per_prompt.jsonl of a policy test run")
    return results


def best_of_n(results: list[PromptResult], beta: float) -> tuple[list[dict], dict]:
    """The kept SFT rows (one per prompt occurrence with a safe answer) and a summary of the selection.

    Args:
        results: Per-prompt records with learned ``rewards``, ``costs`` and ``ref_logprobs`` (a ``test`` run).
        beta: Weight of ``log pi_ref`` (the policy's ``estimation.kl_coef``), ``> 0``.

    Returns:
        ``(rows, summary)``; ``summary`` has ``prompts``, ``kept``, ``no_safe_sample``, ``samples``,
        ``safe_share_all`` and the learned ``mean_reward_all`` / ``mean_reward_kept``.
    """
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number > 0 (the policy's estimation.kl_coef), got {beta}")
    rows, kept_rewards, all_rewards, safe = [], [], [], 0
    for result in sorted(results, key=lambda r: r.index):
        rewards, costs = torch.tensor(result.rewards), torch.tensor(result.costs)
        best = kl_optimum(rewards, costs <= 0, torch.tensor(result.ref_logprobs), beta)
        all_rewards += result.rewards
        safe += int((costs <= 0).sum())
        if best >= 0:
            rows.append({"prompt": result.prompt, "response": result.responses[best]})
            kept_rewards.append(result.rewards[best])
    summary = {
        "prompts": len(results),
        "kept": len(rows),
        "no_safe_sample": len(results) - len(rows),
        "samples": len(all_rewards),
        "safe_share_all": safe / max(len(all_rewards), 1),
        "mean_reward_all": sum(all_rewards) / max(len(all_rewards), 1),
        "mean_reward_kept": sum(kept_rewards) / max(len(kept_rewards), 1),
        "beta": beta,
    }
    return rows, summary


def select_rows(samples: str | Path, out: str | Path, beta: float) -> dict:
    """Read a ``test`` run's samples, keep the best safe answer per prompt, write the SFT rows; returns the summary.

    Raises:
        DataValidationError: see :func:`read_scored_samples`; also when no prompt has a safe answer (nothing to
            fine-tune on).
    """
    rows, summary = best_of_n(read_scored_samples(samples), beta)
    if not rows:
        raise DataValidationError(
            f"{samples}: the cost model(s) call none of the {summary['samples']} answers safe, so the warm start has "
            "nothing to fine-tune on; sample more answers a prompt or train without a warm start"
        )
    write_rows(rows, out)  # through a temporary file: a killed run leaves no half-written rows
    return {**summary, "out": str(out)}


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", type=Path, help="per_prompt.jsonl of a policy test run on the RL prompts")
    parser.add_argument("--out", type=Path, required=True, help="the SFT rows to write (.jsonl)")
    parser.add_argument("--beta", type=float, default=0.1, help="the policy's estimation.kl_coef (default 0.1)")
    args = parser.parse_args(argv)
    if args.out.suffix != ".jsonl":
        parser.error(f"--out {args.out}: expected a .jsonl file (the SFT stage's data.dataset)")
    if not (args.beta > 0 and math.isfinite(args.beta)):
        parser.error(f"--beta must be a finite number > 0, got {args.beta}")
    if not args.samples.is_file():
        parser.error(f"{args.samples}: no such file (expected a policy test run's per_prompt.jsonl)")
    try:
        print(json.dumps(select_rows(args.samples, args.out, args.beta)))
    except DataValidationError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
