"""Every shipped YAML under configs/ parses against the code's signatures, so configs cannot drift from the code.

The CLI is built with ``instantiate_classes`` replaced by a no-op: jsonargparse still checks every key and type
(including each ``class_path``'s ``init_args``) against the ``__init__`` signatures, but nothing is constructed, so
configs that name hub models or large datasets are checked offline in milliseconds.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

import repo_lightning.cli as cli_module
from repo_lightning.modules import CostModule, PolicyModule, RewardModule, SFTModule

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_ROOT.rglob("*.yaml"))

#: The data mode each stage's module consumes.
MODES = {SFTModule: "sft", RewardModule: "preference", CostModule: "preference", PolicyModule: "prompts"}


class ParseOnlyCLI(cli_module.RLHFCLI):
    """The project's CLI, stopped after parsing."""

    def instantiate_classes(self) -> None:
        """Skip building the model, data and trainer."""


def _parse(path: Path | str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(cli_module, "RLHFCLI", ParseOnlyCLI)
    return cli_module.main(["--config", str(path)], run=False).config


def test_demo_stage_configs_exist():
    names = {p.relative_to(CONFIG_ROOT).as_posix() for p in CONFIGS}
    assert {"demo/sft.yaml", "demo/reward.yaml", "demo/cost.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.relative_to(CONFIG_ROOT).as_posix() for p in CONFIGS])
def test_config_parses_against_the_code(path, monkeypatch):
    config = _parse(path, monkeypatch)
    module_name, _, class_name = config.model.class_path.rpartition(".")
    module = getattr(importlib.import_module(module_name), class_name)
    assert module in MODES, f"{path}: model.class_path {config.model.class_path!r} is not a stage module"
    assert config.data.mode == MODES[module], f"{path}: {class_name} needs data.mode {MODES[module]!r}"
    assert config.data.max_length > config.data.max_prompt_length


def test_a_config_with_an_unknown_key_is_caught(tmp_path, monkeypatch, capsys):
    # The check above can fail: a typo in init_args stops the parser.
    text = (CONFIG_ROOT / "demo" / "reward.yaml").read_text().replace("regularization:", "regularisation:")
    assert "regularisation:" in text
    bad = tmp_path / "reward.yaml"
    bad.write_text(text)
    with pytest.raises(SystemExit):
        _parse(bad, monkeypatch)
    assert "'regularisation' is not accepted" in capsys.readouterr().err


@pytest.mark.parametrize("path", CONFIGS, ids=[p.relative_to(CONFIG_ROOT).as_posix() for p in CONFIGS])
def test_config_checkpoints_periodically_so_a_killed_run_resumes(path, monkeypatch):
    callbacks = _parse(path, monkeypatch).trainer.callbacks or []
    checkpoints = [c.init_args for c in callbacks if c.class_path.endswith("ModelCheckpoint")]
    assert any(c.every_n_train_steps and c.save_last for c in checkpoints), f"{path}: no periodic last.ckpt"
    # The newest checkpoint must hold the final weights: a periodic one alone is up to N-1 steps stale at the end.
    assert any(not c.every_n_train_steps and c.save_last for c in checkpoints), f"{path}: no epoch-end last.ckpt"


def test_the_pipelines_round_arguments_parse(tmp_path, monkeypatch):
    """The data keys the preference rounds pass on the command line (repo_lightning.pipeline) reach the DataModule."""
    monkeypatch.setattr(cli_module, "RLHFCLI", ParseOnlyCLI)
    files = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    reward = CONFIG_ROOT / "demo" / "reward.yaml"
    config = cli_module.main(["--config", str(reward), f"--data.extra_train_files={files}"], run=False).config
    assert config.data.extra_train_files == files
    policy = CONFIG_ROOT / "demo" / "repo.yaml"
    prompts = str(tmp_path / "train_prompts.jsonl")
    config = cli_module.main(["--config", str(policy), f"--data.test_dataset={prompts}"], run=False).config
    assert config.data.test_dataset == prompts


def test_repo_round4_options_parse(monkeypatch):
    """`safety_margin` and `constraint: unsafe_prompt_rate` (README, docs/algorithm.md 7 and 12) reach RePO's init."""
    monkeypatch.setattr(cli_module, "RLHFCLI", ParseOnlyCLI)
    args = [
        "--config",
        str(CONFIG_ROOT / "demo" / "repo.yaml"),
        "--model.init_args.objective.init_args.safety_margin=1.0",
        "--model.init_args.objective.init_args.constraint=unsafe_prompt_rate",
    ]
    objective = cli_module.main(args, run=False).config.model.init_args.objective.init_args
    assert objective.safety_margin == 1.0 and objective.constraint == "unsafe_prompt_rate"


def test_repo_round5_options_parse(monkeypatch):
    """`penalty`, the oracle `scoring` sources and reward ensembles (docs/algorithm.md 13, 14) parse from the CLI."""
    monkeypatch.setattr(cli_module, "RLHFCLI", ParseOnlyCLI)
    args = [
        "--config",
        str(CONFIG_ROOT / "demo" / "repo.yaml"),
        "--model.init_args.objective.init_args.penalty=indicator",
        "--model.init_args.scoring.reward_source=oracle",
        "--model.init_args.scoring.cost_source=oracle",
        '--model.init_args.reward_ensemble_paths=["runs/a/reward_m1", "runs/a/reward_m2"]',
        "--model.init_args.scoring.reward_aggregate=mean_minus_std",
    ]
    init = cli_module.main(args, run=False).config.model.init_args
    assert init.reward_ensemble_paths == ["runs/a/reward_m1", "runs/a/reward_m2"]
    assert init.scoring.reward_aggregate == "mean_minus_std"
    assert init.objective.init_args.penalty == "indicator"
    assert init.scoring.reward_source == "oracle" and init.scoring.cost_source == "oracle"


def test_model_config_overrides_on_the_command_line_build_the_model_asked_for(monkeypatch, tmp_path):
    """``--model.init_args.model_config.KEY=VALUE`` arrives as a string; the model is built with the value it means."""
    from transformers import PreTrainedTokenizerFast

    from repo_lightning.models.backbone import load_causal_lm
    from repo_lightning.safetyworld import World, WorldConfig
    from tests.conftest import TINY_MODEL

    monkeypatch.setattr(cli_module, "RLHFCLI", ParseOnlyCLI)
    sft = CONFIG_ROOT / "demo" / "sft.yaml"
    overrides = [
        "--model.init_args.model_config.num_hidden_layers=3",
        "--model.init_args.model_config.rms_norm_eps=1e-5",
    ]
    model_config = cli_module.main(["--config", str(sft), *overrides], run=False).config.model.init_args.model_config
    assert model_config["num_hidden_layers"] == "3"  # what jsonargparse hands over for a free-form dict
    tokenizer = World(WorldConfig(num_topics=4)).build_tokenizer()
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    settings = {**TINY_MODEL, "num_hidden_layers": "3", "rms_norm_eps": "1e-5", "hidden_act": "silu"}
    settings["tie_word_embeddings"] = "false"
    config = load_causal_lm(tokenizer, model_config=settings).config
    assert config.num_hidden_layers == 3 and config.rms_norm_eps == 1e-5 and config.hidden_act == "silu"
    assert config.tie_word_embeddings is False
