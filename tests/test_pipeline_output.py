"""What ``make demo`` prints: one line per stage, then the summary; a failed stage is named with its log file.

Stages are replaced by a fast fake script (``STAGE_COMMAND``) that prints a lot, as Lightning does, and writes the
files the pipeline reads back (a checkpoint after a policy fit, ``metrics.json`` after an evaluation).
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest

import repo_lightning.pipeline as pipeline_module
import repo_lightning.pipeline_stages as pipeline_stages
from repo_lightning.console import StageFailed, read_progress, run_stage
from repo_lightning.pipeline_cli import main as pipeline_main

FAKE_STAGE = """
import json, os, sys
from pathlib import Path

args = dict(a.split("=", 1) for a in sys.argv[2:] if "=" in a)
name = args["--trainer.logger.init_args.name"]
for i in range(300):
    print(f"noise {i}: Loading weights ... GPU available: False", flush=True)
if os.environ.get("FAIL_STAGE") == f"{sys.argv[1]}_{name}":
    print("Traceback (most recent call last):\\nValueError: the cause of the failure", file=sys.stderr)
    sys.exit(3)
run = Path(args["--trainer.logger.init_args.save_dir"]) / name
if sys.argv[1] == "fit" and name.startswith("policy_"):
    (run / "version_0" / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "version_0" / "checkpoints" / "last.ckpt").write_text("")
if "--model.init_args.evaluation.report_dir" in args:
    out = Path(args["--model.init_args.evaluation.report_dir"])
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"true_unsafe_response_rate": 0.5, "reward_mean": 1.0, "kl_mean": 0.0}
    (out / "metrics.json").write_text(json.dumps(metrics))
    if "--data.test_dataset" in args:  # a collection round or the warm start samples the training prompts
        prompts = [json.loads(line)["prompt"] for line in open(args["--data.test_dataset"])]
        with open(out / "per_prompt.jsonl", "w") as handle:
            for index, prompt in enumerate(prompts[:20]):
                record = {"prompt": prompt, "responses": ["", "sorry i cannot help with that"]}
                if out.name == "samples":  # the warm start's: scored; every fifth prompt has no safe answer
                    cost = 1.0 if index % 5 == 0 else -1.0
                    record.update(index=index, rewards=[0.5, 2.0], costs=[cost, cost], kl=[0.0, 0.0])
                    record.update(lengths=[1, 7], ref_logprobs=[-1.0, -20.0])
                handle.write(json.dumps(record) + chr(10))
if "--data.extra_train_files" in args:
    files = json.loads(args["--data.extra_train_files"])
    print("EXTRA_TRAIN_FILES", files, [sum(1 for _ in open(f)) for f in files])
