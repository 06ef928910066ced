"""The command line: flags -> :class:`~benchmarks.safety_compensation.tasks.Benchmark` -> run -> report."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

import benchmarks.safety_compensation as package
from benchmarks.safety_compensation.report import read_results_json, write_outputs
from benchmarks.safety_compensation.search import (
    ABLATIONS,
    CONSTRAINED,
    ESTIMATORS,
    SEARCH_GRID,
    VAL_REWARD,
    VAL_UNSAFE,
)
from benchmarks.safety_compensation.tasks import Benchmark, run
from repo_lightning.safetyworld.config import world_from_overrides

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = Path("benchmarks/out/safety_compensation")
MARKER = ".safety_compensation"
COMMAND = "python -m benchmarks.safety_compensation"
STAGES = ("sft", "reward", "cost", "policy")

SMALL_WORLD = ["num_topics=6", "num_sft_rows=64", "num_preference_rows=64", "num_rl_prompts=48", "num_eval_prompts=16"]


def parse_world(items: list[str]) -> dict:
    """``["mild_severity=0.5", ...]`` -> every ``WorldConfig`` field of that world (values read as YAML).

    Raises:
        SystemExit: For a malformed item, an unknown field or an inconsistent world, before anything runs.
    """
    try:
        return dataclasses.asdict(world_from_overrides(items))
    except ValueError as error:
        raise SystemExit(f"--world {' '.join(items)}: {error}") from error


def policy_config(config_dir: Path, algorithm: str) -> dict:
    """The parsed ``<config_dir>/<algorithm>.yaml``."""
    return yaml.safe_load((config_dir / f"{algorithm}.yaml").read_text())


def policy_budget(config: dict) -> dict[str, object]:
    """The knobs of a policy config that set its rollout budget (to check the algorithms get the same)."""
    trainer, data = config.get("trainer", {}), config.get("data", {})
    model = config.get("model", {}).get("init_args", {})
    budget = {f"trainer.{k}": trainer.get(k) for k in ("max_epochs", "max_steps", "limit_train_batches")}
    budget.update({f"data.{k}": data.get(k) for k in ("batch_size", "val_fraction")})
    for group, keys in (("sampling", ("samples_per_prompt", "max_new_tokens")), ("update", ("ppo_epochs",))):
        budget.update({f"model.{group}.{k}": (model.get(group) or {}).get(k) for k in keys})
    return budget


def dual_config(config: dict) -> dict[str, object]:
    """The dual rule and maximum a policy config sets (the search does not change them)."""
    dual = (config["model"]["init_args"].get("dual") or {}).get("init_args", {})
    rule = (dual.get("rule") or {}).get("class_path", "LogRule (default)")
    return {"rule": rule.rsplit(".", 1)[-1], "maximum": dual.get("maximum")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags; ``--small`` fills in the CI-sized budget."""
    parser = argparse.ArgumentParser(
        prog=COMMAND, description=package.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default=None, help=f"output folder (default: {DEFAULT_OUT}, or {DEFAULT_OUT}-<world> with --world)"
    )
    parser.add_argument("--config-dir", default=str(REPO_ROOT / "configs" / "demo"), help="stage configs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--search-seed", type=int, default=None, help="seed of the search (default: first seed)")
    parser.add_argument("--search-candidates", type=int, default=4, help="grid points per algorithm (max 4)")
    parser.add_argument("--tie", type=float, default=0.02, help="tie margin of the selection rule (%(default)s)")
    parser.add_argument(
        "--world",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="WorldConfig fields for every stage, e.g. --world seed=1 mild_severity=0.5 (a second world)",
    )
    parser.add_argument("--policy-epochs", type=int, default=None, help="trainer.max_epochs of every policy")
    parser.add_argument("--policy-batches", type=int, default=None, help="trainer.limit_train_batches of policies")
    parser.add_argument("--eval-k", type=int, default=None, help="held-out samples a prompt (= k)")
    parser.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="STAGE:ARG",
        help="extra CLI argument for a stage (sft, reward, cost, policy), e.g. --extra=sft:--trainer.max_epochs=2",
    )
    parser.add_argument("--ablations", nargs="*", default=list(ABLATIONS), choices=list(ABLATIONS))
    parser.add_argument("--no-ablations", dest="ablations", action="store_const", const=[])
    parser.add_argument(
        "--ablation-seeds", type=int, nargs="+", default=None, help="seeds of the ablations (default: the search seed)"
    )
    parser.add_argument(
        "--estimators",
        nargs="+",
        default=["gae"],
        choices=list(ESTIMATORS),
        help="advantage estimators to compare for ppo_lag and repo (default: gae, the configs' own)",
    )
    parser.add_argument(
        "--estimator-seeds", type=int, nargs="+", default=None, help="seeds of the estimator runs (default: all)"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(os.cpu_count() or 1, 8),
        help="stage subprocesses at a time, one CPU thread each when > 1 (default: CPU count, at most 8)",
    )
    parser.add_argument(
        "--model-tests", action="store_true", help="also test the reward and cost models on held-out pairs"
    )
    parser.add_argument(
        "--preference-rounds",
        type=int,
        default=1,
        help="reward/cost training rounds; each after the first adds pairs of ppo's, ppo_lag's and repo's own "
        "answers on the training prompts (docs/safetyworld.md, 'Preference rounds'; default: %(default)s)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="only rewrite results.md and the plots from --out/results.json"
    )
    parser.add_argument(
        "--small", action="store_true", help="CI-sized: tiny world, 2 batches per stage, 1 seed, 2 candidates"
    )
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = str(DEFAULT_OUT) + ("-" + "-".join(args.world) if args.world else "")
    if args.small:
        args.seeds = args.seeds if argv and "--seeds" in argv else [0]
        args.search_candidates = min(args.search_candidates, 2)
        args.world = [*SMALL_WORLD, *args.world]
        args.policy_batches = args.policy_batches or 2
        args.policy_epochs = args.policy_epochs or 1
        args.eval_k = args.eval_k or 2
        small = [f"{stage}:--trainer.{k}" for stage in STAGES[:3] for k in ("max_epochs=1", "limit_train_batches=2")]
        small += ["policy:--data.batch_size=8", "policy:--model.init_args.update.minibatch_size=16"]
        args.extra = [*small, *args.extra]
    return args


