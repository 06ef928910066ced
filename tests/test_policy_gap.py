"""``benchmarks/policy_gap.py``: the KL-regularised optimum of a policy's own objective, against its samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from benchmarks.policy_gap import (
    COLUMNS,
    gap_candidates,
    main,
    policy_gap,
    policy_logprobs,
)
from benchmarks.probe_scores import reward_ensemble
from repo_lightning.models.backbone import load_causal_lm
from repo_lightning.safetyworld import World, WorldConfig
from repo_lightning.text.templates import SAFE_RLHF_TEMPLATE, encode_prompt, encode_response
from tests.conftest import TINY_WORLD, oracle_score_fns


def test_candidates_hold_the_best_safe_answer_and_no_duplicates() -> None:
    world = World(WorldConfig())
    mild = next(t for t in world.topics if t.kind == "hazard_mild")
    prompt = f"how do i {mild.verbs[0]} {mild.subject} ?"
    answers = gap_candidates(world, mild)
    assert len(answers) == len(set(answers))
    s, t = mild.safe_alt[:2]
    assert {f"{s} {t}", f"first {s}", f"first {s} {t}", world.refusal, ""} <= set(answers)
    safe_best = max(world.helpfulness(prompt, a) for a in answers if world.harm(prompt, a) <= 0)
    assert safe_best == 1.0  # two own safe_alt words: the best safe answer there is
    assert max(world.helpfulness(prompt, a) for a in answers) > 1.0  # unsafe detail answers are candidates too


def test_policy_logprobs_match_one_unpadded_forward_per_answer(tiny_exports: dict[str, str]) -> None:
    """Right padding of several answers of different lengths changes nothing: each answer's log-probability (its
    words and eos) equals a plain forward over that sequence alone."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_exports["sft"])
    model = load_causal_lm(tokenizer, tiny_exports["sft"]).eval()
    world = World(WorldConfig(**TINY_WORLD))
    prompt = world.eval_prompts()[0]["prompt"]
    topic = world.topic_of(prompt)
    answers = [topic.safe_alt[0], " ".join(topic.detail[:3]), ""]
    got = policy_logprobs(model, tokenizer)(prompt, answers)
    prompt_ids, _ = encode_prompt(tokenizer, prompt, SAFE_RLHF_TEMPLATE, 32)
    for answer, value in zip(answers, got, strict=True):
        response = encode_response(tokenizer, answer, 100)[0]
        ids = torch.tensor([prompt_ids + response])
        with torch.no_grad():
            logprobs = model(ids).logits[0, len(prompt_ids) - 1 : -1].log_softmax(-1)
        expected = logprobs.gather(1, torch.tensor(response)[:, None]).sum()
        assert value.item() == pytest.approx(expected.item(), abs=1e-4)


def test_aligned_reward_of_an_affine_copy_is_the_first_model() -> None:
    a = lambda prompts, answers: torch.tensor([1.0, -2.0, 0.5])  # noqa: E731
    affine = lambda prompts, answers: 2 * a(prompts, answers) + 3  # noqa: E731
    assert reward_ensemble([a], "mean_minus_std", 1.0, torch.zeros(0, 1)) is a
    reference = torch.tensor([[0.0, 3.0], [4.0, 11.0], [-1.0, 1.0]])  # the same affine map on the reference batch
    combined = reward_ensemble([a, affine], "mean_minus_std", 1.0, reference)([], [])
    assert torch.allclose(combined, a([], []), atol=1e-5)


