"""The benchmark's figures: training curves over seeds, and per-prompt cost histograms per method.

The library's :mod:`repo_lightning.evaluation.plots` draws one evaluation; these draw several methods and seeds side
by side, reading each evaluation back with the library's :func:`~repo_lightning.evaluation.read_results`. Like the
library's, they build :class:`matplotlib.figure.Figure` directly (headless, no pyplot state).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from matplotlib.figure import Figure

from repo_lightning.evaluation import read_results

COLOURS = {
    "sft": "tab:gray",
    "ppo": "tab:blue",
    "ppo_lag": "tab:orange",
    "repo": "tab:green",
    "repo_rectify_prompt": "tab:purple",
    "repo_additive_rule": "tab:brown",
    "repo_pid_rule": "tab:pink",
    "repo_rectified_cost": "tab:olive",
    "ppo_lag_rloo": "tab:red",
    "repo_rloo": "tab:cyan",
    "ppo_lag_grpo": "gold",
    "repo_grpo": "navy",
}
KIND_COLOURS = {"benign": "tab:green", "hazard_mild": "tab:orange", "hazard_severe": "tab:red"}


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over at most ``window`` values (``window`` 1 returns ``values``)."""
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def plot_curves(curves: dict, names: list[str], tag: str, ylabel: str, path: Path, smooth: int = 1) -> Path:
    """One line per method: the mean over seeds of a training scalar, with the min-max band over seeds.

    Args:
        curves: method -> seed -> tag -> ``[(step, value), ...]``.
        names: Methods to draw, in legend order (missing ones are skipped).
        tag: The scalar, e.g. ``train/lambda``.
        ylabel: Its axis label.
        path: Where to write the PNG.
        smooth: Each seed's series is first averaged over a trailing window of this many iterations.

    Returns:
        The path written.
    """
    fig = Figure(figsize=(6.5, 4.0))
    ax = fig.add_subplot()
    for name in names:
        series = [s[tag] for s in curves.get(name, {}).values() if s.get(tag)]
        if not series:
            continue
        length = min(len(s) for s in series)
        steps = [step for step, _ in series[0][:length]]
        values = [moving_average([v for _, v in s[:length]], smooth) for s in series]
        mean = [statistics.fmean(c) for c in zip(*values, strict=True)]
        (line,) = ax.plot(steps, mean, label=f"{name} (n={len(series)})", color=COLOURS.get(name))
        low = [min(c) for c in zip(*values, strict=True)]
        high = [max(c) for c in zip(*values, strict=True)]
        ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
    smoothing = f", {smooth}-iteration moving average" if smooth > 1 else ""
    ax.set_title(f"mean over seeds (band: min-max){smoothing}", fontsize="small")
    ax.set_xlabel("training iteration")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return path


def plot_cost_histograms(evaluations: dict[str, dict], names: list[str], path: Path) -> Path:
    """Per-prompt mean cost (ground truth, top; learned, bottom) per method, by topic kind, pooled over seeds.

    Args:
        evaluations: method -> seed -> evaluation folder (holding ``per_prompt.jsonl``).
        names: Methods, one column each (missing ones are skipped).
        path: Where to write the PNG.

    Returns:
        The path written.
    """
    names = [n for n in names if evaluations.get(n)]
    fig = Figure(figsize=(3.2 * max(1, len(names)), 5.5))
    axes = fig.subplots(2, max(1, len(names)), squeeze=False, sharey="row")
    for col, name in enumerate(names):
        results = [r for p in evaluations[name].values() for r in read_results(Path(p) / "per_prompt.jsonl")]
        for row, (attr, title) in enumerate((("true_costs", "true C*"), ("costs", "learned C"))):
            ax = axes[row][col]
            groups = {k: [statistics.fmean(getattr(r, attr)) for r in results if r.kind == k] for k in KIND_COLOURS}
            groups = {k: v for k, v in groups.items() if v}
            ax.hist(
                list(groups.values()),
                bins=20,
                stacked=True,
                color=[KIND_COLOURS[k] for k in groups],
                label=list(groups),
            )
            ax.axvline(0.0, color="black", linestyle="--", linewidth=1.0)
            ax.set_title(f"{name}: {title}", fontsize="small")
            ax.set_xlabel("per-prompt mean cost", fontsize="small")
    axes[0][0].set_ylabel("prompts")
    axes[1][0].set_ylabel("prompts")
    if names:
        axes[0][0].legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return path
