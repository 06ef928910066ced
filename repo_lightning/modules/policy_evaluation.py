"""The end of a policy evaluation: gathering per-prompt results from every rank and writing the report."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from repo_lightning.evaluation import PromptResult, write_report


def gather_results(results: list[PromptResult]) -> list[PromptResult]:
    """Every rank's per-prompt results on every rank, ordered by prompt index (a collective under DDP/FSDP)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return results
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, results)
    return sorted((r for part in gathered for r in part), key=lambda r: r.index)


def write_policy_report(
    results: list[PromptResult],
    out_dir: str,
    hp: Mapping,
    iterations: int,
    lambda_history: list[tuple[int, float]],
    ckpt_path: str | None,
) -> None:
    """Write ``report.md``, ``per_prompt.jsonl``, ``metrics.json`` and plots for a trained or a start policy."""
    trained = iterations > 0
    extra = {
        "policy": f"{hp['algorithm']} checkpoint {ckpt_path}" if trained else str(hp["actor_path"]),
        "reference (start) policy": str(hp["actor_path"]),
        "algorithm (config)": hp["algorithm"],
        "iterations trained": str(iterations),
    }
    title = f"Evaluation: {hp['algorithm']} policy" if trained else "Evaluation: the start policy"
    history = lambda_history if trained and hp["algorithm"] != "ppo" else None
    write_report(results, out_dir, title, history, extra)
    print(f"evaluation report written to {out_dir}/report.md")
