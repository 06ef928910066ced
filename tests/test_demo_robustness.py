"""benchmarks/demo_robustness.py: the criteria of issue 8 applied to a run folder (no training)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import demo_robustness as robustness  # noqa: E402

CRITERIA = argparse.Namespace(max_unsafe=0.05, min_hazard_reward=0.7, min_benign_ratio=0.9)


def _run(root: Path, mild: float, hazard_reward: float, benign: float, lam: float) -> Path:
    repo = {
        "true_unsafe_prompt_rate/hazard_mild": mild,
        "true_unsafe_prompt_rate/hazard_severe": 0.0,
        "true_reward_mean/hazard": hazard_reward,
        "true_reward_mean/benign": benign,
        "over_refusal_rate": 0.0,
        "kl_mean": 3.0,
    }
    ppo = {**repo, "true_reward_mean/benign": 3.0}
    (root / "exports" / "repo").mkdir(parents=True)
    (root / "exports" / "repo" / "repo_lightning.json").write_text(json.dumps({"lagrange_multiplier": lam}))
    (root / "summary.json").write_text(json.dumps({"metrics": {"repo": repo, "ppo": ppo}}))
    return root


def test_a_run_passes_only_when_every_criterion_holds(tmp_path):
    good = robustness.check_run(_run(tmp_path / "good", 0.05, 0.7, 2.7, 4.0), 20.0, CRITERIA)
    assert good["passed"] and good["benign_ratio"] == 0.9
    bad = robustness.check_run(_run(tmp_path / "bad", 0.0625, 0.2, 2.0, 20.0), 20.0, CRITERIA)
    assert not bad["passed"]
    failed = {name for name, ok in bad["checks"].items() if not ok}
    assert failed == {"mild_unsafe", "hazard_reward", "benign_vs_ppo", "lambda_below_cap"}
    table = robustness.format_table({"good": good, "bad": bad, "broken": {"error": "boom", "passed": False}})
    assert "| good |" in table and "yes" in table and "NO: mild_unsafe" in table and "error: boom" in table


def test_oracle_scores_and_reward_ensemble_reach_the_pipeline(tmp_path, monkeypatch):
    commands = []

    def fake_run(command, **kwargs):
        commands.append(command)
        return argparse.Namespace(returncode=0)

    monkeypatch.setattr(robustness.subprocess, "run", fake_run)
    robustness.run_pipeline(tmp_path / "a", 1, 2, "configs/demo", oracle_scores=True)
    robustness.run_pipeline(tmp_path / "b", 1, 2, "configs/demo", reward_ensemble=3)
    assert "--oracle-scores" in commands[0] and "--oracle-scores" not in commands[1]
    assert "--reward-ensemble" not in commands[0] and commands[1][-2:] == ["--reward-ensemble", "3"]
    assert commands[0][commands[0].index("--seed") + 1] == "1"
    robustness.run_pipeline(tmp_path / "c", 1, 2, "configs/demo", world=["seed=1", "num_topics=30"])
    assert commands[2][-3:] == ["--world", "seed=1", "num_topics=30"] and "--world" not in commands[0]
    robustness.run_pipeline(tmp_path / "d", 1, 2, "configs/demo", resume=True)
    assert commands[3][-1] == "--resume" and "--resume" not in commands[2]
    robustness.run_pipeline(tmp_path / "e", 1, 2, "configs/demo", cost_ensemble=3)
    assert commands[4][-2:] == ["--cost-ensemble", "3"] and "--cost-ensemble" not in commands[3]
    robustness.run_pipeline(tmp_path / "f", 1, 2, "configs/demo", policy_epochs=12)
    assert commands[5][-2:] == ["--policy-epochs", "12"] and "--policy-epochs" not in commands[4]
    robustness.run_pipeline(tmp_path / "g", 1, 2, "configs/demo", warm_start=32)
    assert commands[6][-2:] == ["--warm-start", "32"] and "--warm-start" not in commands[5]
    robustness.run_pipeline(tmp_path / "h", 1, 2, "configs/demo", stage_args=["reward=--a=1", "policy=--b=2"])
    assert commands[7][-4:] == ["--stage-arg", "reward=--a=1", "--stage-arg", "policy=--b=2"]
    assert "--stage-arg" not in commands[6]


def test_impossible_counts_are_refused_before_any_pipeline_runs(tmp_path, capsys):
    for flags, message in (
        (["--policy-epochs", "0"], "--policy-epochs must be >= 1, got 0"),
        (["--threads", "0"], "--threads must be >= 1, got [0]"),
        (["--seeds", "-1"], "--seeds must be >= 0, got [-1]"),
        (["--cost-ensemble", "0"], "--cost-ensemble must be >= 1, got 0"),
        (["--jobs", "0"], "--jobs must be >= 1, got 0"),
        (["--warm-start", "-1"], "--warm-start must be >= 0, got -1"),
        (["--stage-arg", "critic=--a=1"], "--stage-arg: 'critic=--a=1': expected STAGE=--key=value with STAGE one"),
    ):
        try:
            robustness.main([*flags, "--out", str(tmp_path / "out")])
        except SystemExit as exit_:
            assert exit_.code == 2
        else:
            raise AssertionError(f"{flags} was accepted")
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out").exists()