"""


#: The stages after SFT (and after any collection round) of ``--algorithms ppo_lag repo``.
FINAL_ROUND_STAGES = [
    "fit_reward",
    "test_reward",
    "fit_cost",
    "test_cost",
    "eval_sft",
    "fit_ppo_lag",
    "eval_ppo_lag",
    "fit_repo",
    "eval_repo",
]


@pytest.fixture
def fake_stages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    script = tmp_path / "fake_stage.py"
    script.write_text(FAKE_STAGE)
    monkeypatch.setattr(pipeline_stages, "STAGE_COMMAND", [sys.executable, str(script)])
    monkeypatch.delenv("REPO_LIGHTNING_VERBOSE", raising=False)
    return tmp_path / "run"


def test_pipeline_prints_one_line_per_stage_then_the_summary(fake_stages, capsys):
    pipeline_main(["--root", str(fake_stages), "--algorithms", "ppo_lag", "repo"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) <= 60
    stage_lines = [line for line in lines if line.startswith("[")]
    assert [line.split()[1] for line in stage_lines] == ["fit_sft", *FINAL_ROUND_STAGES]
    assert all(line.startswith(f"[{i}/10]") and " done " in line for i, line in enumerate(stage_lines, 1))
    assert "noise" not in out
    assert "| metric | sft | ppo_lag | repo |" in out and "| true_unsafe_response_rate |" in out
    log = (fake_stages / "logs" / "fit_repo.log").read_text()
    assert log.count("noise") == 300 and log.startswith("$ ")
    assert "## Wall time" in (fake_stages / "summary.md").read_text()
    assert not list((fake_stages / "logs").glob("*.progress"))
    assert not (fake_stages / "rounds").exists()


def test_two_rounds_train_the_final_models_on_pairs_of_the_collectors_answers(fake_stages, capsys):
    pipeline_main(["--root", str(fake_stages), "--algorithms", "ppo_lag", "repo", "--preference-rounds", "2"])
    stage_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert [line.split()[1] for line in stage_lines] == [
        "fit_sft",
        "fit_round1_reward",
        "fit_round1_cost",
        "fit_round1_ppo_lag",
        "sample_round1_ppo_lag",
        "fit_round1_repo",
        "sample_round1_repo",
        *FINAL_ROUND_STAGES,
    ]
    assert all(line.startswith(f"[{i}/16]") for i, line in enumerate(stage_lines, 1))
    logs = fake_stages / "logs"
    # the collectors train on the first round's models, sample the training prompts (never the held-out ones)
    collector = (logs / "fit_round1_repo.log").read_text()
    assert "exports/round1_reward" in collector and "exports/round1_cost" in collector
    sample = (logs / "sample_round1_repo.log").read_text()
    assert f"test_dataset={fake_stages / 'rounds' / 'train_prompts.jsonl'}" in sample
    assert "evaluation.samples_per_prompt=8" in sample
    # 20 prompts x (2 distinct answers -> 1 pair, and each against a reference answer) from each of two collectors
    pairs = fake_stages / "rounds" / "round1" / "pairs.jsonl"
    for stage in ("reward", "cost"):
        assert f"EXTRA_TRAIN_FILES ['{pairs}'] [120]" in (logs / f"fit_{stage}.log").read_text()
    assert "EXTRA_TRAIN_FILES" not in (logs / "fit_round1_reward.log").read_text()
    final = (logs / "fit_repo.log").read_text().splitlines()[0]
    assert f"reward_model_path={fake_stages / 'exports' / 'reward'} " in final and "round1_" not in final


def test_a_failed_stage_is_named_with_its_log_file_and_last_lines(fake_stages, capsys, monkeypatch):
    monkeypatch.setenv("FAIL_STAGE", "fit_cost")
    with pytest.raises(SystemExit) as exit_info:
        pipeline_main(["--root", str(fake_stages)])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 1 + 4  # header, fit_sft, fit_reward, test_reward, fit_cost FAILED
    assert "FAILED" in captured.out.splitlines()[-1]
    log_file = fake_stages / "logs" / "fit_cost.log"
    assert f"full log: {log_file}" in captured.err
    assert captured.err.rstrip().endswith("ValueError: the cause of the failure")
    assert "noise 299" in captured.err and "noise 100" not in captured.err  # only the tail


def _stage_outcomes(out: str) -> dict[str, str]:
    """``{stage name: "done" | "skipped"}`` from the stage lines of the pipeline's output."""
    return {line.split()[1]: line.split("]")[-1].split()[0] for line in out.splitlines() if line.startswith("[")}


def test_resume_continues_an_interrupted_pipeline_at_the_failed_stage(fake_stages, capsys, monkeypatch):
    monkeypatch.setenv("FAIL_STAGE", "fit_policy_repo")  # the stage fit_repo (its run is named policy_repo)
    with pytest.raises(SystemExit):
        pipeline_main(["--root", str(fake_stages), "--algorithms", "ppo_lag", "repo"])
    capsys.readouterr()
    monkeypatch.delenv("FAIL_STAGE")
    pipeline_main(["--root", str(fake_stages), "--algorithms", "ppo_lag", "repo", "--resume"])
    outcomes = _stage_outcomes(capsys.readouterr().out)
    stages = ["fit_sft", *FINAL_ROUND_STAGES]
    assert list(outcomes) == stages
    first_rerun = stages.index("fit_repo")
    assert all(outcomes[s] == "skipped" for s in stages[:first_rerun])
    assert all(outcomes[s] == "done" for s in stages[first_rerun:])
    assert (fake_stages / "summary.md").is_file()
    # everything finished: a second resume skips every stage; without --resume every stage runs again
    pipeline_main(["--root", str(fake_stages), "--algorithms", "ppo_lag", "repo", "--resume"])
    assert set(_stage_outcomes(capsys.readouterr().out).values()) == {"skipped"}
    pipeline_main(["--root", str(fake_stages), "--algorithms", "ppo_lag", "repo"])
    assert set(_stage_outcomes(capsys.readouterr().out).values()) == {"done"}


