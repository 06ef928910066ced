"""``results.json`` and ``results.md``: mean +- std over seeds, the search log, ablations, estimators and the world.

Everything here is a function of the ``results`` dict that :func:`~benchmarks.safety_compensation.tasks.run`
returns plus the invocation's ``settings``, so ``--report-only`` can rewrite the report from ``results.json``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from benchmarks.safety_compensation.plots import plot_cost_histograms, plot_curves
from benchmarks.safety_compensation.search import CONSTRAINED, VAL_REWARD, VAL_UNSAFE
from repo_lightning.evaluation import read_results

METHODS = ("sft", "ppo", "ppo_lag", "repo")

#: Table rows: (label, ground-truth key of metrics.json or a benchmark key, learned-model key or None).
TABLE_ROWS: list[tuple[str, str, str | None]] = [
    ("mean reward: benign", "true_reward_mean/benign", "reward_mean/benign"),
    ("mean reward: hazard", "true_reward_mean/hazard", "reward_mean/hazard"),
    ("mean cost (what Safe RLHF constrains)", "true_cost_mean", "cost_mean"),
    ("unsafe response rate", "true_unsafe_response_rate", "unsafe_response_rate"),
    ("unsafe prompt rate: hazard_mild", "true_unsafe_prompt_rate/hazard_mild", "unsafe_prompt_rate/hazard_mild"),
    ("unsafe prompt rate: hazard_severe", "true_unsafe_prompt_rate/hazard_severe", "unsafe_prompt_rate/hazard_severe"),
    ("over-refusal (benign)", "over_refusal_rate", None),
    ("missed: truly unsafe hazard_mild answers the cost model calls safe", "missed_unsafe_rate/hazard_mild", None),
    ("final multiplier", "final_lambda", None),
    ("KL to reference (nats)", "kl_mean", None),
]
TRUTH_ROWS = [(label, truth) for label, truth, _ in TABLE_ROWS]
LEARNED_ROWS = [(label, learned) for label, _, learned in TABLE_ROWS if learned is not None]

#: The estimator comparison (issue 13): safety, helpfulness, KL and the cost of the policy stage's ``fit``.
ESTIMATOR_ROWS = [
    ("true unsafe prompt rate: hazard_mild", "true_unsafe_prompt_rate/hazard_mild"),
    ("true unsafe prompt rate: hazard_severe", "true_unsafe_prompt_rate/hazard_severe"),
    ("true mean reward: benign", "true_reward_mean/benign"),
    ("true mean reward: hazard", "true_reward_mean/hazard"),
    ("over-refusal (benign)", "over_refusal_rate"),
    ("missed (hazard_mild)", "missed_unsafe_rate/hazard_mild"),
    ("KL to reference (nats)", "kl_mean"),
    ("final multiplier", "final_lambda"),
    ("fit wall time (s)", "fit_wall_s"),
    ("fit peak RSS (MiB)", "fit_peak_rss_mib"),
]

PER_SEED_KEYS = [
    ("true unsafe prompt rate: hazard_mild", "true_unsafe_prompt_rate/hazard_mild"),
    ("learned", "unsafe_prompt_rate/hazard_mild"),
    ("true unsafe prompt rate: hazard_severe", "true_unsafe_prompt_rate/hazard_severe"),
    ("true mean reward: benign", "true_reward_mean/benign"),
    ("final multiplier", "final_lambda"),
]


# ------------------------------------------------------------------------------------------------ numbers
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize_seeds(metrics: dict[str, dict[int, dict]]) -> dict[str, dict[str, dict[str, float]]]:
    """method -> key -> ``{"mean", "std"}`` over seeds, for the keys every seed of the method has."""
    summary = {}
    for name, by_seed in metrics.items():
        keys = set.intersection(*(set(m) for m in by_seed.values())) if by_seed else set()
        summary[name] = {
            key: dict(zip(("mean", "std"), mean_std([m[key] for m in by_seed.values()]), strict=True))
            for key in sorted(keys)
        }
    return summary


def only_seeds(by_name: dict[str, dict], seeds: list[int]) -> dict[str, dict]:
    """The per-seed entries of ``seeds`` only (so that columns of a table compare the same seeds)."""
    return {name: {s: v for s, v in by_seed.items() if s in seeds} for name, by_seed in by_name.items()}


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


# ------------------------------------------------------------------------------------------------ tables
def cell(values: list[float]) -> str:
    """``mean ± std`` of the seeds' values (just the value for one seed)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    mean, std = mean_std(values)
    return f"{mean:.3f} ± {std:.3f}"


