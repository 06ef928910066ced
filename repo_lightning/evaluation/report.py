"""The evaluation report written into a run folder (algorithm.md section 9).

``write_report`` writes, next to each other, the per-prompt table (``per_prompt.jsonl``), the summary
(``metrics.json``), a short Markdown report (``report.md``) and PNG plots. ``format_table`` renders several
summaries side by side, e.g. SFT against RePO.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from repo_lightning.evaluation.metrics import HAZARD_KINDS, KINDS, PromptResult, summarize
from repo_lightning.evaluation.plots import plot_cost_histogram, plot_multiplier, plot_reward_vs_cost

PER_PROMPT_FILE = "per_prompt.jsonl"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
COST_HISTOGRAM_FILE = "cost_histogram.png"
REWARD_VS_COST_FILE = "reward_vs_cost.png"
MULTIPLIER_FILE = "multiplier.png"

_MISSING = "-"
_QUANTILES = ("cost_q10", "cost_q50", "cost_q90")


def _fmt(value: float) -> str:
    return f"{value:.3f}"


def _cell(summary: Mapping[str, float], key: str | None) -> str:
    if key is None or key not in summary:
        return _MISSING
    return _fmt(summary[key])


def _quantile_cell(summary: Mapping[str, float], prefix: str) -> str:
    keys = [prefix + q for q in _QUANTILES]
    if not all(k in summary for k in keys):
        return _MISSING
    return " / ".join(_fmt(summary[k]) for k in keys)


def _table_rows(summary: Mapping[str, float]) -> list[tuple[str, str, str]]:
    """Rows of the report table as ``(label, learned models cell, ground truth cell)``.

    KL, length and refusal rows have no ground-truth cell: they do not depend on who judges the responses.
    Rows with no value in either column (e.g. over-refusal when the task defines no refusals) are left out.
    """
    kinds = [k for k in (*KINDS, "hazard") if f"unsafe_prompt_rate/{k}" in summary]
    kinds += sorted(
        key.split("/", 1)[1]
        for key in summary
        if key.startswith("unsafe_prompt_rate/") and key.split("/", 1)[1] not in (*KINDS, "hazard")
    )
    n = summary.get("samples_per_prompt")
    k = int(summary["unsafe_at_k"]) if "unsafe_at_k" in summary else "k"
    estimated = f"; estimated from {n:g} samples a prompt" if "unsafe_at_k" in summary and n is not None else ""
    spec: list[tuple[str, str | None, str | None]] = [
        ("Helpfulness (mean reward)", "reward_mean", "true_reward_mean"),
        ("Mean cost", "cost_mean", "true_cost_mean"),
        ("Unsafe response rate (C > 0)", "unsafe_response_rate", "true_unsafe_response_rate"),
        (f"Unsafe prompt rate (any of {k} unsafe{estimated})", "unsafe_prompt_rate", "true_unsafe_prompt_rate"),
    ]
    for kind in kinds:
        label = "hazard (" + " + ".join(HAZARD_KINDS) + ")" if kind == "hazard" else kind
        spec.append((f"Unsafe prompt rate: {label}", f"unsafe_prompt_rate/{kind}", f"true_unsafe_prompt_rate/{kind}"))
    spec += [
        ("Over-refusal rate (benign prompts)", "over_refusal_rate", None),
        ("Refusal rate (all prompts)", "refusal_rate", None),
    ]
    rows = [(label, _cell(summary, a), _cell(summary, b)) for label, a, b in spec]
    rows.append(("Cost quantiles q10 / q50 / q90", _quantile_cell(summary, ""), _quantile_cell(summary, "true_")))
    rows += [
        ("Mean KL to reference (nats)", _cell(summary, "kl_mean"), _MISSING),
        ("Mean response length (tokens)", _cell(summary, "response_len_mean"), _MISSING),
    ]
    return [row for row in rows if row[1] != _MISSING or row[2] != _MISSING]


def render_markdown(
    summary: Mapping[str, float],
    title: str,
    plot_files: Sequence[str] = (),
    extra: Mapping[str, str] | None = None,
) -> str:
    """Renders the Markdown report of one evaluation.

    Args:
        summary: Output of :func:`~repo_lightning.evaluation.metrics.summarize`.
        title: Heading of the report.
        plot_files: File names of the plots, listed (as links) at the end.
        extra: Key/value lines shown under the title, e.g. model path and algorithm.

    Returns:
        The Markdown text, ending in a newline.
    """
    has_truth = any(key.startswith("true_") for key in summary)
    lines = [f"# {title}", ""]
    for key, value in (extra or {}).items():
        lines.append(f"- **{key}**: {value}")
    prompts = int(summary.get("num_prompts", 0))
    k = summary.get("samples_per_prompt", 0.0)
    k_text = str(int(k)) if float(k).is_integer() else _fmt(k)
    lines += [f"- **prompts**: {prompts}, **samples per prompt (k)**: {k_text}", ""]

    header = ["Metric", "Learned models"] + (["Ground truth"] if has_truth else [])
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---|" + "---:|" * (len(header) - 1))
    for label, learned, truth in _table_rows(summary):
        cells = [label, learned] + ([truth] if has_truth else [])
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "A response is unsafe when its cost is > 0; a prompt is unsafe when any of its k responses is.",
        f"Per-prompt records: `{PER_PROMPT_FILE}`; all metrics: `{METRICS_FILE}`.",
    ]
    if plot_files:
        lines.append("Plots: " + ", ".join(f"[{name}]({name})" for name in plot_files))
    return "\n".join(lines) + "\n"


def write_report(
    results: list[PromptResult],
    out_dir: str | Path,
    title: str,
    multiplier_history: list[tuple[int, float]] | None = None,
    extra: dict[str, str] | None = None,
    dual: dict | None = None,
    unsafe_at_k: int | None = None,
) -> dict[str, float]:
    """Summarises ``results`` and writes the report files into ``out_dir``.

    Files written: ``per_prompt.jsonl`` (one :meth:`PromptResult.to_json` per line), ``metrics.json`` (the
    summary), ``report.md``, ``cost_histogram.png``, ``reward_vs_cost.png`` and, when ``multiplier_history``
    is non-empty, ``multiplier.png``.

    Args:
        results: One record per held-out prompt.
        out_dir: Destination folder, created if missing; existing report files are overwritten.
        title: Heading of ``report.md``.
        multiplier_history: ``(step, lam)`` pairs of the Lagrange multiplier during training, if any.
        extra: Key/value lines for the head of ``report.md`` (model path, algorithm, ...).
        dual: For the multiplier plot: ``maximum`` (the cap), ``statistic_history`` (``(step, g)`` pairs) and
            ``level`` (``(name, value)`` of the constraint); see :func:`~.plots.multiplier_figure`.
        unsafe_at_k: The ``k`` of the unsafe prompt rates (:func:`~repo_lightning.evaluation.metrics.summarize`).

    Returns:
        The summary dict (as :func:`~repo_lightning.evaluation.metrics.summarize`).

    Raises:
        ValueError: If ``results`` is empty or malformed; nothing is written then.
    """
    summary = summarize(results, unsafe_at_k)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    with (out / PER_PROMPT_FILE).open("w", encoding="utf-8") as f:
        for result in results:
            f.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
    (out / METRICS_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")

    plot_cost_histogram(results, out / COST_HISTOGRAM_FILE)
    plot_reward_vs_cost(results, out / REWARD_VS_COST_FILE)
    plot_files = [COST_HISTOGRAM_FILE, REWARD_VS_COST_FILE]
    if multiplier_history:
        plot_multiplier(multiplier_history, out / MULTIPLIER_FILE, **(dual or {}))
        plot_files.append(MULTIPLIER_FILE)

    markdown = render_markdown(summary, title, plot_files=plot_files, extra=extra)
    (out / REPORT_FILE).write_text(markdown, encoding="utf-8")
    return summary


def read_results(path: str | Path) -> list[PromptResult]:
    """Reads a ``per_prompt.jsonl`` written by :func:`write_report`.

    Args:
        path: The JSONL file.

    Returns:
        The records, in file order.
    """
    with Path(path).open(encoding="utf-8") as f:
        return [PromptResult.from_json(json.loads(line)) for line in f if line.strip()]


def format_table(summaries: dict[str, dict[str, float]], keys: list[str] | None = None) -> str:
    """Renders several summaries side by side as a Markdown table, one column per summary.

    Args:
        summaries: Column name to summary, e.g. ``{"sft": {...}, "repo": {...}}``, in column order.
        keys: Metric keys to show, in row order; by default every key of any summary, in order of first
            appearance.

    Returns:
        The table (rows = metrics, numbers to 3 decimals, ``-`` where a summary lacks the key), ending in a
        newline.

    Raises:
        ValueError: If ``summaries`` is empty.
    """
    if not summaries:
        raise ValueError("format_table needs at least one summary")
    if keys is None:
        keys = list(dict.fromkeys(key for summary in summaries.values() for key in summary))
    names = list(summaries)
    lines = [
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(_cell(summaries[name], key) for name in names) + " |")
    return "\n".join(lines) + "\n"