def test_resume_reruns_from_the_first_stage_whose_config_or_arguments_changed(fake_stages, tmp_path, capsys):
    configs = tmp_path / "configs"
    shutil.copytree(Path(pipeline_module.__file__).parents[1] / "configs" / "demo", configs)
    base = ["--root", str(fake_stages), "--config-dir", str(configs), "--algorithms", "repo"]
    pipeline_main(base)
    capsys.readouterr()
    (configs / "cost.yaml").write_text((configs / "cost.yaml").read_text() + "\n# edited\n")
    pipeline_main([*base, "--resume"])
    outcomes = _stage_outcomes(capsys.readouterr().out)
    assert [s for s, o in outcomes.items() if o == "skipped"] == ["fit_sft", "fit_reward", "test_reward"]
    assert outcomes["fit_cost"] == "done" and outcomes["eval_repo"] == "done"  # and every later stage
    pipeline_main([*base, "--resume", "--seed", "1"])  # other arguments: nothing is skipped
    assert set(_stage_outcomes(capsys.readouterr().out).values()) == {"done"}


def test_run_stage_shows_progress_on_a_terminal(tmp_path):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    script = (
        "import os, pathlib, time\n"
        "path = pathlib.Path(os.environ['REPO_LIGHTNING_PROGRESS_FILE'])\n"
        "path.write_text('3 4\\n')\n"
        "time.sleep(1.2)\n"
    )
    terminal = Terminal()
    seconds = run_stage([sys.executable, "-c", script], tmp_path / "stage.log", "[1/1] fake", terminal)
    frames = terminal.getvalue().split("\r")
    assert any("75%" in frame for frame in frames)
    assert frames[-1].startswith("[1/1] fake") and " done " in frames[-1] and frames[-1].endswith(" s\n")
    assert terminal.getvalue().count("\n") == 1 and seconds >= 1.0


def test_run_stage_raises_with_the_log_tail(tmp_path):
    stream = io.StringIO()
    with pytest.raises(StageFailed, match="exit code 2"):
        run_stage(
            [sys.executable, "-c", "import sys; print('last words'); sys.exit(2)"], tmp_path / "x.log", "x", stream
        )
    assert "FAILED" in stream.getvalue()


def test_read_progress_ignores_missing_and_partial_files(tmp_path):
    path = tmp_path / "p"
    assert read_progress(path) is None
    path.write_text("3")
    assert read_progress(path) is None
    path.write_text("3 12\n")
    assert read_progress(path) == (3, 12)


