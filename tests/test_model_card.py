"""Model cards of the exports: YAML front matter that parses, figures that round-trip, folders that still load."""

from __future__ import annotations

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from repo_lightning.models.export import export_pretrained
from repo_lightning.models.model_card import read_model_card, render_model_card, update_model_card, write_model_card

POLICY = {
    "stage": "policy",
    "algorithm": "repo",
    "lagrange_multiplier": 1.234567,
    "base_model": "lightning_logs/demo/exports/sft",
    "data": {"dataset": "safetyworld", "mode": "prompts", "split": "train"},
    "metrics": {"val/true_unsafe_frac": 0.0625, "train/lambda": 1.234567},
    "command": "python -m repo_lightning fit --config configs/demo/repo.yaml",
}
CONFIG = "model:\n  class_path: repo_lightning.modules.PolicyModule\n  init_args:\n    algorithm: repo\n"


def test_policy_card_front_matter_parses_with_hub_keys_and_the_multiplier(tmp_path):
    path = write_model_card(tmp_path, POLICY, CONFIG)
    front, body = read_model_card(path)
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation"
    assert front["base_model"] == "lightning_logs/demo/exports/sft"
    assert front["datasets"] == ["safetyworld"]
    assert {"repo_lightning", "policy", "repo"} <= set(front["tags"])
    block = front["repo_lightning"]
    assert block["stage"] == "policy" and block["algorithm"] == "repo"
    assert block["lagrange_multiplier"] == 1.2346  # rounded to 4 decimals
    assert block["metrics"]["val/true_unsafe_frac"] == 0.0625
    assert block["command"].startswith("python -m repo_lightning fit")
    assert "AutoModelForCausalLM" in body and "Lagrange multiplier at the end of training: 1.2346" in body
    assert yaml.safe_load(body.split("```yaml\n")[1].split("```")[0]) == yaml.safe_load(CONFIG)


def test_update_adds_evaluation_and_keeps_the_config(tmp_path):
    write_model_card(tmp_path, POLICY, CONFIG)
    update_model_card(tmp_path, evaluation={"true_unsafe_prompt_rate/hazard_mild": 0.1875})
    front, body = read_model_card(tmp_path)
    assert front["repo_lightning"]["evaluation"] == {"true_unsafe_prompt_rate/hazard_mild": 0.1875}
    assert front["repo_lightning"]["lagrange_multiplier"] == 1.2346
    assert "## Held-out evaluation" in body and body.count("```yaml") == 1 and CONFIG.rstrip() in body


@pytest.mark.parametrize(("stage", "tag"), [("reward", "text-classification"), ("cost", "text-classification")])
def test_score_model_cards_say_how_they_load(stage, tag):
    front, body = _parse(render_model_card({"stage": stage}))
    assert front["pipeline_tag"] == tag and "base_model" not in front
    assert "AutoModelForSequenceClassification" in body and "one label" in body


def _parse(text: str):
    head, _, body = text.partition("\n---\n")
    return yaml.safe_load(head.removeprefix("---\n")), body


def test_a_file_without_front_matter_is_rejected(tmp_path):
    (tmp_path / "README.md").write_text("# just a title\n")
    with pytest.raises(ValueError, match="no YAML front matter"):
        read_model_card(tmp_path)


def test_export_writes_the_card_beside_weights_that_still_load(tiny_exports, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_exports["sft"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_exports["sft"])
    out = export_pretrained(model, tokenizer, tmp_path / "policy", metadata=POLICY, card=render_model_card(POLICY))
    assert read_model_card(out)[0]["repo_lightning"]["algorithm"] == "repo"
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"
