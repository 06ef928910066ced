"""Is a trained policy at the optimum of its own objective? The models' shortfall against the optimiser's (issue 8).

The policy stage maximises ``E[R] - beta KL(pi || pi_ref)`` over the answers the cost models call safe (an unsafe
answer pays the multiplier on top). On one prompt the maximiser of that objective is
``pi*(y) ~ pi_ref(y) exp(R(y) / beta)`` on the safe answers, so the single answer it favours most is the one with the
largest ``R(y) + beta log pi_ref(y)``: the *KL-regularised optimum*. This script computes it, within a candidate set,
for every held-out prompt of a policy's evaluation and sets it next to what the policy says:

* candidates: the topic's own safe_alt words as answers of 1-3 words (any order, repeats included), a filler word
  followed by one or two distinct safe_alt words, the topic's detail words (1-4, in order, and with two safe_alt words
  after them), the refusal, the empty answer, and the policy's own distinct sampled answers of that prompt;
* ``R``: the run's reward model(s), an ensemble combined as the policy stage combines it (``reward_ensemble_paths``
  with ``scoring.reward_aggregate``), each model aligned to the first over a batch of the policy's own samples plus
  the prompt's candidates, as the policy stage aligns over its rollout batch; ``C``: the worst case of the cost
  model(s) (``cost_aggregate: max``), safe when ``C <= 0``; ``log pi_ref``: the reference (SFT) policy's
  log-probability of the answer and its end of sequence.

Per topic kind the table gives the mean oracle ``R*`` of the policy's samples, of the KL-regularised optimum, and of
the reward model's best safe candidate (the ``beta -> 0`` optimum); how often the optimum is among the policy's
samples or is its most frequent answer; the median probability the policy and the reference give the optimum; and
the mean objective gap ``R + beta log pi_ref`` of the optimum over the policy's most frequent answer (reward units).

How to read it: if the optimum's ``R*`` is low, the *models* (reward, cost, the KL to this reference) point to a
poor answer and no optimiser can fix that; if it is high and the policy's is low, with the optimum rare under the
policy, the *optimiser* stopped short (exploration, a local optimum), and remedies belong in the policy stage. The
candidate set is small and hand-made, so the optimum is a lower bound on what the objective allows.

Example::

    python -m repo_lightning test --config ... --model.init_args.evaluation.report_dir=runs/x/eval/repo
    python -m benchmarks.policy_gap runs/x/exports runs/x/eval/repo --policy runs/x/exports/repo \
        --reward reward reward_m1 reward_m2 --cost cost cost_m1 cost_m2 --beta 0.1 --world seed=1 num_topics=30
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import random
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoTokenizer

from benchmarks.probe_scores import ScoreFn, reward_ensemble, scorer, worst_case
from benchmarks.safety_compensation.cli import parse_world
from repo_lightning.data.schema import DataValidationError
from repo_lightning.models.backbone import load_causal_lm
from repo_lightning.modules.rollout import response_logprobs
from repo_lightning.safetyworld import Topic, World, WorldConfig
from repo_lightning.safetyworld.annotate import read_samples
from repo_lightning.safetyworld.generate import FILLER_WORDS
from repo_lightning.text.templates import SAFE_RLHF_TEMPLATE, encode_prompt, encode_response
from repo_lightning.warm_start import kl_optimum

#: ``(prompt, answers) -> [K]`` log-probabilities of each answer and its eos under one policy.
LogProbFn = Callable[[str, list[str]], torch.Tensor]

#: Columns of one row of the table, in order.
COLUMNS = (
    "policy_true_reward",
    "optimum_true_reward",
    "best_reward_true_reward",
    "optimum_in_samples",
    "optimum_is_modal",
    "optimum_policy_prob",
    "optimum_reference_prob",
    "objective_gap",
)


def gap_candidates(world: World, topic: Topic) -> list[str]:
    """The hand-made answers of the docstring for a prompt about ``topic`` (no duplicates)."""
    sa, d = topic.safe_alt, topic.detail
    fillers = FILLER_WORDS[: world.config.num_filler_words]
    answers = [" ".join(c) for n in (1, 2, 3) for c in itertools.product(sa, repeat=n)]
    answers += [f"{f} {s}" for f in fillers for s in sa]
    answers += [f"{f} {s} {t}" for f in fillers for s, t in itertools.permutations(sa, 2)]
    answers += [" ".join(d[:n]) for n in range(1, min(4, len(d)) + 1)]
    answers += [" ".join((*d[:n], *sa[:2])) for n in range(1, min(4, len(d)) + 1)]
    answers += [world.refusal, ""]
    return list(dict.fromkeys(answers))


def policy_logprobs(model, tokenizer, max_prompt_length: int = 32) -> LogProbFn:
    """Log-probability of ``answer eos`` after the templated prompt, as the policy stage computes it
    (:func:`response_logprobs` over the prompt followed by right-padded responses)."""

    def logprobs(prompt: str, answers: list[str]) -> torch.Tensor:
        prompt_ids, _ = encode_prompt(tokenizer, prompt, SAFE_RLHF_TEMPLATE, max_prompt_length)
        responses = [encode_response(tokenizer, a, 10_000)[0] for a in answers]
        width = max(len(r) for r in responses)
        ids = torch.full((len(answers), len(prompt_ids) + width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        ids[:, : len(prompt_ids)] = torch.tensor(prompt_ids)
        mask[:, : len(prompt_ids)] = 1
        for i, r in enumerate(responses):
            ids[i, len(prompt_ids) : len(prompt_ids) + len(r)] = torch.tensor(r)
            mask[i, len(prompt_ids) : len(prompt_ids) + len(r)] = 1
        with torch.no_grad():
            token_logprobs = response_logprobs(model, ids, mask, len(prompt_ids))
        return (token_logprobs * mask[:, len(prompt_ids) :]).sum(1)

    return logprobs


def policy_gap(
    rows: list[dict],
    world: World,
    reward: ScoreFn,
    cost: ScoreFn,
    reference: LogProbFn,
    beta: float,
    policy: LogProbFn | None = None,
) -> list[dict]:
    """One row per topic kind (see the module docstring); ``rows`` are an evaluation's ``per_prompt.jsonl`` rows.
    Prompts with no safe candidate are counted in ``prompts_without_safe_answer`` and left out of the means."""
    per_kind: dict[str, list[dict]] = collections.defaultdict(list)
    skipped: collections.Counter = collections.Counter()
    for row in rows:
        prompt, samples = row["prompt"], row["responses"]
        topic = world.topic_of(prompt)
        answers = list(dict.fromkeys([*gap_candidates(world, topic), *samples]))
        prompts = [prompt] * len(answers)
        rewards, costs, ref = reward(prompts, answers), cost(prompts, answers), reference(prompt, answers)
        safe = costs <= 0
        best = kl_optimum(rewards, safe, ref, beta)
        if best < 0:
            skipped[row["kind"]] += 1
            continue
        modal = answers.index(collections.Counter(samples).most_common(1)[0][0])
        objective = rewards + beta * ref
        greedy = kl_optimum(rewards, safe, torch.zeros_like(ref), beta)
        figures = {
            "policy_true_reward": statistics.fmean(world.helpfulness(prompt, a) for a in samples),
            "optimum_true_reward": world.helpfulness(prompt, answers[best]),
            "best_reward_true_reward": world.helpfulness(prompt, answers[greedy]),
            "optimum_in_samples": float(answers[best] in samples),
            "optimum_is_modal": float(best == modal),
            "optimum_reference_prob": float(ref[best].exp()),
            "objective_gap": float(objective[best] - objective[modal]),
        }
        if policy is not None:
            figures["optimum_policy_prob"] = float(policy(prompt, [answers[best]])[0].exp())
        per_kind[row["kind"]].append(figures)
    table = []
    for kind in sorted(set(per_kind) | set(skipped)):
        found = per_kind[kind]
        out = {"kind": kind, "prompts": len(found), "prompts_without_safe_answer": skipped[kind]}
        for column in COLUMNS:
            values = [f[column] for f in found if column in f]
            if values:
                mid = statistics.median if column.endswith("_prob") else statistics.fmean
                out[column] = mid(values)
        table.append(out)
    return table


def reference_scores(members: list[ScoreFn], rows: list[dict], size: int = 1024, seed: int = 0) -> torch.Tensor:
    """``[N, M]`` scores of up to ``size`` of the policy's samples (drawn over every prompt) by each member."""
    pairs = [(r["prompt"], a) for r in rows for a in r["responses"]]
    pairs = random.Random(seed).sample(pairs, min(size, len(pairs)))
    prompts, answers = [p for p, _ in pairs], [a for _, a in pairs]
    return torch.stack([f(prompts, answers) for f in members], 1)


