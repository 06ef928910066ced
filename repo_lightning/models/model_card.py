"""Hugging Face model cards of the exports: ``README.md`` with YAML front matter, so a folder can be pushed as it is.

The front matter holds the hub's own keys (``library_name``, ``pipeline_tag``, ``base_model``, ``datasets``,
``tags``) and one ``repo_lightning`` block with what the run knows: the stage, the algorithm, the data, the final
logged figures (``metrics``), for a policy the multiplier at the end (``lagrange_multiplier``), the command line, and
later the held-out evaluation (``evaluation``, added by the pipeline with :func:`update_model_card`). The body
repeats the figures in words and holds the run's full resolved config.

Card layout::

    ---
    library_name: transformers
    pipeline_tag: text-generation
    base_model: lightning_logs/demo/exports/sft
    datasets: [safetyworld]
    tags: [repo_lightning, rlhf, safe-rlhf, policy, repo]
    repo_lightning:
      stage: policy
      algorithm: repo
      lagrange_multiplier: 1.73
      data: {dataset: safetyworld, mode: prompts, split: train}
      metrics: {train/lambda: 1.73, val/true_unsafe_response_rate: 0.06, ...}
      command: python -m repo_lightning fit --config configs/demo/repo.yaml ...
      evaluation: {true_unsafe_prompt_rate/hazard_mild: 0.19, ...}
    ---
    # <title> ... body ...
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

CARD_FILE = "README.md"

#: ``pipeline_tag`` per stage: the policy and SFT models generate, the reward and cost models score.
PIPELINE_TAGS = {"sft": "text-generation", "policy": "text-generation", "reward": "text-classification"}

#: How each stage's export loads.
AUTO_CLASSES = {
    "sft": "AutoModelForCausalLM",
    "policy": "AutoModelForCausalLM",
    "reward": "AutoModelForSequenceClassification",
    "cost": "AutoModelForSequenceClassification",
}

STAGE_TITLES = {
    "sft": "Supervised fine-tuned start model",
    "reward": "Reward model (helpfulness, Bradley-Terry)",
    "cost": "Cost model (harm; C > 0 means unsafe)",
    "policy": "Policy",
}


def _plain(value: Any) -> Any:
    """A value YAML can write and any parser can read back: rounded floats, lists, dicts, strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # 0-d tensors and numpy scalars
        value = value.item()
    if isinstance(value, float):
        return round(value, 4) if math.isfinite(value) else str(value)
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


def render_model_card(metadata: dict[str, Any], config_yaml: str | None = None) -> str:
    """The ``README.md`` text of an export.

    Args:
        metadata: The ``repo_lightning`` block: ``stage`` (required), and any of ``algorithm``, ``base_model``,
            ``data`` (with ``dataset``), ``metrics``, ``lagrange_multiplier``, ``command``, ``evaluation``.
        config_yaml: The run's resolved config, shown in the body.
    """
    block = _plain(metadata)
    stage = block["stage"]
    dataset = (block.get("data") or {}).get("dataset")
    tags = ["repo_lightning", "rlhf", "safe-rlhf", stage] + ([block["algorithm"]] if block.get("algorithm") else [])
    front: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": PIPELINE_TAGS.get(stage, "text-classification"),
    }
    if block.get("base_model"):
        front["base_model"] = block["base_model"]
    if dataset:
        front["datasets"] = [dataset]
    front["tags"] = tags
    front["repo_lightning"] = block
    title = STAGE_TITLES.get(stage, stage)
    if stage == "policy" and block.get("algorithm"):
        title += f" trained with `{block['algorithm']}`"
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        f"# {title}",
        "",
        f"Exported by repo_lightning (Safe RLHF with RePO, arXiv 2410.19933), stage `{stage}`. Load it with "
        f"`transformers.{AUTO_CLASSES.get(stage, 'AutoModel')}.from_pretrained(<this folder>)`"
        + (" (one label: the score)." if AUTO_CLASSES.get(stage, "").endswith("Classification") else "."),
        "",
    ]
    if block.get("base_model"):
        lines += [f"- started from: `{block['base_model']}`"]
    if dataset:
        data = block["data"]
        lines += [f"- data: `{dataset}`" + (f" (split `{data['split']}`)" if data.get("split") else "")]
    if "lagrange_multiplier" in block:
        lines += [f"- Lagrange multiplier at the end of training: {block['lagrange_multiplier']}"]
    if block.get("command"):
        lines += [f"- command: `{block['command']}`"]
    for key, heading in (("evaluation", "Held-out evaluation"), ("metrics", "Last logged figures of training")):
        if block.get(key):
            lines += ["", f"## {heading}", "", "| metric | value |", "|---|---:|"]
            lines += [f"| `{name}` | {value} |" for name, value in block[key].items()]
    if config_yaml:
        lines += ["", "## Config", "", "```yaml", config_yaml.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def read_model_card(path: str | Path) -> tuple[dict[str, Any], str]:
    """``(front matter, body)`` of a card; ``path`` is the card or its export folder.

    Raises:
        ValueError: the file does not start with a ``---`` YAML block.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CARD_FILE
    text = path.read_text()
    head, sep, body = text.partition("\n---\n")
    if not text.startswith("---\n") or not sep:
        raise ValueError(f"{path}: no YAML front matter (a '---' block at the top)")
    return yaml.safe_load(head[len("---\n") :]) or {}, body


def write_model_card(export_dir: str | Path, metadata: dict[str, Any], config_yaml: str | None = None) -> Path:
    """Write ``export_dir/README.md`` (see :func:`render_model_card`); returns its path."""
    path = Path(export_dir) / CARD_FILE
    path.write_text(render_model_card(metadata, config_yaml))
    return path


def update_model_card(export_dir: str | Path, **fields: Any) -> Path:
    """Add or replace fields of the ``repo_lightning`` block of an existing card (e.g. ``evaluation={...}``).

    The config section of the body is kept.
    """
    front, body = read_model_card(export_dir)
    metadata = {**front.get("repo_lightning", {}), **fields}
    _, found, rest = body.partition("## Config\n\n```yaml\n")
    config_yaml = rest.rsplit("```", 1)[0] if found else None
    return write_model_card(export_dir, metadata, config_yaml)
