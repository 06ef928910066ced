"""Evaluation on held-out prompts: per-prompt records, summary metrics and the run-folder report."""

from repo_lightning.evaluation.metrics import PromptResult, summarize, validate_results
from repo_lightning.evaluation.report import format_table, read_results, render_markdown, write_report

__all__ = [
    "PromptResult",
    "format_table",
    "read_results",
    "render_markdown",
    "summarize",
    "validate_results",
    "write_report",
]
