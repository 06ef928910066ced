"""The runs of one invocation as a graph of tasks, and the scheduler that runs it.

Each task is a function of its dependencies' results that returns its own; nothing is shared between tasks but
those return values (and each seed's :class:`~benchmarks.safety_compensation.stages.MeasuredPipeline`, whose
stage timings are keyed by distinct stage names). The graph, per seed ``s`` (search seed ``s0``)::

    models/s --> sft/s, ppo/s
    models/s0 --> search/<alg>/<i> --> select --> <variant>/s  (ppo_lag, repo, ablations, estimators)
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.safety_compensation.search import (
    ABLATIONS,
    CONSTRAINED,
    SEARCH_GRID,
    VAL_REWARD,
    VAL_TAGS,
    VAL_UNSAFE,
    Variant,
    estimator_variant,
    overrides,
    select_candidate,
    variant_settings,
)
from benchmarks.safety_compensation.stages import MeasuredPipeline, read_scalars

CURVE_TAGS = ("train/lambda", "train/true_unsafe_prompt_rate", "train/unsafe_prompt_rate")


# ------------------------------------------------------------------------------------------------ scheduling
@dataclass(frozen=True)
class Task:
    """One unit of work: ``run`` gets the results of the tasks named in ``after`` (name -> result)."""

    name: str
    run: Callable[[dict[str, object]], object]
    after: tuple[str, ...] = ()


def run_tasks(tasks: list[Task], jobs: int) -> dict[str, object]:
    """Run ``tasks`` on ``jobs`` threads as their dependencies finish, in list order; returns name -> result.

    After a failure no new task starts; the running ones finish, then the first error is raised.
    """
    results: dict[str, object] = {}
    pending = list(tasks)
    running: dict[Future, str] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            for task in [t for t in pending if all(d in results for d in t.after)]:
                if len(running) >= jobs:
                    break
                pending.remove(task)
                running[pool.submit(task.run, {d: results[d] for d in task.after})] = task.name
            if not running:
                raise RuntimeError(f"unsatisfiable dependencies: {[t.name for t in pending]}")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                name = running.pop(future)
                try:
                    results[name] = future.result()
                except Exception:
                    pending.clear()
                    raise
                print(f"[{time.strftime('%H:%M:%S')}] done: {name}", flush=True)
    return results


# ------------------------------------------------------------------------------------------------ the benchmark
@dataclass
class Benchmark:
    """Everything one invocation runs (see the package docstring); built by the command line."""

    out: Path
    config_dir: Path
    seeds: list[int]
    search_seed: int
    search_candidates: int
    tie: float
    ablations: list[str]
    ablation_seeds: list[int]
    estimators: list[str]
    estimator_seeds: list[int]
    base_estimator: str
    jobs: int
    model_tests: bool = False
    stage_extra: dict[str, list[str]] = field(default_factory=dict)
    preference_rounds: int = 1

    def pipeline(self, seed: int) -> MeasuredPipeline:
        """The seed's pipeline: run folder ``<out>/runs/seed<k>``, the stage extras, validation at the end of fit."""
        extra = {stage: list(args) for stage, args in self.stage_extra.items()}
        extra["world"] = [*extra.get("world", []), f"--data.cache_dir={self.out / 'cache'}"]
        # The policy's validation metrics decide the search: compute them at the end of every epoch (hence at the
        # end of fit) over the whole validation split, and skip the sanity check.
        extra["policy"] = [
            "--trainer.val_check_interval=1.0",
            "--trainer.limit_val_batches=1.0",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.enable_progress_bar=false",
            *extra.get("policy", []),
        ]
        return MeasuredPipeline(self.out / "runs" / f"seed{seed}", self.config_dir, seed, extra)

    def variants(self, seed: int) -> list[Variant]:
        """The searched policies, ablations and estimator variants trained on ``seed``."""
        found = [Variant(alg, alg, "searched settings") for alg in CONSTRAINED]
        if seed in self.ablation_seeds:
            found += [ABLATIONS[name] for name in self.ablations]
        if seed in self.estimator_seeds:
            found += [
                estimator_variant(alg, e) for e in self.estimators if e != self.base_estimator for alg in CONSTRAINED
            ]
        return found


def policy_record(pipe: MeasuredPipeline, name: str, evaluation: Path, fit_stage: str, settings: dict) -> dict:
    """What a trained and evaluated policy yields: its evaluation folder, curves, fit wall time and peak RSS."""
    run_name = fit_stage.removeprefix("fit_")
    return {
        "name": name,
        "evaluation": str(evaluation),
        "run_name": run_name,
        "settings": settings,
        "curves": read_scalars(pipe.root / "logs" / f"policy_{run_name}", CURVE_TAGS),
        "fit_wall_s": pipe.timings[fit_stage],
        "fit_peak_rss_mib": pipe.peak_rss_mib[fit_stage],
    }


