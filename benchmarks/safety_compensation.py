"""Safety compensation on SafetyWorld: PPO, Safe RLHF's PPO-Lagrangian and RePO side by side (issue #4).

For every seed the benchmark trains the SFT, reward and cost models with the shipped stage configs
(``Pipeline.train_models``), then ``ppo``, ``ppo_lag`` and ``repo`` from the same SFT start with the same rollout
budget, and evaluates the SFT start and each policy with the ground-truth oracles on SafetyWorld's held-out prompts
(``k`` samples per prompt). Every stage is an ordinary ``python -m repo_lightning`` run of
``<config-dir>/<stage>.yaml``; the benchmark only adds orchestration: seeds, the multiplier search, ablations,
aggregation over seeds, a table and plots.

Multiplier search (fair settings). On the search seed only (default 0), each constrained algorithm trains the
candidates of its own small grid (``SEARCH_GRID``; the first ``--search-candidates`` of each), each once. Every
candidate is scored on the *validation* prompts (the slice of the RL prompt pool that ``data.val_fraction`` holds
out, one sample per prompt, computed at the end of training over the whole split) and the same rule picks the
winner for both algorithms: lowest ``val/true_unsafe_prompt_frac``; candidates within ``--tie`` of the lowest are
ranked by higher ``val/true_reward_mean``. The held-out evaluation prompts (other template/verb combinations) are
never used for the choice. The winner's seed-0 run is reused as that seed's reported run; other seeds retrain.

Ablations (RePO with the searched multiplier settings, one knob changed; not searched themselves):
``rectify: prompt`` instead of ``sample``, and the dual rules ``additive`` and ``pid`` instead of ``log``. They run on
the search seed only unless ``--ablation-seeds`` says otherwise: with them on all three seeds the default run took
about 40 minutes on two shared CPU cores, over the 30-minute budget.

Outputs in ``--out``: ``results.json`` (every run's metrics, per-seed values, the search log, settings, wall
times), ``results.md`` (mean +- std over seeds) and PNG plots (multiplier and true unsafe-prompt share over
training, per-prompt cost histograms).

Examples::

    python benchmarks/safety_compensation.py                       # 3 seeds, default budget
    python benchmarks/safety_compensation.py --seeds 0 --no-ablations --policy-epochs 1
    python benchmarks/safety_compensation.py --world mild_severity=0.5 --out /tmp/sc
    python benchmarks/safety_compensation.py --small --out /tmp/sc-small   # CI-sized smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from matplotlib.figure import Figure  # noqa: E402

from repo_lightning.evaluation import read_results  # noqa: E402
from repo_lightning.pipeline import Pipeline  # noqa: E402

MARKER = ".safety_compensation"
METHODS = ("sft", "ppo", "ppo_lag", "repo")
CONSTRAINED = ("ppo_lag", "repo")

#: Candidate multiplier settings per algorithm, in the order they are tried (``--search-candidates N`` keeps the
#: first N). Each grid is the same half fraction of a 2x2x2 design: lagrange_lr in {0.1, 0.5} x lagrange_init in
#: {1, 3} x a third knob, with the third knob's level set by the other two, so that each level of each knob is tried
#: twice. The third knob is Safe RLHF's threshold ``d`` (0, the paper's, or -2, which on the learned cost scale of
#: a few units asks for a clearly negative mean cost: the obvious way to tighten Safe RLHF) and RePO's
#: ``lagrange_max`` (5 or 20). Both algorithms get the same (lagrange_lr, lagrange_init) pairs.
SEARCH_GRID: dict[str, list[dict[str, float]]] = {
    "ppo_lag": [
        {"lagrange_lr": 0.1, "lagrange_init": 1.0, "threshold": 0.0},
        {"lagrange_lr": 0.5, "lagrange_init": 3.0, "threshold": 0.0},
        {"lagrange_lr": 0.5, "lagrange_init": 1.0, "threshold": -2.0},
        {"lagrange_lr": 0.1, "lagrange_init": 3.0, "threshold": -2.0},
    ],
    "repo": [
        {"lagrange_lr": 0.1, "lagrange_init": 1.0, "lagrange_max": 5.0},
        {"lagrange_lr": 0.5, "lagrange_init": 3.0, "lagrange_max": 5.0},
        {"lagrange_lr": 0.5, "lagrange_init": 1.0, "lagrange_max": 20.0},
        {"lagrange_lr": 0.1, "lagrange_init": 3.0, "lagrange_max": 20.0},
    ],
}

#: RePO variants: name -> (label, extra module overrides on top of the searched settings).
ABLATIONS: dict[str, tuple[str, dict[str, object]]] = {
    "repo_rectify_prompt": ("rectify: prompt", {"rectify": "prompt"}),
    "repo_dual_additive": ("dual_rule: additive", {"dual_rule": "additive"}),
    "repo_dual_pid": ("dual_rule: pid", {"dual_rule": "pid"}),
}

#: Table rows: (label, ground-truth key of metrics.json or ``final_lambda``, learned-model key or None).
TABLE_ROWS: list[tuple[str, str, str | None]] = [
    ("mean reward: benign", "true_reward_mean/benign", "reward_mean/benign"),
    ("mean reward: hazard", "true_reward_mean/hazard", "reward_mean/hazard"),
    ("mean cost (what Safe RLHF constrains)", "true_cost_mean", "cost_mean"),
    ("unsafe response rate", "true_unsafe_response_rate", "unsafe_response_rate"),
    ("unsafe prompt rate: hazard_mild", "true_unsafe_prompt_rate/hazard_mild", "unsafe_prompt_rate/hazard_mild"),
    (
        "unsafe prompt rate: hazard_severe",
        "true_unsafe_prompt_rate/hazard_severe",
        "unsafe_prompt_rate/hazard_severe",
    ),
    ("over-refusal (benign)", "over_refusal_rate", None),
    ("final multiplier", "final_lambda", None),
    ("KL to reference (nats)", "kl_mean", None),
]

VAL_UNSAFE, VAL_REWARD = "val/true_unsafe_prompt_frac", "val/true_reward_mean"
CURVE_TAGS = ("train/lambda", "train/true_unsafe_prompt_frac", "train/unsafe_prompt_frac")


# ------------------------------------------------------------------------------------------------ small helpers
def overrides(settings: dict[str, object]) -> list[str]:
    """``{"lagrange_lr": 0.5}`` -> ``["--model.init_args.lagrange_lr=0.5"]``."""
    return [f"--model.init_args.{key}={value}" for key, value in settings.items()]


def select_candidate(candidates: list[dict], tie: float) -> int:
    """Index of the winner: lowest val true unsafe-prompt share, ties within ``tie`` by higher val true reward."""
    best = min(c["val"][VAL_UNSAFE] for c in candidates)
    pool = [i for i, c in enumerate(candidates) if c["val"][VAL_UNSAFE] <= best + tie]
    return max(pool, key=lambda i: (candidates[i]["val"][VAL_REWARD], -i))


def read_scalars(run_dir: Path, tags: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """``(step, value)`` series of ``tags`` from a run's TensorBoard events.

    A run folder holds one ``version_*`` per CLI call (``fit``, then the ``test`` of the evaluation); each tag is
    read from the newest version that logged it.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    versions = sorted(run_dir.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    if not versions:
        raise FileNotFoundError(f"no TensorBoard run under {run_dir}")
    found: dict[str, list[tuple[int, float]]] = {}
    for version in versions:
        events = EventAccumulator(str(version), size_guidance={"scalars": 0})
        events.Reload()
        present = set(events.Tags()["scalars"])
        found.update({tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags if tag in present})
    return found


def ablation_settings(chosen: dict, name: str) -> dict[str, object]:
    """RePO's searched settings with the ablation's knob changed.

    The PID rule has no step size: its integral gain takes the searched ``lagrange_lr`` and its proportional gain
    is 1 (not searched).
    """
    settings = {**chosen["repo"]["settings"], **ABLATIONS[name][1]}
    if settings.get("dual_rule") == "pid":
        settings.update(pid_ki=settings["lagrange_lr"], pid_kp=1.0)
    return settings


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def policy_budget(config_dir: Path, algorithm: str) -> dict[str, object]:
    """The knobs of a policy config that set its rollout budget (to check the algorithms get the same)."""
    config = yaml.safe_load((config_dir / f"{algorithm}.yaml").read_text())
    trainer, data = config.get("trainer", {}), config.get("data", {})
    model = config.get("model", {}).get("init_args", {})
    budget = {f"trainer.{k}": trainer.get(k) for k in ("max_epochs", "max_steps", "limit_train_batches")}
    budget.update({f"data.{k}": data.get(k) for k in ("batch_size", "val_fraction")})
    budget.update({f"model.{k}": model.get(k) for k in ("samples_per_prompt", "max_new_tokens", "ppo_epochs")})
    return budget


# ------------------------------------------------------------------------------------------------ scheduling
@dataclass
class Task:
    """One unit of work (a few stage subprocesses) and the names of the tasks it waits for."""

    name: str
    run: Callable[[], object]
    after: tuple[str, ...] = ()


def run_tasks(tasks: list[Task], jobs: int) -> dict[str, object]:
    """Run ``tasks`` on ``jobs`` threads as their dependencies finish, in list order; returns name -> result."""
    results: dict[str, object] = {}
    pending = list(tasks)
    running: dict[Future, str] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            for task in [t for t in pending if all(d in results for d in t.after)]:
                if len(running) >= jobs:
                    break
                pending.remove(task)
                running[pool.submit(task.run)] = task.name
            if not running:
                raise RuntimeError(f"unsatisfiable dependencies: {[t.name for t in pending]}")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                name = running.pop(future)
                try:
                    results[name] = future.result()
                except Exception:
                    pending.clear()  # let running tasks finish, start nothing new
                    raise
    return results


# ------------------------------------------------------------------------------------------------ the benchmark
@dataclass
class Benchmark:
    """Everything one invocation runs; see the module docstring."""

    out: Path
    config_dir: Path
    seeds: list[int]
    search_seed: int
    search_candidates: int
    tie: float
    ablations: list[str]
    ablation_seeds: list[int]
    jobs: int
    model_tests: bool = False
    world: list[str] = field(default_factory=list)
    stage_extra: dict[str, list[str]] = field(default_factory=dict)
    policy_extra: list[str] = field(default_factory=list)
    log: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def pipeline(self, seed: int) -> Pipeline:
        extra = {stage: list(args) for stage, args in self.stage_extra.items()}
        extra["world"] = [f"--data.world.{kv}" for kv in self.world] + [f"--data.cache_dir={self.out / 'cache'}"]
        # The policy's validation metrics decide the search: compute them at the end of every epoch (hence at the
        # end of fit) over the whole validation split, and skip the sanity check.
        extra["policy"] = [
            "--trainer.val_check_interval=1.0",
            "--trainer.limit_val_batches=1.0",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.enable_progress_bar=false",
            *self.policy_extra,
            *extra.get("policy", []),
        ]
        return Pipeline(self.out / "runs" / f"seed{seed}", self.config_dir, seed, extra, quiet=True)

    def run(self) -> dict:
        pipes = {seed: self.pipeline(seed) for seed in self.seeds}
        search: dict[str, list[dict]] = {alg: [] for alg in CONSTRAINED}
        chosen: dict[str, dict] = {}
        curves: dict[str, dict[int, dict]] = {}
        evals: dict[str, dict[int, Path]] = {}

        def note(kind: str, seed: int, value) -> None:
            with self._lock:
                print(f"[{time.strftime('%H:%M:%S')}] done: {kind} seed {seed}", flush=True)
                if kind == "eval":
                    name, path = value
                    evals.setdefault(name, {})[seed] = path

        def models(seed: int) -> Callable[[], None]:
            def go() -> None:
                pipes[seed].train_models(test=self.model_tests)
                note("models", seed, None)

            return go

        def sft(seed: int) -> Callable[[], None]:
            return lambda: note("eval", seed, ("sft", pipes[seed].evaluate_start()))

        def method(seed: int, name: str, algorithm: str, extra: Callable[[], list[str]]) -> Callable[[], None]:
            def go() -> None:
                args = extra()
                reuse = chosen.get(name, {}).get("run_name") if seed == self.search_seed else None
                if reuse is not None:  # the winning search run of this seed is this seed's run
                    path = pipes[seed].evaluate_policy(algorithm, reuse, args)
                    run_dir = pipes[seed].root / "logs" / f"policy_{reuse}"
                else:
                    path = pipes[seed].train_policy(algorithm, name, args)
                    run_dir = pipes[seed].root / "logs" / f"policy_{name}"
                curves.setdefault(name, {})[seed] = read_scalars(run_dir, CURVE_TAGS)
                note("eval", seed, (name, path))

            return go

        def candidate(algorithm: str, index: int, settings: dict) -> Callable[[], None]:
            def go() -> None:
                pipe, run_name = pipes[self.search_seed], f"search_{algorithm}_{index}"
                start = time.perf_counter()
                run_dir = pipe.fit_policy(algorithm, run_name, overrides(settings))
                tags = (VAL_UNSAFE, VAL_REWARD, "val/true_unsafe_frac", "val/unsafe_prompt_frac", "train/lambda")
                scalars = read_scalars(run_dir, tags)
                missing = [t for t in (VAL_UNSAFE, VAL_REWARD) if t not in scalars]
                if missing:
                    raise RuntimeError(f"{run_name}: no {missing} logged; is validation run at the end of fit?")
                entry = {
                    "index": index,
                    "run_name": run_name,
                    "settings": settings,
                    "val": {tag: values[-1][1] for tag, values in scalars.items() if tag.startswith("val/")},
                    "val_step": scalars[VAL_UNSAFE][-1][0],
                    "final_lambda": scalars["train/lambda"][-1][1] if "train/lambda" in scalars else None,
                    "wall_s": time.perf_counter() - start,
                }
                with self._lock:
                    search[algorithm].append(entry)

            return go

        def select() -> None:
            for algorithm, candidates in search.items():
                candidates.sort(key=lambda c: c["index"])
                winner = candidates[select_candidate(candidates, self.tie)]
                chosen[algorithm] = winner
                print(f"selected {algorithm}: {winner['settings']} (val {winner['val']})", flush=True)

        def settings_of(algorithm: str, more: dict | None = None) -> Callable[[], list[str]]:
            return lambda: overrides({**chosen[algorithm]["settings"], **(more or {})})

        s0 = self.search_seed
        tasks = [Task(f"models/{s0}", models(s0))]
        grid = {alg: SEARCH_GRID[alg][: self.search_candidates] for alg in CONSTRAINED}
        for i in range(self.search_candidates):
            for alg in CONSTRAINED:
                if i < len(grid[alg]):
                    tasks.append(Task(f"search/{alg}/{i}", candidate(alg, i, grid[alg][i]), (f"models/{s0}",)))
        searched = tuple(t.name for t in tasks if t.name.startswith("search/"))
        tasks.append(Task("select", select, searched))
        tasks += [Task(f"models/{s}", models(s)) for s in self.seeds if s != s0]
        for seed in self.seeds:
            ready = (f"models/{seed}",)
            tasks.append(Task(f"sft/{seed}", sft(seed), ready))
            tasks.append(Task(f"ppo/{seed}", method(seed, "ppo", "ppo", list), ready))
            for alg in CONSTRAINED:
                tasks.append(Task(f"{alg}/{seed}", method(seed, alg, alg, settings_of(alg)), (*ready, "select")))
            for name in self.ablations if seed in self.ablation_seeds else ():
                task = method(seed, name, "repo", lambda name=name: overrides(ablation_settings(chosen, name)))
                tasks.append(Task(f"{name}/{seed}", task, (*ready, "select")))

        start = time.perf_counter()
        cpu_start = resource.getrusage(resource.RUSAGE_CHILDREN)
        run_tasks(tasks, self.jobs)
        wall = time.perf_counter() - start
        cpu_end = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (cpu_end.ru_utime + cpu_end.ru_stime) - (cpu_start.ru_utime + cpu_start.ru_stime)
        metrics = {
            name: {seed: json.loads((path / "metrics.json").read_text()) for seed, path in by_seed.items()}
            for name, by_seed in evals.items()
        }
        for name, by_seed in metrics.items():
            for seed, values in by_seed.items():
                lam = curves.get(name, {}).get(seed, {}).get("train/lambda")
                if lam and name != "ppo":
                    values["final_lambda"] = lam[-1][1]
        return {
            "metrics": metrics,
            "evaluations": {n: {s: str(p) for s, p in d.items()} for n, d in evals.items()},
            "curves": curves,
            "search": {"log": search, "chosen": chosen},
            "timings": {f"seed{s}": p.timings for s, p in pipes.items()},
            "score_models": {s: p.score_model_tests() for s, p in pipes.items()} if self.model_tests else {},
            "wall_s": wall,
            "cpu_s": cpu,
        }


# ------------------------------------------------------------------------------------------------ report
def cell(values: list[float]) -> str:
    """``mean ± std`` of the seeds' values (just the value for one seed)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    mean, std = mean_std(values)
    return f"{mean:.3f} ± {std:.3f}"


def only_seeds(by_name: dict[str, dict], seeds: list[int]) -> dict[str, dict]:
    """The per-seed entries of ``seeds`` only (so that columns of a table compare the same seeds)."""
    return {name: {s: v for s, v in by_seed.items() if s in seeds} for name, by_seed in by_name.items()}


def table(metrics: dict[str, dict], names: list[str], learned: bool) -> str:
    """Markdown table, one column per method (``n`` = seeds), ``mean ± std`` over seeds."""
    header = [f"{name} (n={len(metrics.get(name, {}))})" for name in names]
    lines = ["| metric | " + " | ".join(header) + " |", "|---|" + "---:|" * len(names)]
    for label, truth_key, learned_key in TABLE_ROWS:
        key = learned_key if learned else truth_key
        if key is None:
            continue
        cells = []
        for name in names:
            values = [m[key] for m in metrics.get(name, {}).values() if key in m]
            cells.append(cell(values))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


COLOURS = {
    "sft": "tab:gray",
    "ppo": "tab:blue",
    "ppo_lag": "tab:orange",
    "repo": "tab:green",
    "repo_rectify_prompt": "tab:purple",
    "repo_dual_additive": "tab:brown",
    "repo_dual_pid": "tab:pink",
}


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over at most ``window`` values (``window`` 1 returns ``values``)."""
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def per_seed_table(metrics: dict[str, dict], names: list[str], keys: list[tuple[str, str]]) -> str:
    """One row per (method, seed): the given metrics, to read paired differences between methods."""
    lines = ["| method | seed | " + " | ".join(label for label, _ in keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    for name in names:
        for seed, values in sorted(metrics.get(name, {}).items()):
            cells = ["-" if key not in values else f"{values[key]:.3f}" for _, key in keys]
            lines.append(f"| {name} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cost_model_agreement(evaluations: dict[str, dict], kind: str) -> dict[str, dict[str, float]]:
    """How the learned cost model's ``C > 0`` agrees with the truth ``C* > 0`` on the responses to ``kind`` prompts.

    Pooled over seeds, per method: ``true_unsafe`` and ``learned_unsafe`` response shares, ``missed`` (share of the
    truly unsafe responses the cost model calls safe: a policy that exploits the cost model drives it up) and
    ``false_alarm`` (share of the truly safe responses it calls unsafe).
    """
    out = {}
    for name, by_seed in evaluations.items():
        pairs = [
            (c > 0, t > 0)
            for path in by_seed.values()
            for r in read_results(Path(path) / "per_prompt.jsonl")
            if r.kind == kind
            for c, t in zip(r.costs, r.true_costs or [], strict=True)
        ]
        unsafe = [learned for learned, true in pairs if true]
        safe = [learned for learned, true in pairs if not true]
        out[name] = {
            "responses": len(pairs),
            "true_unsafe": len(unsafe) / max(1, len(pairs)),
            "learned_unsafe": sum(learned for learned, _ in pairs) / max(1, len(pairs)),
            "missed": (len(unsafe) - sum(unsafe)) / max(1, len(unsafe)),
            "false_alarm": sum(safe) / max(1, len(safe)),
        }
    return out


def plot_curves(curves: dict, names: list[str], tag: str, ylabel: str, path: Path, smooth: int = 1) -> Path:
    """One line per method: the mean over seeds of a training scalar, with the min-max band over seeds.

    With ``smooth`` > 1 each seed's series is first averaged over a trailing window of that many iterations.
    """
    fig = Figure(figsize=(6.5, 4.0))
    ax = fig.add_subplot()
    for name in names:
        series = [s[tag] for s in curves.get(name, {}).values() if tag in s]
        if not series:
            continue
        length = min(len(s) for s in series)
        steps = [step for step, _ in series[0][:length]]
        values = [moving_average([v for _, v in s[:length]], smooth) for s in series]
        mean = [statistics.fmean(col) for col in zip(*values, strict=True)]
        colour = COLOURS.get(name)
        ax.plot(steps, mean, label=f"{name} (n={len(series)})", color=colour)
        low = [min(col) for col in zip(*values, strict=True)]
        high = [max(col) for col in zip(*values, strict=True)]
        ax.fill_between(steps, low, high, color=colour, alpha=0.2)
    if smooth > 1:
        ax.set_title(f"mean over seeds (band: min-max), {smooth}-iteration moving average", fontsize="small")
    else:
        ax.set_title("mean over seeds (band: min-max)", fontsize="small")
    ax.set_xlabel("training iteration")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return path


def plot_cost_histograms(evaluations: dict[str, dict], names: list[str], path: Path) -> Path:
    """Per-prompt mean cost (ground truth, top; learned, bottom) per method, by topic kind, pooled over seeds."""
    kinds = {"benign": "tab:green", "hazard_mild": "tab:orange", "hazard_severe": "tab:red"}
    names = [n for n in names if evaluations.get(n)]
    fig = Figure(figsize=(3.2 * len(names), 5.5))
    axes = fig.subplots(2, len(names), squeeze=False, sharey="row")
    for col, name in enumerate(names):
        results = [r for p in evaluations[name].values() for r in read_results(Path(p) / "per_prompt.jsonl")]
        for row, (attr, title) in enumerate((("true_costs", "true C*"), ("costs", "learned C"))):
            ax = axes[row][col]
            groups = {k: [statistics.fmean(getattr(r, attr)) for r in results if r.kind == k] for k in kinds}
            groups = {k: v for k, v in groups.items() if v}
            ax.hist(list(groups.values()), bins=20, stacked=True, color=[kinds[k] for k in groups], label=list(groups))
            ax.axvline(0.0, color="black", linestyle="--", linewidth=1.0)
            ax.set_title(f"{name}: {title}", fontsize="small")
            ax.set_xlabel("per-prompt mean cost", fontsize="small")
    axes[0][0].set_ylabel("prompts")
    axes[1][0].set_ylabel("prompts")
    axes[0][0].legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return path


def write_outputs(bench: Benchmark, results: dict, settings: dict) -> dict:
    """``results.json``, ``results.md`` and the plots in ``bench.out``; returns the paths of the plots."""
    out, metrics = bench.out, results["metrics"]
    ablation_names = ["repo", *bench.ablations]
    ablation_metrics = only_seeds(metrics, bench.ablation_seeds)
    ablation_curves = only_seeds(results["curves"], bench.ablation_seeds)
    ablation_evals = only_seeds(results["evaluations"], bench.ablation_seeds)
    plots = {
        "multiplier": plot_curves(
            results["curves"], list(CONSTRAINED), "train/lambda", "multiplier λ", out / "multiplier.png"
        ),
        "unsafe_prompt_share": plot_curves(
            results["curves"],
            ["ppo", *CONSTRAINED],
            "train/true_unsafe_prompt_frac",
            "true unsafe prompt share (rollouts)",
            out / "unsafe_prompt_share.png",
            smooth=5,
        ),
        "cost_histograms": plot_cost_histograms(results["evaluations"], list(METHODS), out / "cost_histograms.png"),
    }
    if bench.ablations:
        plots["ablation_multiplier"] = plot_curves(
            ablation_curves, ablation_names, "train/lambda", "multiplier λ", out / "ablation_multiplier.png"
        )
        plots["ablation_unsafe_prompt_share"] = plot_curves(
            ablation_curves,
            ablation_names,
            "train/true_unsafe_prompt_frac",
            "true unsafe prompt share (rollouts)",
            out / "ablation_unsafe_prompt_share.png",
            smooth=5,
        )
        plots["ablation_cost_histograms"] = plot_cost_histograms(
            ablation_evals, ablation_names, out / "ablation_cost_histograms.png"
        )
    results["plots"] = {k: str(v) for k, v in plots.items()}
    results["settings"] = settings
    summary = {
        name: {
            key: dict(zip(("mean", "std"), mean_std([m[key] for m in by_seed.values() if key in m]), strict=True))
            for key in {k for m in by_seed.values() for k in m}
            if all(key in m for m in by_seed.values())
        }
        for name, by_seed in metrics.items()
    }
    results["summary"] = summary
    agreement = cost_model_agreement(results["evaluations"], "hazard_mild")
    results["cost_model_agreement/hazard_mild"] = agreement
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")

    seeds = ", ".join(str(s) for s in bench.seeds)
    search_lines = []
    for alg, candidates in results["search"]["log"].items():
        for c in candidates:
            mark = " **(selected)**" if c["run_name"] == results["search"]["chosen"][alg]["run_name"] else ""
            knobs = ", ".join(f"{k}={v}" for k, v in c["settings"].items())
            lam = "-" if c["final_lambda"] is None else f"{c['final_lambda']:.3f}"
            learned = c["val"].get("val/unsafe_prompt_frac")
            learned = "-" if learned is None else f"{learned:.3f}"
            search_lines.append(
                f"| {alg} | {knobs}{mark} | {c['val'][VAL_UNSAFE]:.3f} | {learned} | {c['val'][VAL_REWARD]:.3f} "
                f"| {lam} |"
            )
    ablation_labels = ", ".join(f"`{n}` = {ABLATIONS[n][0]}" for n in bench.ablations) or "none"
    text = [
        "# Safety compensation on SafetyWorld",
        "",
        f"Seeds {seeds}; mean ± std (sample std) over seeds; held-out evaluation prompts, "
        f"k = {settings['eval_k']} samples per prompt. Wall time {results['wall_s'] / 60:.1f} min with "
        f"{bench.jobs} job(s); CPU time of all stages {results['cpu_s'] / 60:.1f} min.",
        "",
        "## Ground truth (oracles R*, C*)",
        "",
        table(metrics, list(METHODS), learned=False),
        "## As judged by the learned reward / cost models",
        "",
        table(metrics, list(METHODS), learned=True),
        "## Per seed",
        "",
        per_seed_table(
            metrics,
            list(METHODS),
            [
                ("true unsafe prompt rate: hazard_mild", "true_unsafe_prompt_rate/hazard_mild"),
                ("learned", "unsafe_prompt_rate/hazard_mild"),
                ("true unsafe prompt rate: hazard_severe", "true_unsafe_prompt_rate/hazard_severe"),
                ("true mean reward: benign", "true_reward_mean/benign"),
                ("final multiplier", "final_lambda"),
            ],
        ),
        "## Is the learned cost model fooled? (responses to hazard_mild prompts, pooled over seeds)",
        "",
        "| method | responses | true unsafe | learned unsafe | missed (true unsafe, learned safe) | false alarm |",
        "|---|---:|---:|---:|---:|---:|",
        *[
            f"| {name} | {a['responses']} | {a['true_unsafe']:.3f} | {a['learned_unsafe']:.3f} | {a['missed']:.3f} "
            f"| {a['false_alarm']:.3f} |"
            for name, a in agreement.items()
        ],
        "",
        "## Ablations (RePO, searched multiplier settings, one knob changed)",
        "",
        ablation_labels,
        "",
    ]
    if bench.ablations:
        text += [
            f"Seeds {', '.join(str(s) for s in bench.ablation_seeds)} (RePO's column restricted to the same seeds).",
            "",
            table(ablation_metrics, ablation_names, learned=False),
            "As judged by the learned models:",
            "",
            table(ablation_metrics, ablation_names, learned=True),
        ]
    text += [
        f"## Multiplier search (seed {bench.search_seed}, validation prompts)",
        "",
        f"Rule: lowest `{VAL_UNSAFE}`, ties within {bench.tie} broken by higher `{VAL_REWARD}`.",
        "",
        "| algorithm | settings | val true unsafe prompt share | (learned) | val true reward | final λ |",
        "|---|---|---:|---:|---:|---:|",
        *search_lines,
        "",
        "## Plots",
        "",
        *[f"- [{name}]({Path(path).name})" for name, path in plots.items()],
        "",
    ]
    (out / "results.md").write_text("\n".join(text))
    return plots


# ------------------------------------------------------------------------------------------------ command line
SMALL_WORLD = [
    "num_topics=6",
    "num_sft_rows=64",
    "num_preference_rows=64",
    "num_rl_prompts=48",
    "num_eval_prompts=16",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/out/safety_compensation", help="output folder (%(default)s)")
    parser.add_argument("--config-dir", default=str(REPO_ROOT / "configs" / "demo"), help="stage configs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--search-seed", type=int, default=None, help="seed of the search (default: first seed)")
    parser.add_argument("--search-candidates", type=int, default=4, help="grid points per algorithm (max 4)")
    parser.add_argument("--tie", type=float, default=0.02, help="tie margin of the selection rule (%(default)s)")
    parser.add_argument("--world", nargs="+", default=[], metavar="KEY=VALUE", help="WorldConfig fields")
    parser.add_argument("--policy-epochs", type=int, default=None, help="trainer.max_epochs of every policy")
    parser.add_argument("--policy-batches", type=int, default=None, help="trainer.limit_train_batches of policies")
    parser.add_argument("--eval-k", type=int, default=None, help="samples per held-out prompt (default: config)")
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
        "--ablation-seeds",
        type=int,
        nargs="+",
        default=None,
        help="seeds of the ablations (default: the search seed only, to keep the default run under 30 min)",
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
        "--report-only", action="store_true", help="only rewrite results.md and the plots from --out/results.json"
    )
    parser.add_argument(
        "--small", action="store_true", help="CI-sized: tiny world, 2 batches per stage, 1 seed, 2 candidates"
    )
    args = parser.parse_args(argv)
    if args.small:
        args.seeds = args.seeds if argv and "--seeds" in argv else [0]
        args.search_candidates = min(args.search_candidates, 2)
        args.world = [*SMALL_WORLD, *args.world]
        args.policy_batches = args.policy_batches or 2
        args.policy_epochs = args.policy_epochs or 1
        args.eval_k = args.eval_k or 2
        small = []
        for stage in ("sft", "reward", "cost"):
            small += [f"{stage}:--trainer.max_epochs=1", f"{stage}:--trainer.limit_train_batches=2"]
        small += ["policy:--data.batch_size=8", "policy:--model.init_args.minibatch_size=16"]
        args.extra = [*small, *args.extra]
    return args


def rerender(out: Path) -> dict:
    """Rewrite ``results.md`` and the plots from ``out/results.json`` (the run folders must still be there)."""
    results = json.loads((out / "results.json").read_text())
    for key in ("metrics", "curves", "evaluations"):
        results[key] = {name: {int(s): v for s, v in by_seed.items()} for name, by_seed in results[key].items()}
    settings = results["settings"]
    bench = Benchmark(
        out=out,
        config_dir=Path("."),
        seeds=settings["seeds"],
        search_seed=settings["search_seed"],
        search_candidates=len(next(iter(settings["search_grid"].values()))),
        tie=float(settings.get("tie", 0.02)),
        ablations=list(settings["ablations"]),
        ablation_seeds=settings.get("ablation_seeds", settings["seeds"]),
        jobs=settings["jobs"],
    )
    write_outputs(bench, results, settings)
    return results


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the content of ``results.json``."""
    args = parse_args(argv)
    if args.report_only:
        return rerender(Path(args.out))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.jobs > 1:  # share the cores between the concurrent stages instead of oversubscribing them
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise SystemExit(f"{out} exists and was not written by this benchmark; choose another --out")
    shutil.rmtree(out / "runs", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by benchmarks/safety_compensation.py\n")

    stage_extra: dict[str, list[str]] = {}
    for item in args.extra:
        stage, _, arg = item.partition(":")
        if stage not in ("sft", "reward", "cost", "policy") or not arg:
            raise SystemExit(f"--extra expects STAGE:ARG with STAGE in sft, reward, cost, policy; got {item!r}")
        stage_extra.setdefault(stage, []).append(arg)
    policy_extra = []
    if args.policy_epochs is not None:
        policy_extra.append(f"--trainer.max_epochs={args.policy_epochs}")
    if args.policy_batches is not None:
        policy_extra.append(f"--trainer.limit_train_batches={args.policy_batches}")
    if args.eval_k is not None:
        policy_extra.append(f"--model.init_args.eval_samples_per_prompt={args.eval_k}")

    config_dir = Path(args.config_dir)
    budgets = {alg: policy_budget(config_dir, alg) for alg in ("ppo", *CONSTRAINED)}
    unequal = {alg: b for alg, b in budgets.items() if b != budgets["ppo"]}
    if unequal:
        print(f"WARNING: the policy configs set different rollout budgets: {budgets}", flush=True)
    eval_k = args.eval_k or yaml.safe_load((config_dir / "repo.yaml").read_text())["model"]["init_args"].get(
        "eval_samples_per_prompt", 4
    )
    search_seed = args.seeds[0] if args.search_seed is None else args.search_seed
    if search_seed not in args.seeds or not set(args.ablation_seeds or []) <= set(args.seeds):
        raise SystemExit("--search-seed and --ablation-seeds must be among --seeds")
    bench = Benchmark(
        out=out,
        config_dir=config_dir,
        seeds=args.seeds,
        search_seed=search_seed,
        search_candidates=min(args.search_candidates, min(len(g) for g in SEARCH_GRID.values())),
        tie=args.tie,
        ablations=args.ablations,
        ablation_seeds=args.ablation_seeds or [search_seed],
        jobs=args.jobs,
        model_tests=args.model_tests,
        world=args.world,
        stage_extra=stage_extra,
        policy_extra=policy_extra,
    )
    settings = {
        "command": " ".join(
            ["python", "benchmarks/safety_compensation.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "seeds": bench.seeds,
        "search_seed": bench.search_seed,
        "search_grid": {alg: SEARCH_GRID[alg][: bench.search_candidates] for alg in CONSTRAINED},
        "selection_rule": f"min {VAL_UNSAFE}; within {bench.tie} of the min, max {VAL_REWARD}",
        "tie": bench.tie,
        "ablations": {n: ABLATIONS[n][1] for n in bench.ablations},
        "ablation_seeds": bench.ablation_seeds,
        "world": args.world,
        "stage_extra": stage_extra,
        "policy_extra": policy_extra,
        "policy_budgets": budgets,
        "eval_k": eval_k,
        "jobs": args.jobs,
        "config_mtimes": {
            p.name: time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(p.stat().st_mtime))
            for p in sorted(config_dir.glob("*.yaml"))
        },
    }
    results = bench.run()
    write_outputs(bench, results, settings)
    print((out / "results.md").read_text())
    print(f"total wall time: {results['wall_s'] / 60:.1f} min; outputs in {out}")
    return results


if __name__ == "__main__":
    main()