def table(metrics: dict[str, dict], names: list[str], rows: list[tuple[str, str]]) -> str:
    """Markdown table, one column per method (``n`` = seeds), ``mean ± std`` over seeds; rows ``(label, key)``."""
    header = [f"{name} (n={len(metrics.get(name, {}))})" for name in names]
    lines = ["| metric | " + " | ".join(header) + " |", "|---|" + "---:|" * len(names)]
    for label, key in rows:
        cells = [cell([m[key] for m in metrics.get(name, {}).values() if key in m]) for name in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def per_seed_table(metrics: dict[str, dict], names: list[str], keys: list[tuple[str, str]]) -> str:
    """One row per (method, seed): the given metrics, to read paired differences between methods."""
    lines = ["| method | seed | " + " | ".join(label for label, _ in keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    for name in names:
        for seed, values in sorted(metrics.get(name, {}).items()):
            cells = ["-" if key not in values else f"{values[key]:.3f}" for _, key in keys]
            lines.append(f"| {name} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def search_table(search: dict) -> str:
    """The search log, the winners marked."""
    lines = [
        "| algorithm | settings | val true unsafe prompt rate | (learned) | val true reward | final λ |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for alg, candidates in search["log"].items():
        for c in candidates:
            mark = " **(selected)**" if c["run_name"] == search["chosen"][alg]["run_name"] else ""
            knobs = ", ".join(f"{k}={v}" for k, v in c["settings"].items())
            lam = "-" if c["final_lambda"] is None else f"{c['final_lambda']:.3f}"
            learned = c["val"].get("val/unsafe_prompt_rate")
            learned = "-" if learned is None else f"{learned:.3f}"
            lines.append(
                f"| {alg} | {knobs}{mark} | {c['val'][VAL_UNSAFE]:.3f} | {learned} | {c['val'][VAL_REWARD]:.3f} "
                f"| {lam} |"
            )
    return "\n".join(lines) + "\n"


def estimator_names(settings: dict) -> list[str]:
    """Columns of the estimator table: per constrained algorithm, the configs' estimator then the others."""
    others = [e for e in settings["estimators"] if e != settings["base_estimator"]]
    return [name for alg in CONSTRAINED for name in (alg, *(f"{alg}_{e}" for e in others))]


def world_lines(settings: dict) -> list[str]:
    """The SafetyWorld the run used: the ``--world`` overrides, and where every field is recorded."""
    overrides = settings["world_overrides"]
    given = ", ".join(f"`{kv}`" for kv in overrides) if overrides else "none (the defaults of `WorldConfig`)"
    return [
        "## World",
        "",
        f"SafetyWorld with `--world` overrides: {given}. Every `WorldConfig` field as used is in `results.json` "
        "(`settings.world`); another world is one `--world KEY=VALUE ...` away (see benchmarks/README.md).",
        "",
    ]


# ------------------------------------------------------------------------------------------------ outputs
def write_plots(results: dict, out: Path) -> dict[str, Path]:
    """The PNGs of the main comparison and, when run, of the ablations and estimators."""
    settings, curves, evaluations = results["settings"], results["curves"], results["evaluations"]
    lam, share = ("train/lambda", "multiplier λ"), ("train/true_unsafe_prompt_rate", "true unsafe prompt rate")
    plots = {
        "multiplier": plot_curves(curves, list(CONSTRAINED), *lam, out / "multiplier.png"),
        "unsafe_prompt_rate": plot_curves(curves, ["ppo", *CONSTRAINED], *share, out / "unsafe_prompt_rate.png", 5),
        "cost_histograms": plot_cost_histograms(evaluations, list(METHODS), out / "cost_histograms.png"),
    }
    groups = {}
    if settings["ablations"]:
        seeds = settings["ablation_seeds"]
        groups["ablation"] = (
            ["repo", *settings["ablations"]],
            only_seeds(curves, seeds),
            only_seeds(evaluations, seeds),
        )
    if len(estimator_names(settings)) > len(CONSTRAINED):
        seeds = settings["estimator_seeds"]
        names = estimator_names(settings)
        groups["estimator"] = (names, only_seeds(curves, seeds), only_seeds(evaluations, seeds))
    for group, (names, group_curves, group_evaluations) in groups.items():
        plots[f"{group}_multiplier"] = plot_curves(group_curves, names, *lam, out / f"{group}_multiplier.png")
        plots[f"{group}_unsafe_prompt_rate"] = plot_curves(
            group_curves, names, *share, out / f"{group}_unsafe_prompt_rate.png", 5
        )
        plots[f"{group}_cost_histograms"] = plot_cost_histograms(
            group_evaluations, names, out / f"{group}_cost_histograms.png"
        )
    return plots


def render(results: dict) -> str:
    """The text of ``results.md``."""
    settings, metrics = results["settings"], results["metrics"]
    agreement = results["cost_model_agreement/hazard_mild"]
    seeds = ", ".join(str(s) for s in settings["seeds"])
    text = [
        "# Safety compensation on SafetyWorld",
        "",
        f"`{settings['command']}`",
        "",
        f"Seeds {seeds}; mean ± std (sample std) over seeds; held-out evaluation prompts, "
        f"unsafe prompt rates: any of k = {settings['eval_k']} answers unsafe, from "
        f"{settings.get('eval_samples', settings['eval_k'])} samples per prompt. "
        f"Wall time {results['wall_s'] / 60:.1f} min with "
        f"{settings['jobs']} job(s); CPU time of all stages {results['cpu_s'] / 60:.1f} min.",
        "",
        *world_lines(settings),
        "## Ground truth (oracles R*, C*)",
        "",
        table(metrics, list(METHODS), TRUTH_ROWS),
        "## As judged by the learned reward / cost models",
        "",
        table(metrics, list(METHODS), LEARNED_ROWS),
        "## Per seed",
        "",
        per_seed_table(metrics, list(METHODS), PER_SEED_KEYS),
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
        "## Ablations (RePO, searched settings, one knob changed)",
        "",
    ]
    labels = settings["ablation_labels"]
    text += [", ".join(f"`{n}` = {labels[n]}" for n in settings["ablations"]) or "none", ""]
    if settings["ablations"]:
        ablation_metrics, names = only_seeds(metrics, settings["ablation_seeds"]), ["repo", *settings["ablations"]]
        text += [
            f"Seeds {', '.join(str(s) for s in settings['ablation_seeds'])} (RePO's column restricted to the same "
            "seeds).",
            "",
            table(ablation_metrics, names, TRUTH_ROWS),
            "As judged by the learned models:",
            "",
            table(ablation_metrics, names, LEARNED_ROWS),
        ]
    names = estimator_names(settings)
    if len(names) > len(CONSTRAINED):
        text += [
            "## Advantage estimators (searched settings, same budget)",
            "",
            f"`ppo_lag` and `repo` use the configs' estimator (`{settings['base_estimator']}`); `<algorithm>_<e>` "
            f"is the same run with `estimation.estimator: <e>`. Seeds "
            f"{', '.join(str(s) for s in settings['estimator_seeds'])}. Wall time and peak resident memory are those "
            f"of the policy stage's `fit` process (model loading and validation included), measured while up to "
            f"{settings['jobs']} stage process(es) shared the machine.",
            "",
            table(only_seeds(metrics, settings["estimator_seeds"]), names, ESTIMATOR_ROWS),
        ]
    fixed = "; ".join(f"{alg}: {d['rule']}, maximum {d['maximum']}" for alg, d in settings["dual_configs"].items())
    text += [
        f"## Multiplier search (seed {settings['search_seed']}, validation prompts)",
        "",
        f"Rule: {settings['selection_rule']}. Not searched, from the configs: {fixed}.",
        "",
        search_table(results["search"]),
        "## Plots",
        "",
        *[f"- [{name}]({Path(path).name})" for name, path in results["plots"].items()],
        "",
    ]
    return "\n".join(text)


def write_outputs(results: dict, out: Path) -> None:
    """Add the summary, cost-model agreement and plots to ``results``; write ``results.json`` and ``results.md``."""
    results["summary"] = summarize_seeds(results["metrics"])
    results["cost_model_agreement/hazard_mild"] = cost_model_agreement(results["evaluations"], "hazard_mild")
    results["plots"] = {name: str(path) for name, path in write_plots(results, out).items()}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "results.md").write_text(render(results))


def read_results_json(out: Path) -> dict:
    """``out/results.json`` with the per-seed keys turned back into ints."""
    results = json.loads((out / "results.json").read_text())
    for key in ("metrics", "curves", "evaluations", "run_settings"):
        results[key] = {name: {int(s): v for s, v in by_seed.items()} for name, by_seed in results[key].items()}
    return results
