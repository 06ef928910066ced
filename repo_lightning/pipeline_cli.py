"""The command line of :mod:`repo_lightning.pipeline` (``python -m repo_lightning.pipeline``, ``make demo``).

Parses the arguments, plans the stage count shown as ``[i/n]``, runs a :class:`~repo_lightning.pipeline.Pipeline`
and prints its summary. The options are described in :mod:`repo_lightning.pipeline`'s docstring, which is also the
``--help`` text.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from repo_lightning import pipeline as pipeline_module
from repo_lightning.console import VERBOSE_ENV, StageFailed, silence_known_noise
from repo_lightning.pipeline import ORACLE_SCORE_ARGS, Pipeline
from repo_lightning.pipeline_stages import parse_stage_args
from repo_lightning.safetyworld.config import world_from_overrides
from repo_lightning.validation import MAX_SEED


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description=pipeline_module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default="lightning_logs/demo", help="run folder (default: %(default)s)")
    parser.add_argument("--config-dir", default="configs/demo", help="stage configs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage (default: %(default)s)")
    parser.add_argument(
        "--algorithms",
        nargs="+",
        default=["repo"],
        help="policy configs to train, by name in --config-dir (ppo, ppo_lag, repo, repo_rloo, ...)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show every stage's full output (and the messages of other libraries filtered by default) instead of "
        "one line per stage with the output in <root>/logs/<stage>.log",
    )
    parser.add_argument(
        "--preference-rounds",
        type=int,
        default=1,
        help="rounds of reward/cost training; each after the first adds pairs of the previous round's policies' "
        "own answers on the training prompts, labelled by SafetyWorld's annotator (default: %(default)s: one "
        "round, on the generated preference data only)",
    )
    parser.add_argument(
        "--oracle-scores",
        action="store_true",
        help="train and evaluate every policy with SafetyWorld's ground-truth R* and C* in place of the learned "
        "reward and cost models (model.init_args.scoring.{reward,cost}_source: oracle): the ceiling check of "
        "docs/algorithm.md section 13; the reward and cost stages still run (the critics start from them)",
    )
    parser.add_argument(
        "--reward-ensemble",
        type=int,
        default=1,
        help="reward models the final policies score with (default: %(default)s); each member after the first "
        "is trained from its own SFT start (another seed), and the policies use mean - std of their aligned scores "
        "(docs/algorithm.md section 14)",
    )
    parser.add_argument(
        "--cost-ensemble",
        type=int,
        default=1,
        help="cost models the final policies score with (default: %(default)s); each member after the first is "
        "trained from its own SFT start (another seed; the same starts as --reward-ensemble's), and the policies "
        "use the worst case, the largest of their costs (docs/algorithm.md section 14)",
    )
    parser.add_argument(
        "--policy-epochs",
        type=int,
        default=None,
        help="training epochs of every policy stage, PPO and collectors included, so the algorithms keep one "
        "budget (trainer.max_epochs; default: each policy config's own, 3 in configs/demo). More budget needs a "
        "conservative cost: measured with one cost model the policy learns to fool it (docs/results.md round 11)",
    )
    parser.add_argument(
        "--world",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="run every stage on another SafetyWorld: WorldConfig fields (docs/safetyworld.md), e.g. --world seed=1 "
        "num_topics=30 mild_frac=0.35 (default: the shipped world)",
    )
    parser.add_argument(
        "--warm-start",
        type=int,
        default=0,
        metavar="N",
        help="best-of-N warm start (default: %(default)s, none): sample the SFT policy N times on every RL prompt, "
        "keep the answer the cost models call safe with the largest R + beta log pi_ref, fine-tune the SFT policy "
        "on those (export sft_warm) and start every policy from it (docs/algorithm.md, 'Warm start'); 32 in "
        "docs/results.md round 23",
    )
    parser.add_argument(
        "--stage-arg",
        action="append",
        default=[],
        metavar="STAGE=ARG",
        help="one more argument for every run of a stage, after its config (so it overrides the config's value, and "
        "--policy-epochs'): STAGE is sft (also the warm start's fine-tune, whose own lr, epochs and warm-up still "
        "apply), reward, cost (ensemble members included) or policy (every policy stage: PPO, collectors, the warm "
        "start's sampling), ARG one --key=value; repeat the option for more, e.g. "
        "--stage-arg reward=--trainer.max_epochs=2 --stage-arg reward=--data.world.num_preference_rows=32000",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="skip the stages an earlier run in --root finished with the same arguments and config files (an "
        "interrupted run continues at the stage it stopped in; that stage and every later one run again)",
    )
    args = parser.parse_args(argv)
    try:
        world_from_overrides(args.world)
    except ValueError as error:
        parser.error(f"--world: {error}")
    try:
        stage_args = parse_stage_args(args.stage_arg)
    except ValueError as error:
        parser.error(f"--stage-arg: {error}")
    for flag, size in (("--reward-ensemble", args.reward_ensemble), ("--cost-ensemble", args.cost_ensemble)):
        if size < 1:
            parser.error(f"{flag} must be >= 1, got {size}")
    members = max(args.reward_ensemble, args.cost_ensemble) - 1
    top_seed = args.seed + 1000 * members  # the last ensemble member's (Pipeline.member_seed)
    if args.seed < 0 or top_seed > MAX_SEED:
        parser.error(f"--seed must be in [0, {MAX_SEED - 1000 * members}], got {args.seed}")
    if args.policy_epochs is not None and args.policy_epochs < 1:
        parser.error(f"--policy-epochs must be >= 1, got {args.policy_epochs}")
    if args.warm_start < 0:
        parser.error(f"--warm-start must be >= 0 (answers per prompt; 0: none), got {args.warm_start}")
    if args.preference_rounds < 1:
        parser.error(f"--preference-rounds must be >= 1, got {args.preference_rounds}")
    if not Path(args.config_dir).is_dir():
        parser.error(f"--config-dir: {args.config_dir} is not a folder (expected one with sft.yaml, reward.yaml, ...)")
    missing = [a for a in args.algorithms if not (Path(args.config_dir) / f"{a}.yaml").is_file()]
    if missing:
        parser.error(f"--algorithms: no config {', '.join(f'{args.config_dir}/{a}.yaml' for a in missing)}")
    try:
        (Path(args.root) / "logs").mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--root: cannot create the run folder {args.root} ({error.strerror or error})")
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # read by the stages' own entry point
    silence_known_noise()
    start = time.perf_counter()
    per_round = 2 + 2 * len(args.algorithms)  # reward, cost, then fit and sample each collector
    # each ensemble member: its SFT start, then its reward and/or cost model
    member_stages = members + (args.reward_ensemble - 1) + (args.cost_ensemble - 1)
    planned = 6 + 2 * len(args.algorithms) + (args.preference_rounds - 1) * per_round + member_stages
    planned += 3 if args.warm_start else 0  # sample, fine-tune, evaluate the warm start
    extra = {"world": [f"--data.world.{item}" for item in args.world]}
    if args.oracle_scores:
        extra["policy"] = list(ORACLE_SCORE_ARGS)
    if args.policy_epochs is not None:
        extra["policy"] = [*extra.get("policy", []), f"--trainer.max_epochs={args.policy_epochs}"]
    pipeline = Pipeline(
        args.root,
        args.config_dir,
        args.seed,
        extra=extra,
        quiet=not args.verbose,
        planned_stages=planned,
        reward_ensemble=args.reward_ensemble,
        resume=args.resume,
        cost_ensemble=args.cost_ensemble,
        warm_start=args.warm_start,
        stage_args=stage_args,
    )
    print(f"SafetyWorld pipeline in {args.root}; each stage's full output: {Path(args.root) / 'logs'}/<stage>.log")
    try:
        pipeline.train_rounds(args.algorithms, args.preference_rounds)
        evaluations = {"sft": pipeline.evaluate_start()}
        if args.warm_start:
            pipeline.warm_start()
            evaluations["sft_warm"] = pipeline.evaluate_start("sft_warm")
        for algorithm in args.algorithms:
            evaluations[algorithm] = pipeline.train_policy(algorithm)
    except StageFailed as error:
        print(error, file=sys.stderr)
        raise SystemExit(1) from None
    print()
    print(pipeline.summary(evaluations))
    print(f"total wall time: {time.perf_counter() - start:.0f} s")
    if pipeline.skipped:
        print(f"--resume: {len(pipeline.skipped)} stages finished by an earlier run were skipped")
    print(f"report: {Path(args.root) / 'summary.md'} (per-policy reports under {Path(args.root) / 'eval'})")


if __name__ == "__main__":
    main()
