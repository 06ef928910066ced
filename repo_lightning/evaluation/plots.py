"""PNG plots for the evaluation report.

The figures are built with :class:`matplotlib.figure.Figure` directly rather than through ``pyplot``: saving a
PNG then always goes through the Agg renderer, so plotting works headless (CI, clusters) without calling
``matplotlib.use("Agg")``, which would switch the backend for everything else in the process (a notebook, say)
as a side effect of importing this module. No global figure registry is touched, so nothing needs closing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from repo_lightning.evaluation.metrics import KINDS, PromptResult

_KIND_COLOURS: dict[str, str] = {
    "benign": "tab:green",
    "hazard_mild": "tab:orange",
    "hazard_severe": "tab:red",
}
_DPI = 100


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=_DPI)
    return path


def plot_cost_histogram(results: Sequence[PromptResult], path: str | Path) -> Path:
    """Histogram of the per-prompt mean cost, learned and (when present) ground truth, with a line at 0.

    Mass to the right of the line is prompts whose average answer is unsafe; the per-prompt view shows how
    the cost is spread over prompts, which a single mean hides.

    Args:
        results: One record per prompt (validated by the caller).
        path: Where to write the PNG.

    Returns:
        The path written.
    """
    learned = [sum(r.costs) / len(r.costs) for r in results]
    true = None
    if results[0].true_costs is not None:
        true = [sum(r.true_costs or []) / len(r.costs) for r in results]
    # Shared bin edges, so the learned and true histograms can be compared bar by bar.
    bins = np.histogram_bin_edges(learned + (true or []), bins=30)
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot()
    ax.hist(learned, bins=bins, alpha=0.6, label="learned cost model C", color="tab:blue")
    if true is not None:
        ax.hist(true, bins=bins, alpha=0.6, label="ground truth C*", color="tab:purple")
    ax.axvline(0.0, color="black", linestyle="--", linewidth=1.0, label="C = 0 (unsafe to the right)")
    ax.set_xlabel("mean cost over the k responses of a prompt")
    ax.set_ylabel("prompts")
    ax.set_title("Per-prompt mean cost")
    ax.legend(fontsize="small")
    return _save(fig, Path(path))


def plot_reward_vs_cost(results: Sequence[PromptResult], path: str | Path) -> Path:
    """Scatter of learned reward against learned cost, one point per response, coloured by topic kind.

    Args:
        results: One record per prompt (validated by the caller).
        path: Where to write the PNG.

    Returns:
        The path written.
    """
    fig = Figure(figsize=(6.0, 4.5))
    ax = fig.add_subplot()
    if results[0].kind is None:
        ax.scatter(_costs(results), _rewards(results), s=10, alpha=0.5, color="tab:blue")
    else:
        present = {r.kind for r in results}
        ordered = [k for k in KINDS if k in present] + sorted(k for k in present - set(KINDS) if k is not None)
        for kind in ordered:
            group = [r for r in results if r.kind == kind]
            ax.scatter(_costs(group), _rewards(group), s=10, alpha=0.5, label=kind, color=_KIND_COLOURS.get(kind))
        ax.legend(fontsize="small")
    ax.axvline(0.0, color="black", linestyle="--", linewidth=1.0)
    ax.set_xlabel("learned cost C (unsafe when > 0)")
    ax.set_ylabel("learned reward R")
    ax.set_title("Reward vs cost per response")
    return _save(fig, Path(path))


def multiplier_figure(
    multiplier_history: Sequence[tuple[int, float]],
    maximum: float | None = None,
    statistic_history: Sequence[tuple[int, float]] | None = None,
    level: tuple[str, float] | None = None,
) -> Figure:
    """The multiplier ``lam`` over training steps, with its cap, and under it the quantity it answers to.

    Args:
        multiplier_history: ``(step, lam)`` pairs in step order; must be non-empty.
        maximum: The ``DualVariable``'s cap, drawn as a dashed line (``None``: no line).
        statistic_history: ``(step, g)`` pairs of the (windowed) dual statistic ``g`` that drove each update; with
            ``level`` the lower panel shows ``g + level`` (the unsafe share, the mean cost, ...) against the level.
        level: ``(name, value)`` of the constraint (``("target_unsafe_rate", 0.02)``, ``("threshold", -2)``,
            ``("tolerance", 0)``: the objective's ``constraint_level()``), drawn as a dashed line; without it the
            lower panel shows ``g`` against 0.

    Raises:
        ValueError: If ``multiplier_history`` is empty.
    """
    if len(multiplier_history) == 0:
        raise ValueError("multiplier_history is empty: nothing to plot")
    steps = [int(step) for step, _ in multiplier_history]
    values = [float(lam) for _, lam in multiplier_history]
    with_statistic = bool(statistic_history)
    fig = Figure(figsize=(6.0, 5.5 if with_statistic else 3.5))
    ax = fig.add_subplot(2, 1, 1) if with_statistic else fig.add_subplot()
    ax.plot(steps, values, color="tab:blue", marker="." if len(steps) < 50 else None, label="lambda")
    if maximum is not None:
        ax.axhline(float(maximum), color="tab:red", linestyle="--", linewidth=1.0, label=f"cap = {maximum:g}")
        ax.legend(fontsize="small", loc="best")
    ax.set_xlabel("training step")
    ax.set_ylabel("lagrange multiplier (lambda)")
    ax.set_title("Lagrange multiplier over training")
    ax.grid(alpha=0.3)
    if with_statistic:
        low = fig.add_subplot(2, 1, 2, sharex=ax)
        name, value = level if level is not None else ("g = 0", 0.0)
        s_steps = [int(step) for step, _ in statistic_history]
        s_values = [float(g) + (value if level is not None else 0.0) for _, g in statistic_history]
        marker = "." if len(s_steps) < 50 else None
        low.plot(s_steps, s_values, color="tab:purple", marker=marker, label="what lambda answers to")
        low.axhline(value, color="tab:green", linestyle="--", linewidth=1.0, label=f"{name} = {value:g}")
        low.set_xlabel("training step")
        low.set_ylabel("constraint quantity" if level is not None else "dual statistic g")
        low.set_title("Its constraint: lambda rises while the quantity is above the line")
        low.legend(fontsize="small", loc="best")
        low.grid(alpha=0.3)
    return fig


def plot_multiplier(
    multiplier_history: Sequence[tuple[int, float]],
    path: str | Path,
    maximum: float | None = None,
    statistic_history: Sequence[tuple[int, float]] | None = None,
    level: tuple[str, float] | None = None,
) -> Path:
    """Write :func:`multiplier_figure` (same arguments) as a PNG; returns the path.

    Raises:
        ValueError: If ``multiplier_history`` is empty.
    """
    return _save(multiplier_figure(multiplier_history, maximum, statistic_history, level), Path(path))


def _rewards(results: Sequence[PromptResult]) -> list[float]:
    return [v for r in results for v in r.rewards]


def _costs(results: Sequence[PromptResult]) -> list[float]:
    return [v for r in results for v in r.costs]
