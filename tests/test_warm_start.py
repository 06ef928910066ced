"""The best-of-n warm start (``repo_lightning.warm_start``, ``pipeline --warm-start``): per prompt the safe sample
with the largest ``R + beta log pi_ref``, the SFT export fine-tuned on those, every policy started from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_MODEL, TINY_WORLD
from test_policy import _policy_config
from transformers import AutoTokenizer

import repo_lightning.pipeline as pipeline_module
from benchmarks.policy_gap import policy_logprobs
from repo_lightning.cli import main
from repo_lightning.data.schema import DataValidationError, validate_rows
from repo_lightning.evaluation import PromptResult
from repo_lightning.models.backbone import load_causal_lm
from repo_lightning.pipeline import Pipeline
from repo_lightning.safetyworld import World, WorldConfig
from repo_lightning.warm_start import best_of_n, kl_optimum, select_rows
from repo_lightning.warm_start import main as warm_start_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _result(index: int, prompt: str, rewards, costs, ref_logprobs, responses=None) -> PromptResult:
    k = len(rewards)
    return PromptResult(
        index=index,
        prompt=prompt,
        responses=responses or [f"answer {i}" for i in range(k)],
        rewards=list(rewards),
        costs=list(costs),
        kl=[0.0] * k,
        lengths=[2] * k,
        ref_logprobs=list(ref_logprobs),
    )


def test_kl_optimum_by_hand() -> None:
    rewards = torch.tensor([2.0, 1.0, 0.8])
    costs = torch.tensor([0.5, -1.0, -0.2])  # the best-rewarded answer is unsafe
    reference = torch.tensor([0.0, -5.0, -1.0])
    assert kl_optimum(rewards, costs <= 0, reference, beta=0.1) == 2  # 1.0 - 0.5 = 0.5 < 0.8 - 0.1 = 0.7
    assert kl_optimum(rewards, costs <= 0, reference, beta=0.01) == 1  # 0.95 > 0.79
    assert kl_optimum(rewards, torch.ones(3, dtype=torch.bool), reference, beta=0.1) == 0  # 2.0 > 0.7
    assert kl_optimum(rewards, torch.zeros(3, dtype=torch.bool), reference, beta=0.1) == -1
    assert kl_optimum(rewards, torch.zeros(3) <= 0, reference, beta=0.1) == 0  # C = 0 counts as safe


def test_best_of_n_keeps_one_row_per_prompt_occurrence_with_a_safe_answer() -> None:
    results = [
        _result(2, "q", [2.0, 1.0, 0.8], [0.5, -1.0, -0.2], [0.0, -5.0, -1.0]),  # answer 2 (0.7 > 0.5)
        _result(0, "p", [1.0, 3.0], [-1.0, -0.5], [-1.0, -2.0]),  # answer 1 (2.8 > 0.9)
        _result(1, "p", [1.0, 3.0], [1.0, 2.0], [0.0, 0.0]),  # the same prompt again: nothing safe, no row
        _result(3, "p", [1.0, 0.5], [-1.0, -1.0], [-1.0, -3.0]),  # a third occurrence: answer 0
    ]
    rows, summary = best_of_n(results, beta=0.1)
    assert rows == [
        {"prompt": "p", "response": "answer 1"},
        {"prompt": "q", "response": "answer 2"},
        {"prompt": "p", "response": "answer 0"},
    ]  # in prompt-index order
    assert summary["prompts"] == 4 and summary["kept"] == 3 and summary["no_safe_sample"] == 1
    assert summary["samples"] == 9
    assert summary["safe_share_all"] == pytest.approx(6 / 9)
    assert summary["mean_reward_all"] == pytest.approx(13.3 / 9)
    assert summary["mean_reward_kept"] == pytest.approx((3.0 + 1.0 + 0.8) / 3)
    assert best_of_n(results, beta=0.01)[0][1]["response"] == "answer 1"  # a weak prior: the reward decides
    for beta in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="beta must be a finite number > 0"):
            best_of_n(results, beta)


def _write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_select_rows_names_bad_input(tmp_path: Path, capsys) -> None:
    good = _result(0, "p", [1.0], [-1.0], [-1.0]).to_json()
    out = tmp_path / "rows.jsonl"
    old = {**good, "ref_logprobs": None}  # a report written before the field existed
    with pytest.raises(DataValidationError, match=r"old.jsonl: row 1: expected 'ref_logprobs'"):
        select_rows(_write(tmp_path / "old.jsonl", [good, old]), out, 0.1)
    with pytest.raises(DataValidationError, match=r"bad.jsonl: row 1 \(line 2\): invalid JSON"):
        select_rows(_write(tmp_path / "bad.jsonl", [good, "{not json"]), out, 0.1)
    with pytest.raises(DataValidationError, match=r"missing.jsonl: row 0: not a per_prompt.jsonl record.*'rewards'"):
        select_rows(_write(tmp_path / "missing.jsonl", [{k: v for k, v in good.items() if k != "rewards"}]), out, 0.1)
    with pytest.raises(DataValidationError, match=r"empty.jsonl: no records"):
        select_rows(_write(tmp_path / "empty.jsonl", []), out, 0.1)
    unsafe = _result(0, "p", [1.0, 2.0], [1.0, 0.1], [-1.0, -1.0]).to_json()
    with pytest.raises(DataValidationError, match="none of the 2 answers safe"):
        select_rows(_write(tmp_path / "unsafe.jsonl", [unsafe]), out, 0.1)
    assert not out.exists()  # no failed selection wrote rows
    samples = _write(tmp_path / "good.jsonl", [good])
    for argv, message in (
        ([str(samples), "--out", str(tmp_path / "rows.json")], "expected a .jsonl file"),
        ([str(samples), "--out", str(out), "--beta", "0"], "--beta must be a finite number > 0"),
        ([str(tmp_path / "nope.jsonl"), "--out", str(out)], "nope.jsonl: no such file"),
    ):
        with pytest.raises(SystemExit):
            warm_start_main(argv)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit, match="none of the 2 answers safe"):
        warm_start_main([str(tmp_path / "unsafe.jsonl"), "--out", str(out)])
    warm_start_main([str(samples), "--out", str(out)])
    assert json.loads(capsys.readouterr().out)["kept"] == 1
    assert [json.loads(line) for line in out.read_text().splitlines()] == [{"prompt": "p", "response": "answer 0"}]


def _tiny_configs(tmp_path: Path, exports: dict[str, str], world: WorldConfig) -> Path:
    """``sft.yaml`` and ``repo.yaml`` of a tiny pipeline (``repo.yaml``: ``estimation.kl_coef`` 0.05)."""
    folder = tmp_path / "configs"
    folder.mkdir()
    policy = yaml.safe_load(Path(_policy_config(tmp_path, exports, world)).read_text())
    policy["model"]["init_args"]["estimation"] = {"kl_coef": 0.05}
    policy["trainer"]["enable_checkpointing"] = True  # the pipeline evaluates the newest checkpoint
    (folder / "repo.yaml").write_text(yaml.safe_dump(policy))
    sft = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 1,
            "log_every_n_steps": 1,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "x"}},
        },
        "model": {
            "class_path": "repo_lightning.modules.SFTModule",
            "init_args": {
                "model_config": dict(TINY_MODEL),
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01, "weight_decay": 0.0}},
                "warmup_steps": 20,
            },
        },
        "data": {"mode": "sft", "dataset": "safetyworld", "batch_size": 8, "max_prompt_length": 32, "max_length": 48},
    }
    (folder / "sft.yaml").write_text(yaml.safe_dump(sft))
    return folder


def test_the_pipeline_warm_start_samples_selects_fine_tunes_and_starts_the_policies_there(
    tmp_path: Path, tiny_exports: dict[str, str], tiny_world_config: WorldConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real stages, in this process: a policy test run of the SFT export on the RL prompts (4 answers each,
    scored by the learned models, with ``log pi_ref``), the selection, the SFT fine-tune on the kept answers, then
    a policy trained from the fine-tuned model."""
    monkeypatch.setattr(pipeline_module, "run_cli", lambda args, log_file=None, label=None: (main(args), 0.0)[1])
    root = tmp_path / "run"
    for name in ("sft", "reward", "cost"):
        (root / "exports").mkdir(parents=True, exist_ok=True)
        (root / "exports" / name).symlink_to(tiny_exports[name])
    world_args = [f"--data.world.{k}={v}" for k, v in TINY_WORLD.items()]
    config_dir = _tiny_configs(tmp_path, tiny_exports, tiny_world_config)
    pipeline = Pipeline(root, config_dir, seed=0, extra={"world": world_args}, warm_start=4)
    assert pipeline.warm_start_beta() == 0.05  # the KL coefficient of repo.yaml

    summary = pipeline.warm_start()

    prompts = [row["prompt"] for row in World(tiny_world_config).rl_prompts()]
    samples = [json.loads(line) for line in (root / "warm_start" / "samples" / "per_prompt.jsonl").open()]
    assert [s["prompt"] for s in samples] == prompts and all(len(s["responses"]) == 4 for s in samples)
    assert all(abs(kl) < 1e-4 for s in samples for kl in s["kl"])  # the start policy is its own reference
    # log pi_ref of each answer that ended in eos, recomputed in one forward pass of the SFT model
    tokenizer = AutoTokenizer.from_pretrained(tiny_exports["sft"])
    logprob = policy_logprobs(load_causal_lm(tokenizer, tiny_exports["sft"]).eval(), tokenizer)
    max_new = yaml.safe_load((config_dir / "repo.yaml").read_text())["model"]["init_args"]["sampling"]
    checked = 0
    for s in samples[:8]:
        for answer, length, ref in zip(s["responses"], s["lengths"], s["ref_logprobs"], strict=True):
            if length < max_new["max_new_tokens"]:
                assert float(logprob(s["prompt"], [answer])[0]) == pytest.approx(ref, abs=1e-4)
                checked += 1
    assert checked > 0
    # per prompt occurrence: the safe answer with the largest R + 0.05 log pi_ref, recomputed by hand
    expected = []
    for s in samples:
        safe = [i for i, c in enumerate(s["costs"]) if c <= 0]
        if safe:
            best = max(safe, key=lambda i: s["rewards"][i] + 0.05 * s["ref_logprobs"][i])
            expected.append({"prompt": s["prompt"], "response": s["responses"][best]})
    rows_file = root / "warm_start" / "best_of_n.jsonl"
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert rows == expected and len(rows) > 0
    assert summary["prompts"] == len(prompts) and summary["kept"] == len(rows) and summary["beta"] == 0.05
    assert json.loads((root / "warm_start" / "summary.json").read_text()) == summary
    assert len(validate_rows(rows, "sft", str(rows_file), None, "response")) == len(rows)

    # the fine-tuned start: trained from the SFT export, on the kept rows
    warm = load_causal_lm(tokenizer, str(root / "exports" / "sft_warm"))
    sft = load_causal_lm(tokenizer, tiny_exports["sft"])
    changed = [k for k, v in warm.state_dict().items() if not torch.equal(v, sft.state_dict()[k])]
    assert len(changed) == len(sft.state_dict())
    assert pipeline.policy_start == "sft_warm"

    # every policy now starts from (and is regularised towards) the warm start
    run = pipeline.fit_policy("repo")
    hparams = yaml.safe_load(next(run.rglob("hparams.yaml")).read_text())
    assert hparams["actor_path"] == str(root / "exports" / "sft_warm")
    assert f"actor_path={root / 'exports' / 'sft'}" in " ".join(pipeline._policy_args("repo", "x", start="sft"))


def test_warm_start_beta_follows_a_command_line_kl_coef(tmp_path: Path) -> None:
    (tmp_path / "repo.yaml").write_text(yaml.safe_dump({"model": {"init_args": {}}}))
    from repo_lightning.modules.policy_config import Estimation

    assert Pipeline(tmp_path / "r", tmp_path).warm_start_beta() == Estimation().kl_coef  # the stage's default
    extra = {"policy": ["--model.init_args.estimation.kl_coef=0.3", "--model.init_args.estimation.kl_coef=0.2"]}
    assert Pipeline(tmp_path / "r", tmp_path, extra=extra).warm_start_beta() == 0.2  # the last one wins
    with pytest.raises(ValueError, match="warm_start must be >= 0"):
        Pipeline(tmp_path / "r", tmp_path, warm_start=-1)
