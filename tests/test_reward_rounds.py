"""benchmarks/reward_rounds.py: the models, data and policies of each reward-only round (stages recorded, not run)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import reward_rounds  # noqa: E402

from repo_lightning import pipeline as pipeline_module  # noqa: E402
from repo_lightning.pipeline import Pipeline  # noqa: E402


def _value(args: list[str], key: str) -> str:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{key}=")]
    return values[-1]  # the last one wins, as on the command line


def _config(args: list[str]) -> str:
    return args[args.index("--config") + 1]


@pytest.fixture
def recorded(tmp_path, monkeypatch):
    """A pipeline root whose stages are recorded; sampling writes one answer per training prompt."""
    root = tmp_path / "run"
    for folder in ("exports/sft", "logs/policy_ppo_e2", "logs/policy_repo"):
        (root / folder).mkdir(parents=True)
    stages: list[tuple[str, list[str]]] = []

    def run(self, name, args):
        stages.append((name, args))
        if name.startswith("sample_"):
            out = Path(_value(args, "--model.init_args.evaluation.report_dir"))
            out.mkdir(parents=True, exist_ok=True)
            prompts = [json.loads(line)["prompt"] for line in Path(_value(args, "--data.test_dataset")).open()]
            rows = [{"prompt": p, "responses": ["sorry i", "sorry i cannot help with that"]} for p in prompts[:5]]
            (out / "per_prompt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def train_policy(self, algorithm, name=None, extra=None, models=""):
        args = self._policy_args(algorithm, f"policy_{name}", extra, models)
        stages.append((f"fit_{name}", args))
        out = self.root / "eval" / name
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps({"true_reward_mean/hazard": 0.5, "kl_mean": 3.0}))
        return out

    monkeypatch.setattr(Pipeline, "_run", run)
    monkeypatch.setattr(Pipeline, "train_policy", train_policy)
    monkeypatch.setattr(pipeline_module, "latest_checkpoint", lambda folder: folder / "checkpoints" / "last.ckpt")
    return root, stages


def test_each_round_samples_the_previous_policies_and_retrains_only_the_reward_model(recorded, capsys):
    root, stages = recorded
    constraint = "--model.init_args.objective.init_args.constraint=unsafe_prompt_rate"
    code = reward_rounds.main(
        [
            "--root", str(root), "--seed", "3", "--rounds", "2", "--cost-ensemble", "3", "--policy-epochs", "12",
            "--policies", "ppo_e2:ppo", "repo", f"--repo-arg={constraint}",
        ]
    )  # fmt: skip
    assert code == 0
    names = [name for name, _ in stages]
    assert names == [
        "sample_r2_ppo_e2", "sample_r2_repo", "fit_reward_r2", "fit_ppo_e2_r2", "fit_repo_r2",
        "sample_r3_ppo_e2_r2", "sample_r3_repo_r2", "fit_reward_r3", "fit_ppo_e2_r3", "fit_repo_r3",
    ]  # fmt: skip
    by_name = dict(stages)
    exports = root / "exports"
    # round 2 samples the pipeline's own policies, with the pipeline's reward model, budget and cost ensemble
    sample = by_name["sample_r2_repo"]
    assert _value(sample, "--ckpt_path") == str(root / "logs" / "policy_repo" / "checkpoints" / "last.ckpt")
    assert _value(sample, "--model.init_args.reward_model_path") == str(exports / "reward")
    assert json.loads(_value(sample, "--model.init_args.cost_ensemble_paths")) == [
        str(exports / "cost_m1"),
        str(exports / "cost_m2"),
    ]
    assert _value(sample, "--trainer.max_epochs") == "12" and constraint not in sample
    assert _config(by_name["sample_r2_ppo_e2"]).endswith("ppo.yaml")
    # the reward model is retrained from the SFT start on every round's collected pairs; no cost stage runs
    r2 = [json.loads(_value(by_name["fit_reward_r2"], "--data.extra_train_files"))]
    r3 = json.loads(_value(by_name["fit_reward_r3"], "--data.extra_train_files"))
    pairs = root / "rounds" / "reward_rounds"
    assert r2 == [[str(pairs / "round2" / "pairs.jsonl")]]
    assert r3 == [str(pairs / "round2" / "pairs.jsonl"), str(pairs / "round3" / "pairs.jsonl")]
    assert _value(by_name["fit_reward_r3"], "--model.init_args.model_name_or_path") == str(exports / "sft")
    assert _config(by_name["fit_reward_r3"]).endswith("reward.yaml")
    assert not any("cost" in name for name in names)
    # the sampled answers were labelled into PKU-SafeRLHF-schema pairs
    rows = [json.loads(line) for line in (pairs / "round2" / "pairs.jsonl").open()]
    assert rows and all({"prompt", "response_0", "response_1", "better_response_id"} <= set(r) for r in rows)
    # the new policies score with the new reward model; the RePO argument reaches RePO only, in the new rounds
    fit_repo = by_name["fit_repo_r3"]
    assert _value(fit_repo, "--model.init_args.reward_model_path") == str(exports / "reward_r3")
    assert constraint in fit_repo and constraint in by_name["sample_r3_repo_r2"]
    assert constraint not in by_name["fit_ppo_e2_r3"]
    assert _value(by_name["fit_ppo_e2_r3"], "--model.init_args.reward_model_path") == str(exports / "reward_r3")
    record = json.loads((root / "rounds" / "reward_rounds.json").read_text())
    assert set(record) == {"2", "3"} and record["3"]["repo_r3"]["true_reward_mean/hazard"] == 0.5
    assert "repo_r3" in capsys.readouterr().out


def test_edit_pairs_flag_adds_one_edit_row_per_distinct_answer(recorded):
    """``--edit-pairs``: each sampled answer is also labelled against a one-word edit of itself."""
    root, _ = recorded
    base = ["--root", str(root), "--policies", "repo", "--rounds", "1"]
    pairs = root / "rounds" / "reward_rounds" / "round2" / "pairs.jsonl"
    assert reward_rounds.main(base) == 0
    plain = [json.loads(line) for line in pairs.open()]
    (root / "rounds" / "reward_rounds.json").unlink()
    shutil.rmtree(root / "eval")
    pairs.with_name("labels.json").unlink()  # a new labelling of the round (a rerun with other flags is refused)
    assert reward_rounds.main([*base, "--edit-pairs"]) == 0
    rows = [json.loads(line) for line in pairs.open()]
    # 5 prompts x 2 distinct answers: 1 pair of them + 2 reference pairs each, and with the flag 2 edit pairs more
    assert len(plain) == 5 * 3 and len(rows) == 5 * 5
    for answer, edit_rows in (("sorry i", rows[3::5]), ("sorry i cannot help with that", rows[4::5])):
        for row in edit_rows:
            pair = [row["response_0"], row["response_1"]]
            assert answer in pair
            edited = pair[1 - pair.index(answer)]
            words = [] if answer.startswith("sorry i cannot") else answer.split()
            assert abs(len(edited.split()) - len(words)) <= 1 and edited != answer  # a one-word edit


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--rounds", "0"], "--rounds must be >= 1, got 0"),
        (["--reward-ensemble", "3"], "only 1 is supported"),
        (["--policies", "a:b:c"], "--policies takes NAME or NAME:CONFIG"),
        (["--policies", "ppo_e9"], "no logs/policy_ppo_e9"),
    ],
)
def test_bad_flags_are_refused_naming_them(recorded, capsys, flags, message):
    root, stages = recorded
    with pytest.raises(SystemExit) as exit_:
        reward_rounds.main(["--root", str(root), *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err and not stages


def test_on_topic_pairs_flag_reaches_the_annotator(recorded, monkeypatch):
    """``--on-topic-pairs`` is passed to ``annotate_samples`` (off without the flag)."""
    root, _ = recorded
    seen = []
    real = reward_rounds.annotate_samples

    def spy(*args, **kwargs):
        seen.append(kwargs["on_topic_pairs"])
        return real(*args, **kwargs)

    monkeypatch.setattr(reward_rounds, "annotate_samples", spy)
    base = ["--root", str(root), "--policies", "repo", "--rounds", "1"]
    assert reward_rounds.main(base) == 0
    (root / "rounds" / "reward_rounds.json").unlink()
    shutil.rmtree(root / "eval")
    (root / "rounds" / "reward_rounds" / "round2" / "labels.json").unlink()
    assert reward_rounds.main([*base, "--on-topic-pairs"]) == 0
    assert seen == [False, True]


def test_a_rerun_with_other_labelling_flags_is_refused(recorded):
    """Rerunning relabels every round; with other flags that would change trained rounds' data, so it is refused."""
    root, _ = recorded
    base = ["--root", str(root), "--policies", "repo", "--rounds", "1", "--edit-pairs"]
    assert reward_rounds.main(base) == 0
    pairs = root / "rounds" / "reward_rounds" / "round2" / "pairs.jsonl"
    before = pairs.read_text()
    record = pairs.with_name("labels.json")
    assert json.loads(record.read_text()) == {"edit_pairs": True, "on_topic_pairs": False}
    for flags in ([], ["--on-topic-pairs"]):
        with pytest.raises(reward_rounds.ConfigError, match=r"labels\.json.*'edit_pairs': True"):
            reward_rounds.main([*base[:-1], *flags])
    assert pairs.read_text() == before  # the round's data untouched
    shutil.rmtree(root / "eval")  # the recorded stages' fake outputs
    assert reward_rounds.main(base) == 0  # the same flags: a rerun as before
    assert pairs.read_text() == before