def plan(bench: Benchmark, pipes: dict[int, MeasuredPipeline]) -> list[Task]:
    """The task graph of ``bench`` (module docstring), in the order tasks should start when free."""
    s0 = bench.search_seed

    def models(seed: int) -> Callable[[dict], None]:
        # With preference rounds, every compared algorithm's default config collects answers (the same models
        # for all of them afterwards: repo_lightning.pipeline.Pipeline.train_rounds).
        return lambda _: pipes[seed].train_rounds(["ppo", *CONSTRAINED], bench.preference_rounds, bench.model_tests)

    def sft(seed: int) -> Callable[[dict], dict]:
        return lambda _: {"name": "sft", "evaluation": str(pipes[seed].evaluate_start())}

    def ppo(seed: int) -> Callable[[dict], dict]:
        def go(_: dict) -> dict:
            evaluation = pipes[seed].train_policy("ppo")
            return policy_record(pipes[seed], "ppo", evaluation, "fit_ppo", {})

        return go

    def candidate(algorithm: str, index: int, settings: dict) -> Callable[[dict], dict]:
        def go(_: dict) -> dict:
            run_name = f"search_{algorithm}_{index}"
            run_dir = pipes[s0].fit_policy(algorithm, run_name, overrides(settings))
            scalars = read_scalars(run_dir, (*VAL_TAGS, "train/lambda"))
            missing = [t for t in (VAL_UNSAFE, VAL_REWARD) if t not in scalars]
            if missing:
                raise RuntimeError(f"{run_name}: no {missing} logged; is validation run at the end of fit?")
            return {
                "index": index,
                "run_name": run_name,
                "settings": settings,
                "val": {tag: values[-1][1] for tag, values in scalars.items() if tag.startswith("val/")},
                "val_step": scalars[VAL_UNSAFE][-1][0],
                "final_lambda": scalars["train/lambda"][-1][1] if "train/lambda" in scalars else None,
                "wall_s": pipes[s0].timings[f"fit_{run_name}"],
            }

        return go

    def select(done: dict) -> dict:
        log = {alg: [c for name, c in done.items() if name.startswith(f"search/{alg}/")] for alg in CONSTRAINED}
        chosen = {alg: candidates[select_candidate(candidates, bench.tie)] for alg, candidates in log.items()}
        for alg, winner in chosen.items():
            print(f"selected {alg}: {winner['settings']} (val {winner['val']})", flush=True)
        return {"log": log, "chosen": chosen}

    def variant(seed: int, v: Variant) -> Callable[[dict], dict]:
        def go(done: dict) -> dict:
            winner = done["select"]["chosen"][v.algorithm]
            settings = variant_settings(winner["settings"], v.change)
            args = overrides(settings)
            pipe = pipes[seed]
            if seed == s0 and not v.change:  # the winning search run is this seed's run
                evaluation = pipe.evaluate_policy(v.algorithm, winner["run_name"], args)
                return policy_record(pipe, v.name, evaluation, f"fit_{winner['run_name']}", settings)
            evaluation = pipe.train_policy(v.algorithm, v.name, args)
            return policy_record(pipe, v.name, evaluation, f"fit_{v.name}", settings)

        return go

    tasks = [Task(f"models/{s0}", models(s0))]
    grid = {alg: SEARCH_GRID[alg][: bench.search_candidates] for alg in CONSTRAINED}
    for i in range(bench.search_candidates):
        tasks += [Task(f"search/{alg}/{i}", candidate(alg, i, grid[alg][i]), (f"models/{s0}",)) for alg in CONSTRAINED]
    tasks.append(Task("select", select, tuple(t.name for t in tasks if t.name.startswith("search/"))))
    tasks += [Task(f"models/{s}", models(s)) for s in bench.seeds if s != s0]
    for seed in bench.seeds:
        ready = (f"models/{seed}",)
        tasks += [Task(f"sft/{seed}", sft(seed), ready), Task(f"ppo/{seed}", ppo(seed), ready)]
        tasks += [Task(f"{v.name}/{seed}", variant(seed, v), (*ready, "select")) for v in bench.variants(seed)]
    return tasks


def run(bench: Benchmark) -> dict:
    """Run every task; returns the raw results (per-seed metrics, evaluations, curves, search, timings)."""
    pipes = {seed: bench.pipeline(seed) for seed in bench.seeds}
    start = time.perf_counter()
    cpu_start = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = run_tasks(plan(bench, pipes), bench.jobs)
    wall = time.perf_counter() - start
    cpu_end = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_end.ru_utime + cpu_end.ru_stime) - (cpu_start.ru_utime + cpu_start.ru_stime)

    metrics: dict[str, dict[int, dict]] = {}
    evaluations: dict[str, dict[int, str]] = {}
    curves: dict[str, dict[int, dict]] = {}
    settings: dict[str, dict[int, dict]] = {}
    for task_name, record in done.items():
        if not isinstance(record, dict) or "evaluation" not in record:
            continue
        name, seed = record["name"], int(task_name.rsplit("/", 1)[1])
        values = json.loads((Path(record["evaluation"]) / "metrics.json").read_text())
        evaluations.setdefault(name, {})[seed] = record["evaluation"]
        if "curves" in record:
            curves.setdefault(name, {})[seed] = record["curves"]
            settings.setdefault(name, {})[seed] = record["settings"]
            values["fit_wall_s"] = record["fit_wall_s"]
            values["fit_peak_rss_mib"] = record["fit_peak_rss_mib"]
            lam = record["curves"].get("train/lambda")
            if lam:
                values["final_lambda"] = lam[-1][1]
        metrics.setdefault(name, {})[seed] = values
    return {
        "metrics": metrics,
        "evaluations": evaluations,
        "curves": curves,
        "run_settings": settings,
        "search": done["select"],
        "timings": {f"seed{s}": p.timings for s, p in pipes.items()},
        "peak_rss_mib": {f"seed{s}": p.peak_rss_mib for s, p in pipes.items()},
        "score_models": {s: p.score_model_tests() for s, p in pipes.items()} if bench.model_tests else {},
        "wall_s": wall,
        "cpu_s": cpu,
    }