def test_entry_points_drop_only_known_third_party_noise(caplog, monkeypatch):
    import logging
    import warnings

    from repo_lightning.console import silence_known_noise

    monkeypatch.delenv("REPO_LIGHTNING_VERBOSE", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_noise()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("model.cost_model_path is ignored for ppo", UserWarning, stacklevel=1)  # one of ours
    assert [str(w.message) for w in caught] == ["model.cost_model_path is ignored for ppo"]
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("💡 Tip: For seamless cloud logging, try installing [litlogger]")
        logger.info("GPU available: False, used: False")
    assert [record.getMessage() for record in caplog.records] == ["GPU available: False, used: False"]


def test_verbose_keeps_every_warning(monkeypatch):
    import warnings

    from repo_lightning.console import silence_known_noise

    monkeypatch.setenv("REPO_LIGHTNING_VERBOSE", "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_noise()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=1)
    assert len(caught) == 1


def test_oracle_scores_reach_every_policy_stage_and_no_score_stage(fake_stages, capsys):
    pipeline_main(["--root", str(fake_stages), "--algorithms", "repo", "--oracle-scores"])
    logs = fake_stages / "logs"
    for stage in ("eval_sft", "fit_repo", "eval_repo"):
        command = (logs / f"{stage}.log").read_text().splitlines()[0]
        assert all(arg in command for arg in pipeline_module.ORACLE_SCORE_ARGS), stage
    for stage in ("fit_sft", "fit_reward", "test_reward", "fit_cost", "test_cost"):
        assert "scoring." not in (logs / f"{stage}.log").read_text().splitlines()[0], stage


def test_policy_epochs_reach_every_policy_stage_ppo_included_and_no_score_stage(fake_stages, capsys):
    pipeline_main(
        ["--root", str(fake_stages), "--algorithms", "ppo", "repo", "--policy-epochs", "12", "--oracle-scores"]
    )
    logs = fake_stages / "logs"
    for stage in ("fit_ppo", "fit_repo"):
        command = (logs / f"{stage}.log").read_text().splitlines()[0]
        # one budget for every algorithm, given after the config so that it wins, beside the other policy flags
        assert command.count("--trainer.max_epochs=") == 1 and "--trainer.max_epochs=12" in command, stage
        assert all(arg in command for arg in pipeline_module.ORACLE_SCORE_ARGS), stage
    for stage in ("fit_sft", "fit_reward", "fit_cost"):
        assert "max_epochs" not in (logs / f"{stage}.log").read_text().splitlines()[0], stage


def test_world_reaches_every_stage_and_the_summary(fake_stages, capsys):
    pipeline_main(["--root", str(fake_stages), "--algorithms", "ppo", "repo", "--world", "seed=1", "num_topics=30"])
    logs = fake_stages / "logs"
    stages = ["fit_sft", *[s for s in FINAL_ROUND_STAGES if "ppo_lag" not in s], "fit_ppo", "eval_ppo"]
    for stage in stages:
        command = (logs / f"{stage}.log").read_text().splitlines()[0]
        assert "--data.world.seed=1 --data.world.num_topics=30" in command, stage
    summary = json.loads((fake_stages / "summary.json").read_text())
    assert summary["world"] == {"seed": 1, "num_topics": 30}
    assert "SafetyWorld: seed=1 num_topics=30." in (fake_stages / "summary.md").read_text()


def test_stage_args_reach_their_stage_after_the_config_and_are_named_in_the_summary(fake_stages, capsys):
    argv = ["--root", str(fake_stages), "--algorithms", "ppo", "repo", "--reward-ensemble", "2", "--warm-start", "4"]
    argv += ["--policy-epochs", "6", "--stage-arg", "reward=--data.world.num_preference_rows=32000"]
    argv += ["--stage-arg", "reward=--trainer.max_epochs=2", "--stage-arg", "policy=--trainer.max_epochs=5"]
    pipeline_main(argv)
    logs = fake_stages / "logs"

    def command(stage: str) -> list[str]:
        return (logs / f"{stage}.log").read_text().splitlines()[0].split()

    reward_args = ["--data.world.num_preference_rows=32000", "--trainer.max_epochs=2"]
    for stage in ("fit_reward", "test_reward", "fit_reward_m1"):
        args = command(stage)
        at = args.index(reward_args[0])
        assert args[at : at + 2] == reward_args and at > args.index("--config"), stage  # in order, after the config
    for stage in ("fit_sft", "fit_sft_m1", "fit_cost", "test_cost", "eval_sft", "fit_sft_warm"):
        assert not any(a in command(stage) for a in reward_args), stage
    for stage in ("sample_warm_start", "fit_ppo", "eval_ppo", "fit_repo", "eval_repo"):
        args = command(stage)
        # after --policy-epochs' 6 (and the config), so the user's 5 wins
        assert args.index("--trainer.max_epochs=5") > args.index("--trainer.max_epochs=6") > args.index("--config")
    summary = json.loads((fake_stages / "summary.json").read_text())
    assert summary["stage_args"] == {"reward": reward_args, "policy": ["--trainer.max_epochs=5"]}
    text = (fake_stages / "summary.md").read_text()
    assert "reward: `--data.world.num_preference_rows=32000` `--trainer.max_epochs=2`; policy: `--trainer" in text


def test_default_world_is_named_in_the_summary(fake_stages, capsys):
    pipeline_main(["--root", str(fake_stages), "--algorithms", "repo"])
    assert "--data.world." not in (fake_stages / "logs" / "fit_sft.log").read_text().splitlines()[0]
    assert json.loads((fake_stages / "summary.json").read_text())["world"] == {}
    assert json.loads((fake_stages / "summary.json").read_text())["stage_args"] == {}
    assert "--stage-arg" not in (fake_stages / "summary.md").read_text()
    assert "SafetyWorld: the default one." in (fake_stages / "summary.md").read_text()


# the stages before an ensemble's members, and those after them for --algorithms repo
FIRST_ROUND_STAGES = ["fit_sft", "fit_reward", "test_reward", "fit_cost", "test_cost"]
REPO_STAGES = ["eval_sft", "fit_repo", "eval_repo"]


def test_reward_ensemble_trains_members_from_their_own_sft_starts(fake_stages, capsys):
    pipeline_main(["--root", str(fake_stages), "--algorithms", "repo", "--seed", "3", "--reward-ensemble", "3"])
    stage_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    members = ["fit_sft_m1", "fit_reward_m1", "fit_sft_m2", "fit_reward_m2"]
    assert [line.split()[1] for line in stage_lines] == [*FIRST_ROUND_STAGES, *members, *REPO_STAGES]
    assert all(line.startswith(f"[{i}/12]") for i, line in enumerate(stage_lines, 1))
    logs, exports = fake_stages / "logs", fake_stages / "exports"
    sft = (logs / "fit_sft_m2.log").read_text().splitlines()[0]
    assert sft.rstrip().endswith(f"--seed_everything=2003 --model.init_args.export_dir={exports / 'sft_m2'}")
    reward = (logs / "fit_reward_m1.log").read_text().splitlines()[0]
    assert "--seed_everything=1003" in reward and f"model_name_or_path={exports / 'sft_m1'}" in reward
    for stage in ("fit_repo", "eval_repo", "eval_sft"):
        command = (logs / f"{stage}.log").read_text().splitlines()[0]
        assert f'reward_ensemble_paths=["{exports / "reward_m1"}", "{exports / "reward_m2"}"]' in command, stage
        assert "scoring.reward_aggregate=mean_minus_std" in command
        assert f"reward_model_path={exports / 'reward'} " in command  # the first member, and the critic's start


def test_cost_ensemble_trains_cost_members_beside_the_reward_members_on_shared_sft_starts(fake_stages, capsys):
    argv = ["--root", str(fake_stages), "--algorithms", "repo", "--seed", "3", "--reward-ensemble", "2"]
    pipeline_main([*argv, "--cost-ensemble", "3"])
    stage_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    # member 1: its SFT start, a reward and a cost model; member 2: its SFT start and a cost model only
    members = ["fit_sft_m1", "fit_reward_m1", "fit_cost_m1", "fit_sft_m2", "fit_cost_m2"]
    assert [line.split()[1] for line in stage_lines] == [*FIRST_ROUND_STAGES, *members, *REPO_STAGES]
    assert all(line.startswith(f"[{i}/13]") for i, line in enumerate(stage_lines, 1))
    logs, exports = fake_stages / "logs", fake_stages / "exports"
    cost = (logs / "fit_cost_m2.log").read_text().splitlines()[0]
    assert "--seed_everything=2003" in cost and f"model_name_or_path={exports / 'sft_m2'}" in cost
    assert "configs/demo/cost.yaml" in cost and f"export_dir={exports / 'cost_m2'}" in cost
    for stage in ("fit_repo", "eval_repo", "eval_sft"):
        command = (logs / f"{stage}.log").read_text().splitlines()[0]
        assert f'cost_ensemble_paths=["{exports / "cost_m1"}", "{exports / "cost_m2"}"]' in command, stage
        assert "scoring.cost_aggregate=max" in command
        assert f'reward_ensemble_paths=["{exports / "reward_m1"}"]' in command
        assert f"cost_model_path={exports / 'cost'} " in command  # the first member, and the cost critic's start
    assert json.loads((fake_stages / "summary.json").read_text())["ensembles"] == {"reward": 2, "cost": 3}
    assert (
        "2 reward model(s) (mean - std) and 3 cost model(s) (the largest cost)"
        in (fake_stages / "summary.md").read_text()
    )


def test_without_ensembles_the_policies_get_no_ensemble_arguments(fake_stages, capsys):
    pipeline_main(["--root", str(fake_stages), "--algorithms", "repo"])
    command = (fake_stages / "logs" / "fit_repo.log").read_text().splitlines()[0]
    assert "ensemble_paths" not in command and "aggregate" not in command
    assert json.loads((fake_stages / "summary.json").read_text())["ensembles"] == {"reward": 1, "cost": 1}
    assert "cost model(s)" not in (fake_stages / "summary.md").read_text()


def test_a_missing_config_folder_an_uncreatable_root_or_a_bad_seed_is_named_before_any_stage_runs(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cases = (
        (["--root", str(tmp_path / "run"), "--config-dir", str(tmp_path / "no_configs")], "--config-dir: "),
        (["--root", str(blocker / "run")], f"--root: cannot create the run folder {blocker / 'run'}"),
        (["--root", str(tmp_path / "run"), "--seed", "-5"], "--seed must be in [0, 4294967295], got -5"),
        (["--root", str(tmp_path / "run"), "--world", "num_topic=3"], "--world: expected KEY=VALUE with KEY a"),
        (["--root", str(tmp_path / "run"), "--world", "mild_frac=2"], "--world: "),
        # the last reward-ensemble member trains with seed + 2000, which must still be a valid seed
        (["--root", str(tmp_path / "run"), "--seed", str(2**32 - 1000), "--reward-ensemble", "3"], "--seed must be in"),
        (["--root", str(tmp_path / "run"), "--seed", str(2**32 - 1000), "--cost-ensemble", "3"], "--seed must be in"),
        (["--root", str(tmp_path / "run"), "--cost-ensemble", "0"], "--cost-ensemble must be >= 1, got 0"),
        (["--root", str(tmp_path / "run"), "--policy-epochs", "0"], "--policy-epochs must be >= 1, got 0"),
        (["--root", str(tmp_path / "run"), "--stage-arg", "rewards=--x=1"], "--stage-arg: 'rewards=--x=1': expected"),
        (["--root", str(tmp_path / "run"), "--stage-arg", "reward=2"], "--stage-arg: 'reward=2': expected STAGE="),
        (["--root", str(tmp_path / "run"), "--stage-arg", "cost=--trainer.max_epochs"], "--stage-arg: 'cost=--tr"),
        (["--root", str(tmp_path / "run"), "--stage-arg", "reward=--data.world.num_rows=8"], "--stage-arg: expected"),
    )
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            pipeline_main(argv)
        assert exit_info.value.code == 2
        assert expected in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_warm_start_runs_after_the_score_models_and_every_policy_starts_from_it(fake_stages, capsys):
    pipeline_main(["--root", str(fake_stages), "--algorithms", "ppo", "repo", "--warm-start", "16"])
    stage_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    warm = ["sample_warm_start", "fit_sft_warm", "eval_sft_warm"]
    policies = ["fit_ppo", "eval_ppo", "fit_repo", "eval_repo"]
    assert [line.split()[1] for line in stage_lines] == [*FIRST_ROUND_STAGES, "eval_sft", *warm, *policies]
    assert all(line.startswith(f"[{i}/13]") for i, line in enumerate(stage_lines, 1))
    logs, exports, folder = fake_stages / "logs", fake_stages / "exports", fake_stages / "warm_start"
    sample = (logs / "sample_warm_start.log").read_text().splitlines()[0]
    assert f"actor_path={exports / 'sft'} " in sample and "configs/demo/repo.yaml" in sample
    assert "evaluation.samples_per_prompt=16" in sample and f"test_dataset={folder / 'train_prompts.jsonl'}" in sample
    # R + 0.1 log pi_ref (configs/demo/repo.yaml's kl_coef): 0.5 - 0.1 > 2.0 - 2.0; every fifth has no safe answer
    rows = [json.loads(line) for line in (folder / "best_of_n.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(row["response"] == "" for row in rows)
    fine_tune = (logs / "fit_sft_warm.log").read_text().splitlines()[0]
    assert "configs/demo/sft.yaml" in fine_tune and f"model_name_or_path={exports / 'sft'} " in fine_tune
    assert f"--data.dataset={folder / 'best_of_n.jsonl'} " in fine_tune
    assert all(arg in fine_tune for arg in pipeline_module.WARM_START_SFT_ARGS)
    assert fine_tune.rstrip().endswith(f"--model.init_args.export_dir={exports / 'sft_warm'}")
    assert f"actor_path={exports / 'sft'} " in (logs / "eval_sft.log").read_text().splitlines()[0]
    for stage in ("eval_sft_warm", "fit_ppo", "eval_ppo", "fit_repo", "eval_repo"):
        assert f"actor_path={exports / 'sft_warm'} " in (logs / f"{stage}.log").read_text().splitlines()[0], stage
    summary = json.loads((fake_stages / "summary.json").read_text())
    assert summary["warm_start"]["kept"] == 16 and summary["warm_start"]["prompts"] == 20
    assert "sft_warm" in summary["metrics"]
    text = (fake_stages / "summary.md").read_text()
    # best-of-2: the summary counts the answers the sampling stage gave (the fake gives 2 a prompt)
    assert "best-of-2 warm start `sft_warm` (16 of 20 RL prompts kept a safe answer; beta 0.1)" in text


def test_without_a_warm_start_the_policies_start_from_the_sft_export(fake_stages, capsys):
    pipeline_main(["--root", str(fake_stages), "--algorithms", "repo"])
    assert f"actor_path={fake_stages / 'exports' / 'sft'} " in (fake_stages / "logs" / "fit_repo.log").read_text()
    assert not (fake_stages / "warm_start").exists()
    assert json.loads((fake_stages / "summary.json").read_text())["warm_start"] is None
    assert "warm start" not in (fake_stages / "summary.md").read_text()