def read_rows(eval_dir: Path, world: World) -> list[dict]:
    """``{"prompt", "responses", "kind"}`` per line of ``eval_dir/per_prompt.jsonl`` (read as the preference rounds
    read it, :func:`read_samples`), the kind from ``world``."""
    path = eval_dir / "per_prompt.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: not found; expected the per_prompt.jsonl of a policy's `test` report_dir")
    try:
        samples = read_samples(path)
    except DataValidationError as err:
        raise SystemExit(str(err)) from None
    if not samples:
        raise SystemExit(f"{path}: no rows")
    rows = []
    for number, (prompt, responses) in enumerate(samples):
        try:
            kind = world.topic_of(prompt).kind
        except ValueError as err:
            raise SystemExit(f"{path}: row {number}: {err}; is --world the run's world?") from None
        rows.append({"prompt": prompt, "responses": responses, "kind": kind})
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", type=Path, help="folder with the run's exports (sft/, reward/, cost/, ...)")
    parser.add_argument("eval_dir", type=Path, help="the policy's evaluation report_dir (its per_prompt.jsonl)")
    parser.add_argument("--policy", type=Path, default=None, help="the policy's export, for P_policy(optimum)")
    parser.add_argument("--reference", default="sft", help="the reference policy's export name (default sft)")
    parser.add_argument("--beta", type=float, default=0.1, help="the run's estimation.kl_coef (the demo's 0.1)")
    parser.add_argument("--reward", nargs="+", default=["reward"], help="reward export name(s), the first aligned to")
    parser.add_argument("--reward-aggregate", default="mean_minus_std", choices=["mean", "mean_minus_std", "min"])
    parser.add_argument("--reward-kappa", type=float, default=1.0)
    parser.add_argument("--cost", nargs="+", default=["cost"], help="cost export name(s), worst case taken")
    parser.add_argument("--kinds", nargs="+", default=None, help="topic kinds to include (default: all)")
    parser.add_argument("--world", nargs="*", default=[], metavar="KEY=VALUE", help="WorldConfig fields of the run")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if not args.beta > 0:
        raise SystemExit(f"--beta must be > 0 (the run's kl_coef), got {args.beta}")
    for name in (*args.reward, *args.cost, args.reference):
        if not (args.exports / name).is_dir():
            raise SystemExit(
                f"{args.exports}: expected the export folder {name}/ there (--reward / --cost / --reference)"
            )
    if args.policy is not None and not args.policy.is_dir():
        raise SystemExit(f"--policy {args.policy}: not a folder (expected the policy's export)")
    world = World(WorldConfig(**parse_world(args.world)))
    rows = read_rows(args.eval_dir, world)
    if args.kinds:
        rows = [r for r in rows if r["kind"] in args.kinds]
    members = [scorer(args.exports, name, num_labels=1) for name in args.reward]
    reward = reward_ensemble(members, args.reward_aggregate, args.reward_kappa, reference_scores(members, rows))
    cost = worst_case([scorer(args.exports, name, num_labels=None) for name in args.cost])

    def logprobs_of(path: Path) -> LogProbFn:
        tokenizer = AutoTokenizer.from_pretrained(path)
        return policy_logprobs(load_causal_lm(tokenizer, str(path)).eval(), tokenizer)

    policy = logprobs_of(args.policy) if args.policy is not None else None
    table = policy_gap(rows, world, reward, cost, logprobs_of(args.exports / args.reference), args.beta, policy)
    print(
        f"the KL-regularised optimum (largest R + {args.beta} log pi_ref among the safe candidates) against the "
        "policy's samples\n| kind | prompts | R* policy | R* optimum | R* best-R | optimum sampled | optimum modal "
        "| P_policy(opt) | P_ref(opt) | gap to modal |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for r in table:
        cells = " | ".join(
            "-" if c not in r else f"{r[c]:.3g}" if c.endswith("_prob") else f"{r[c]:.2f}" for c in COLUMNS
        )
        print(f"| {r['kind']} | {r['prompts']} | {cells} |")
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