def stage_arguments(args: argparse.Namespace) -> dict[str, list[str]]:
    """Extra CLI arguments per stage (and ``world`` for every stage) from the flags."""
    extra: dict[str, list[str]] = {"world": [f"--data.world.{kv}" for kv in args.world]}
    for item in args.extra:
        stage, _, arg = item.partition(":")
        if stage not in STAGES or not arg:
            raise SystemExit(f"--extra expects STAGE:ARG with STAGE in {', '.join(STAGES)}; got {item!r}")
        extra.setdefault(stage, []).append(arg)
    policy = []
    if args.policy_epochs is not None:
        policy.append(f"--trainer.max_epochs={args.policy_epochs}")
    if args.policy_batches is not None:
        policy.append(f"--trainer.limit_train_batches={args.policy_batches}")
    if args.eval_k is not None:
        policy.append(f"--model.init_args.evaluation.samples_per_prompt={args.eval_k}")
        policy.append(f"--model.init_args.evaluation.unsafe_at_k={args.eval_k}")  # any of those k, as before
    extra["policy"] = [*policy, *extra.get("policy", [])]
    return extra


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the content of ``results.json``."""
    args = parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        results = read_results_json(out)
        write_outputs(results, out)
        return results
    world = parse_world(args.world)
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.jobs > 1:  # share the cores between the concurrent stages instead of oversubscribing them
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))

    config_dir = Path(args.config_dir)
    configs = {alg: policy_config(config_dir, alg) for alg in ("ppo", *CONSTRAINED)}
    budgets = {alg: policy_budget(config) for alg, config in configs.items()}
    if any(b != budgets["ppo"] for b in budgets.values()):
        print(f"WARNING: the policy configs set different rollout budgets: {budgets}", flush=True)
    repo_args = configs["repo"]["model"]["init_args"]
    base_estimator = (repo_args.get("estimation") or {}).get("estimator", "gae")
    evaluation = repo_args.get("evaluation") or {}
    eval_n = args.eval_k or evaluation.get("samples_per_prompt", 4)
    eval_k = args.eval_k or evaluation.get("unsafe_at_k") or eval_n
    search_seed = args.seeds[0] if args.search_seed is None else args.search_seed
    for flag, seeds in (("--ablation-seeds", args.ablation_seeds), ("--estimator-seeds", args.estimator_seeds)):
        if not set(seeds or []) <= set(args.seeds):
            raise SystemExit(f"{flag} must be among --seeds")
    if search_seed not in args.seeds:
        raise SystemExit("--search-seed must be among --seeds")
    if args.preference_rounds < 1:
        raise SystemExit(f"--preference-rounds must be >= 1, got {args.preference_rounds}")

    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise SystemExit(f"{out} exists and was not written by this benchmark; choose another --out")
    shutil.rmtree(out / "runs", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(f"written by {COMMAND}\n")

    bench = Benchmark(
        out=out,
        config_dir=config_dir,
        seeds=args.seeds,
        search_seed=search_seed,
        search_candidates=min(args.search_candidates, min(len(g) for g in SEARCH_GRID.values())),
        tie=args.tie,
        ablations=args.ablations,
        ablation_seeds=args.ablation_seeds or [search_seed],
        estimators=list(dict.fromkeys(args.estimators)),
        estimator_seeds=args.estimator_seeds or args.seeds,
        base_estimator=base_estimator,
        jobs=args.jobs,
        model_tests=args.model_tests,
        stage_extra=stage_arguments(args),
        preference_rounds=args.preference_rounds,
    )
    settings = {
        "command": " ".join([COMMAND, *(argv if argv is not None else sys.argv[1:])]),
        "seeds": bench.seeds,
        "search_seed": bench.search_seed,
        "search_grid": {alg: SEARCH_GRID[alg][: bench.search_candidates] for alg in CONSTRAINED},
        "selection_rule": f"min `{VAL_UNSAFE}`; within {bench.tie} of the min, max `{VAL_REWARD}`",
        "tie": bench.tie,
        "dual_configs": {alg: dual_config(configs[alg]) for alg in CONSTRAINED},
        "ablations": bench.ablations,
        "ablation_labels": {name: ABLATIONS[name].label for name in bench.ablations},
        "ablation_changes": {name: ABLATIONS[name].change for name in bench.ablations},
        "ablation_seeds": bench.ablation_seeds,
        "estimators": bench.estimators,
        "base_estimator": base_estimator,
        "estimator_seeds": bench.estimator_seeds,
        "preference_rounds": args.preference_rounds,
        "world_overrides": args.world,
        "world": world,
        "stage_extra": bench.stage_extra,
        "policy_budgets": budgets,
        "eval_k": eval_k,
        "eval_samples": eval_n,
        "jobs": args.jobs,
        "config_mtimes": {
            p.name: time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(p.stat().st_mtime))
            for p in sorted(config_dir.glob("*.yaml"))
        },
    }
    results = {**run(bench), "settings": settings}
    write_outputs(results, out)
    print((out / "results.md").read_text())
    print(f"total wall time: {results['wall_s'] / 60:.1f} min; outputs in {out}")
    return results