def test_policy_gap_with_the_oracles_as_models() -> None:
    """With the oracles as reward and cost and a flat reference, the optimum of every hazard prompt is worth R* 1,
    so a policy that answers 'filler + one safety word' is 0.5 short (the optimiser's gap). With a reference that
    puts all its mass on the refusal and a large beta, the optimum is the refusal (R* 0: the models' gap)."""
    world = World(WorldConfig())
    rows = []
    for row in world.eval_prompts():
        topic = world.topic_of(row["prompt"])
        if topic.is_hazard:
            rows.append({"prompt": row["prompt"], "kind": topic.kind, "responses": [f"first {topic.safe_alt[0]}"] * 4})
    reward, cost = oracle_score_fns(world)
    flat = lambda prompt, answers: torch.zeros(len(answers))  # noqa: E731
    table = {r["kind"]: r for r in policy_gap(rows, world, reward, cost, flat, beta=0.1, policy=flat)}
    assert set(table) == {"hazard_mild", "hazard_severe"}
    for r in table.values():
        assert r["policy_true_reward"] == pytest.approx(0.5)
        assert r["optimum_true_reward"] == pytest.approx(1.0) and r["best_reward_true_reward"] == pytest.approx(1.0)
        assert r["optimum_in_samples"] == 0.0 and r["optimum_is_modal"] == 0.0
        assert r["objective_gap"] == pytest.approx(0.5)  # 1.0 - 0.5 with a flat reference
        assert r["optimum_policy_prob"] == r["optimum_reference_prob"] == 1.0  # exp(0) from the flat stubs
        assert r["prompts"] > 0 and r["prompts_without_safe_answer"] == 0
    refusal_only = lambda prompt, answers: torch.tensor([0.0 if a == world.refusal else -100.0 for a in answers])  # noqa: E731
    table = {r["kind"]: r for r in policy_gap(rows, world, reward, cost, refusal_only, beta=1.0)}
    for r in table.values():
        assert r["optimum_true_reward"] == 0.0 and r["best_reward_true_reward"] == pytest.approx(1.0)
        assert r["objective_gap"] == pytest.approx(99.5)  # (0 + 1 x 0) - (0.5 + 1 x -100)
        assert "optimum_policy_prob" not in r  # no policy given
    never_safe = lambda prompts, answers: torch.ones(len(answers))  # noqa: E731
    table = policy_gap(rows, world, reward, never_safe, flat, beta=0.1)
    assert all(r["prompts"] == 0 and r["prompts_without_safe_answer"] > 0 for r in table)


def test_main_on_tiny_exports_and_its_errors(tiny_exports: dict[str, str], tmp_path: Path, capsys) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    for name in ("sft", "reward", "cost"):
        (exports / name).symlink_to(tiny_exports[name])
    world = World(WorldConfig(**TINY_WORLD))
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    rows = []
    for row in world.eval_prompts():
        topic = world.topic_of(row["prompt"])
        responses = [topic.safe_alt[0], " ".join(topic.detail[:2]), topic.safe_alt[0]]
        rows.append({"prompt": row["prompt"], "kind": topic.kind, "responses": responses})
    (eval_dir / "per_prompt.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    world_args = ["--world", *(f"{k}={v}" for k, v in TINY_WORLD.items())]
    out = tmp_path / "gap.json"
    args = [str(exports), str(eval_dir), "--policy", tiny_exports["sft"], "--reward", "reward", "reward"]
    main([*args, *world_args, "--json", str(out)])
    table = json.loads(out.read_text())
    kinds = {r["kind"] for r in rows}
    assert {r["kind"] for r in table} == kinds
    assert sum(r["prompts"] + r["prompts_without_safe_answer"] for r in table) == len(rows)
    for r in table:
        if r["prompts"]:
            assert set(COLUMNS) <= set(r)
            assert 0 <= r["optimum_in_samples"] <= 1 and 0 < r["optimum_policy_prob"] <= 1
            # the policy is the reference here, so its probability of the optimum is the reference's
            assert r["optimum_policy_prob"] == pytest.approx(r["optimum_reference_prob"], rel=1e-3)
    assert "KL-regularised optimum" in capsys.readouterr().out
    main([*args, *world_args, "--kinds", "benign", "--json", str(out)])
    assert {r["kind"] for r in json.loads(out.read_text())} == {"benign"}
    with pytest.raises(SystemExit, match="per_prompt.jsonl: not found"):
        main([str(exports), str(tmp_path / "nowhere"), *world_args])
    (eval_dir / "per_prompt.jsonl").write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(SystemExit, match=r"row 1 \(line 2\): invalid JSON"):
        main([str(exports), str(eval_dir), *world_args])
    (eval_dir / "per_prompt.jsonl").write_text(json.dumps({"prompt": rows[0]["prompt"], "kind": "benign"}))
    with pytest.raises(SystemExit, match="row 0: expected a per_prompt.jsonl record with a string 'prompt'"):
        main([str(exports), str(eval_dir), *world_args])
    (eval_dir / "per_prompt.jsonl").write_text(json.dumps({"prompt": "hello there", "responses": ["hi"]}))
    with pytest.raises(SystemExit, match="row 0: .*is --world the run's world"):  # a prompt of no topic of this world
        main([str(exports), str(eval_dir), *world_args])
    with pytest.raises(SystemExit, match="export folder cost_m1/"):
        main([str(exports), str(eval_dir), "--cost", "cost", "cost_m1", *world_args])
    with pytest.raises(SystemExit, match="--beta must be > 0"):
        main([str(exports), str(eval_dir), "--beta", "0", *world_args])
