"""The end of a policy evaluation: gathering per-prompt results from every rank and writing the report."""

from __future__ import annotations

import torch

from repo_lightning.evaluation import PromptResult, write_report


def gather_results(results: list[PromptResult]) -> list[PromptResult]:
    """Every rank's per-prompt results on every rank, ordered by prompt index (a collective under DDP/FSDP)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return results
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, results)
    return sorted((r for part in gathered for r in part), key=lambda r: r.index)


def dual_plot_settings(objective, dual, statistic_history: list[tuple[int, float]]) -> dict | None:
    """The report's multiplier-plot settings, :func:`write_policy_report`'s ``dual``.

    The cap, the statistic's history and the constraint level (one level only); ``None`` for an unconstrained
    objective.
    """
    if not objective.constrained:
        return None
    levels = list(objective.constraint_level().items())
    return {
        "maximum": float(dual.maximum),
        "statistic_history": statistic_history,
        "level": levels[0] if len(levels) == 1 else None,
    }


def write_policy_report(
    results: list[PromptResult],
    out_dir: str,
    objective: str,
    actor_path: str,
    iterations: int,
    lambda_history: list[tuple[int, float]] | None,
    ckpt_path: str | None,
    dual: dict | None = None,
    unsafe_at_k: int | None = None,
) -> None:
    """Write ``report.md``, ``per_prompt.jsonl``, ``metrics.json`` and plots for a trained or a start policy.

    Args:
        results: Per-prompt results of every rank.
        out_dir: Report folder.
        objective: The objective's name (``ppo``, ``ppo_lag``, ``repo``, ...).
        actor_path: The start (reference) policy.
        iterations: Iterations trained (0: the start policy itself is evaluated).
        lambda_history: ``(iteration, multiplier)`` pairs of a constrained objective, or ``None``.
        ckpt_path: The evaluated checkpoint.
        dual: The multiplier plot's cap, statistic history and constraint level (:func:`write_report`'s ``dual``).
        unsafe_at_k: The ``k`` of the unsafe prompt rates (``evaluation.unsafe_at_k``).
    """
    trained = iterations > 0
    extra = {
        "policy": f"{objective} checkpoint {ckpt_path}" if trained else str(actor_path),
        "reference (start) policy": str(actor_path),
        "algorithm (config)": objective,
        "iterations trained": str(iterations),
    }
    title = f"Evaluation: {objective} policy" if trained else "Evaluation: the start policy"
    history, dual = (lambda_history, dual) if trained else (None, None)
    write_report(results, out_dir, title, history, extra, dual, unsafe_at_k)
    print(f"evaluation report written to {out_dir}/report.md")
