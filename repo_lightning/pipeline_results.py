"""What a pipeline run leaves behind, read back: the held-out figures, the score models' tests and the summary."""

from __future__ import annotations

import json
from pathlib import Path

from repo_lightning.evaluation import format_table

#: The evaluation figures of the summary table and of the model cards, in this order.
SUMMARY_KEYS = [
    "true_reward_mean/benign",
    "true_reward_mean/hazard",
    "true_unsafe_response_rate",
    "true_unsafe_prompt_rate/hazard_mild",
    "true_unsafe_prompt_rate/hazard_severe",
    "over_refusal_rate",
    "reward_mean",
    "unsafe_prompt_rate",
    "kl_mean",
]


def evaluation_figures(report_dir: Path) -> dict[str, float]:
    """The :data:`SUMMARY_KEYS` figures of one evaluation (its ``metrics.json``)."""
    metrics = json.loads((report_dir / "metrics.json").read_text())
    return {key: metrics[key] for key in SUMMARY_KEYS if key in metrics}


def read_score_model_tests(logs: Path, tag: str = "") -> dict[str, dict[str, float]]:
    """The held-out ``test/...`` figures of the reward and cost models, read back from their TensorBoard runs.

    Args:
        logs: The pipeline's ``<root>/logs``.
        tag: Prefix of the runs (``round1_``: a collection round's models).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, dict[str, float]] = {}
    for stage in ("reward", "cost"):
        for events in sorted((logs / f"{tag}{stage}_test").rglob("events.out.tfevents.*")):
            accumulator = EventAccumulator(str(events))
            accumulator.Reload()
            for name in accumulator.Tags()["scalars"]:
                if name.startswith("test/"):
                    found.setdefault(stage, {})[name] = accumulator.Scalars(name)[-1].value
    return found


def write_summary(
    root: Path,
    evaluations: dict[str, Path],
    timings: dict[str, float],
    scorers: dict[str, dict[str, float]],
    world: dict[str, object] | None = None,
    ensembles: dict[str, int] | None = None,
    warm_start: dict | None = None,
    stage_args: dict[str, list[str]] | None = None,
) -> str:
    """Side-by-side table of the evaluations, written with the wall times to ``summary.md`` and ``summary.json``.

    Args:
        root: The run folder.
        evaluations: Report folder of each evaluated policy, by name.
        timings: Wall time of each stage, by name.
        scorers: :func:`read_score_model_tests` of the final models.
        world: The SafetyWorld's fields that differ from the defaults (``--world``); ``None`` or empty: the default.
        ensembles: Models the policies scored with, ``{"reward": n, "cost": m}`` (``None``: one of each).
        warm_start: The warm start's selection summary (:func:`repo_lightning.warm_start.best_of_n`), or ``None``
            when the policies started from the SFT export.
        stage_args: The user's extra arguments per stage (``--stage-arg``); ``None`` or empty: none.

    Returns:
        ``summary.md`` without its wall-time section (the stage lines already showed the times).
    """
    metrics = {name: json.loads((path / "metrics.json").read_text()) for name, path in evaluations.items()}
    keys = [k for k in SUMMARY_KEYS if any(k in m for m in metrics.values())]
    table = format_table(metrics, keys)
    if scorers:
        lines = [
            f"- {stage}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(m.items())) for stage, m in scorers.items()
        ]
        table += "\n\nReward and cost models on held-out pairs (`oracle_*`: against the ground truth):\n" + "\n".join(
            lines
        )
    timing = "\n".join(f"- {name}: {seconds:.1f} s" for name, seconds in timings.items())
    reports = "\n".join(f"- {name}: {path / 'report.md'}" for name, path in evaluations.items())
    described = " ".join(f"{k}={v}" for k, v in (world or {}).items()) or "the default one"
    ensembles = ensembles or {"reward": 1, "cost": 1}
    scored = ""
    if ensembles["reward"] > 1 or ensembles["cost"] > 1:
        scored = (
            f" The policies scored with {ensembles['reward']} reward model(s) (mean - std) and {ensembles['cost']} "
            "cost model(s) (the largest cost)."
        )
    if warm_start:
        per_prompt = warm_start["samples"] / max(warm_start["prompts"], 1)
        scored += (
            f" The policies started from the best-of-{per_prompt:.0f} warm start `sft_warm` ({warm_start['kept']} of "
            f"{warm_start['prompts']} RL prompts kept a safe answer; beta {warm_start['beta']:g})."
        )
    if stage_args:
        overrides = "; ".join(f"{stage}: {' '.join(f'`{a}`' for a in args)}" for stage, args in stage_args.items())
        scored += f" Stage arguments added to the configs' (`--stage-arg`): {overrides}."
    text = (
        "# Pipeline summary\n\nHeld-out SafetyWorld prompts; `true_*` are ground-truth oracle figures, the rest "
        f"are the learned models' judgement. SafetyWorld: {described}.{scored}\n\n{table}\n\n## Reports\n{reports}\n"
    )
    (root / "summary.md").write_text(f"{text}\n## Wall time\n{timing}\n")
    (root / "summary.json").write_text(
        json.dumps(
            {
                "metrics": metrics,
                "score_models": scorers,
                "timings": timings,
                "world": world or {},
                "ensembles": ensembles,
                "warm_start": warm_start,
                "stage_args": stage_args or {},
            },
            indent=2,
        )
    )
    return text
