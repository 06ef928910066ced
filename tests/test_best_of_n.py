"""``benchmarks/best_of_n.py``: rejection sampling on the RL prompts, kept by ``R + beta log pi_ref`` among safe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.best_of_n import best_of_n, main, select
from repo_lightning.data.schema import validate_rows
from repo_lightning.safetyworld import World, WorldConfig
from tests.conftest import TINY_WORLD, oracle_score_fns


def test_select_by_hand() -> None:
    rewards = torch.tensor([2.0, 1.0, 0.8])
    costs = torch.tensor([0.5, -1.0, -0.2])  # the best-rewarded answer is unsafe
    reference = torch.tensor([0.0, -5.0, -1.0])
    assert select(rewards, costs, reference, beta=0.1) == 2  # 1.0 - 0.5 = 0.5 < 0.8 - 0.1 = 0.7
    assert select(rewards, costs, reference, beta=0.01) == 1  # 0.95 > 0.79
    assert select(rewards, torch.ones(3), reference, beta=0.1) == -1
    assert select(rewards, torch.zeros(3), reference, beta=0.1) == 0  # C = 0 counts as safe


def test_best_of_n_keeps_the_best_safe_answer_per_prompt() -> None:
    """With the oracles as models and a flat reference: on a hazard prompt the two safety words beat the detail
    answer (unsafe) and one safety word; a prompt whose answers are all unsafe gets no row. An affine copy of the
    reward model as a second ensemble member changes nothing (it is aligned to the first)."""
    world = World(WorldConfig())
    hazard = [t for t in world.topics if t.kind == "hazard_severe"][:2]
    prompts = [f"how do i {t.verbs[0]} {t.subject} ?" for t in hazard]
    a, b = hazard
    answers = [
        [" ".join(a.detail[:3]), a.safe_alt[0], " ".join(a.safe_alt[:2]), world.refusal],
        [" ".join(b.detail[:2]), b.detail[0]],
    ]
    reward, cost = oracle_score_fns(world)
    flat = lambda prompt, group: torch.zeros(len(group))  # noqa: E731
    rows, summary = best_of_n(prompts, answers, [reward], cost, flat, beta=0.1)
    assert rows == [{"prompt": prompts[0], "response": " ".join(a.safe_alt[:2])}]
    assert summary["prompts"] == 2 and summary["kept"] == 1 and summary["no_safe_sample"] == 1
    assert summary["safe_share_all"] == pytest.approx(3 / 6)
    assert summary["mean_reward_kept"] == pytest.approx(1.0)
    affine = lambda prompts, answers: 3 * reward(prompts, answers) - 2  # noqa: E731
    assert best_of_n(prompts, answers, [reward, affine], cost, flat, beta=0.1)[0] == rows
    # a reference that all but forbids the two safety words moves the choice to the one safety word
    prior = lambda prompt, group: torch.tensor([0.0 if len(x.split()) < 2 else -100.0 for x in group])  # noqa: E731
    assert best_of_n(prompts, answers, [reward], cost, prior, beta=0.1)[0][0]["response"] == a.safe_alt[0]


def test_main_writes_sft_rows_reproducibly(tiny_exports: dict[str, str], tmp_path: Path, capsys) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    for name in ("sft", "reward", "cost"):
        (exports / name).symlink_to(tiny_exports[name])
    world_args = ["--world", *(f"{k}={v}" for k, v in TINY_WORLD.items())]
    out = tmp_path / "raft" / "rows.jsonl"
    main([str(exports), "--out", str(out), "--samples", "4", "--reward", "reward", "reward", *world_args])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    world = World(WorldConfig(**TINY_WORLD))
    prompts = [r["prompt"] for r in world.rl_prompts()]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["prompts"] == len(prompts) and summary["kept"] == len(rows)
    assert summary["kept"] + summary["no_safe_sample"] == len(prompts)
    assert {r["prompt"] for r in rows} <= set(prompts)
    assert len(validate_rows(rows, "sft", str(out), None, "response")) == len(rows) > 0  # the SFT stage reads them
    first = out.read_text()
    main([str(exports), "--out", str(out), "--samples", "4", "--reward", "reward", "reward", *world_args])
    assert out.read_text() == first  # same seed, same rows
    with pytest.raises(SystemExit, match="expected a .jsonl file"):
        main([str(exports), "--out", str(tmp_path / "rows.json"), *world_args])
    with pytest.raises(SystemExit, match="export folder cost_m1/"):
        main([str(exports), "--out", str(out), "--cost", "cost", "cost_m1", *world_args])
    with pytest.raises(SystemExit, match="--samples and --max-new-tokens must be >= 1"):
        main([str(exports), "--out", str(out), "--samples", "0", *world_args])
