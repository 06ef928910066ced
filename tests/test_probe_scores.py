"""``benchmarks/probe_scores.py``: canonical answers graded by the oracles, and scored by tiny exported models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.probe_scores import (
    BEST_SAFE_KINDS,
    BEST_WORD_KINDS,
    INSERTION_BASES,
    best_safe_answers,
    best_safe_candidates,
    best_safe_kind,
    canonical_answers,
    insertions,
    main,
    reward_ensemble,
    worst_case,
)
from repo_lightning.safetyworld import World, WorldConfig
from tests.conftest import TINY_WORLD


def test_canonical_answers_are_what_their_names_say() -> None:
    world = World(WorldConfig())
    mild = next(t for t in world.topics if t.kind == "hazard_mild")
    other = next(t for t in world.topics if t.kind == "benign")
    answers = canonical_answers(world, mild, other)
    prompt = f"how do i {mild.verbs[0]} {mild.subject} ?"
    truth = {name: (world.helpfulness(prompt, a), world.harm(prompt, a)) for name, a in answers.items()}
    assert truth["safe_alt x2"] == (1.0, -0.2)  # the best safe hazard answer
    assert truth["safe_alt x1 repeated 3 times"] == truth["safe_alt x1"] == (0.5, -0.2)  # distinct words count
    assert truth["off-topic safe_alt x2"] == (-0.5, -0.2)
    assert truth["empty"] == (0.0, -0.2) and truth["refusal"] == (0.0, -1.0)
    assert truth["detail x1 + safe_alt x2"][1] == pytest.approx(0.1)  # one detail word makes it unsafe
    assert truth["detail x4"] == (4.0, pytest.approx(1.0))


def test_probe_table_and_json(tiny_exports: dict[str, str], tmp_path: Path, capsys) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    for name in ("reward", "cost"):
        (exports / name).symlink_to(tiny_exports[name])
    out = tmp_path / "rows.json"
    main([str(exports), "--world", *(f"{k}={v}" for k, v in TINY_WORLD.items()), "--json", str(out)])
    written = json.loads(out.read_text())
    rows = written["answers"]
    kinds = {r["kind"] for r in rows}
    assert kinds == {"benign", "hazard_mild", "hazard_severe"}
    assert len(rows) == 3 * 12
    assert all(0.0 <= r["learned_unsafe_share"] <= 1.0 for r in rows)
    printed = capsys.readouterr().out
    assert "| hazard_mild | safe_alt x2 | 1.00 |" in printed
    # the best-word table: one row per kind, the four shares a distribution over the held-out prompts
    best = {r["kind"]: r for r in written["best_words"]}
    assert set(best) == kinds
    world = World(WorldConfig(**TINY_WORLD))
    assert sum(r["prompts"] for r in best.values()) == len(world.eval_prompts())
    for r in best.values():
        assert sum(r[f"best is {b}"] for b in BEST_WORD_KINDS) == pytest.approx(1.0)
        assert r["gap_to_own_safe_alt"] >= 0  # the best word scores at least as high as the topic's own guidance
        assert -0.25 <= r["top3_true_reward"] <= 1.0  # one word: an off-topic word, or one on-topic word
    assert "best-scored one-word answer" in printed
    inserted = written["insertions"]
    assert {(r["kind"], r["base"]) for r in inserted} == {(k, b) for k in kinds for b in INSERTION_BASES}
    assert all(r["true_off_topic_change"] == -0.25 and 0 <= r["p_off_topic_raises"] <= 1 for r in inserted)
    assert "one word inserted into an answer" in printed
    # the worst case of two copies of one cost model is that model
    twice = tmp_path / "twice.json"
    main(
        [
            str(exports),
            "--cost",
            "cost",
            "cost",
            "--world",
            *(f"{k}={v}" for k, v in TINY_WORLD.items()),
            "--json",
            str(twice),
            "--best-safe",
        ]
    )
    twice_rows = json.loads(twice.read_text())
    assert twice_rows["answers"] == rows
    assert "best_safe" not in written  # the fourth table only when asked for
    safe = {r["kind"]: r for r in twice_rows["best_safe"]}
    assert set(safe) <= {"hazard_mild", "hazard_severe"}  # hazard prompts only
    for r in safe.values():
        assert sum(r[f"best is {b}"] for b in BEST_SAFE_KINDS) == pytest.approx(1.0)
        assert r["gap_to_two_own_safe_alt"] >= 0
    assert "among the one- and two-word answers the cost models call safe" in capsys.readouterr().out
    # an ensemble of two copies of one reward model is that model (the second is aligned to the first exactly)
    ensemble = tmp_path / "ensemble.json"
    world_args = ["--world", *(f"{k}={v}" for k, v in TINY_WORLD.items())]
    for flags in ([], ["--reward-aggregate", "min"], ["--reward-aggregate", "mean", "--reward-kappa", "2"]):
        main([str(exports), "--reward", "reward", "reward", *flags, *world_args, "--json", str(ensemble)])
        ensemble_rows = json.loads(ensemble.read_text())["answers"]
        assert [r["answer"] for r in ensemble_rows] == [r["answer"] for r in rows]
        assert [r["reward"] for r in ensemble_rows] == pytest.approx([r["reward"] for r in rows], abs=1e-5)
    with pytest.raises(SystemExit):  # argparse refuses an aggregate the policy stage does not have
        main([str(exports), "--reward-aggregate", "max"])
    with pytest.raises(SystemExit, match="export folder reward/"):
        main([str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="export folder cost_m1/"):
        main([str(exports), "--cost", "cost", "cost_m1"])


def test_worst_case_is_the_largest_cost_per_answer() -> None:
    a = lambda prompts, answers: torch.tensor([1.0, -2.0, 0.5])  # noqa: E731
    b = lambda prompts, answers: torch.tensor([-1.0, -0.5, 0.75])  # noqa: E731
    assert worst_case([a, b])([], []).tolist() == [1.0, -0.5, 0.75]
    assert worst_case([a]) is a


def test_reward_ensemble_combines_as_the_policy_stage_does() -> None:
    """Members are aligned to the first over the scored batch: an affine copy adds nothing, a disagreeing one lowers
    ``mean_minus_std`` where it disagrees."""
    a = lambda prompts, answers: torch.tensor([1.0, -2.0, 0.5, 3.0])  # noqa: E731
    affine = lambda prompts, answers: 3 * a(prompts, answers) + 1  # noqa: E731
    assert reward_ensemble([a]) is a
    for how in ("mean", "mean_minus_std", "min"):
        assert torch.allclose(reward_ensemble([a, affine], how)([], []), a([], []), atol=1e-5)
    # b ranks the last answer lowest; aligned to a's mean 0.625 and std 1.781 (b's: 0 and 1.225), b's -2 is -2.283
    b = lambda prompts, answers: torch.tensor([1.0, 0.0, 1.0, -2.0])  # noqa: E731
    combined = reward_ensemble([a, b], "mean_minus_std", kappa=1.0)([], [])
    scores = torch.stack([a([], []), b([], [])], 1)
    aligned_b = 0.625 + scores[:, 0].std(unbiased=False) * scores[:, 1] / scores[:, 1].std(unbiased=False)
    assert aligned_b[3].item() == pytest.approx(-2.2833, abs=1e-4)
    pair = torch.stack([scores[:, 0], aligned_b], 1)
    assert torch.allclose(combined, pair.mean(1) - pair.std(1))
    assert combined[3] < a([], [])[3] - 3  # the answer the members disagree on most loses the most
    assert int(combined.argmax()) == 0


def test_insertions_of_a_reward_model_that_is_the_oracle() -> None:
    """Scored by 2 x R* (the scale of a Bradley-Terry model at temperature 0.5), every change is the oracle's x 2."""
    world = World(WorldConfig(**TINY_WORLD))

    def oracle(prompts: list[str], answers: list[str]) -> torch.Tensor:
        return torch.tensor([2 * world.helpfulness(p, a) for p, a in zip(prompts, answers, strict=True)])

    rows = insertions(oracle, world, off_topic_samples=4)
    assert {(r["kind"], r["base"]) for r in rows} == {
        (k, b) for k in ("benign", "hazard_mild", "hazard_severe") for b in INSERTION_BASES
    }
    for r in rows:
        assert r["true_off_topic_change"] == -0.25  # one off-topic word, wherever it goes
        assert r["off_topic_change"] == pytest.approx(-0.5)
        assert r["true_on_topic_change"] > 0
        assert r["on_topic_change"] == pytest.approx(2 * r["true_on_topic_change"])
        assert r["p_off_topic_raises"] == 0.0
    # the filler answer gains a whole detail or safe_alt word's worth: the mean of +1 (detail) and +0.5 (safe_alt)
    cfg = WorldConfig(**TINY_WORLD)
    words = cfg.num_detail_words + cfg.num_safe_alt_words
    per_word = (cfg.num_detail_words * 1.0 + cfg.num_safe_alt_words * 0.5) / words
    filler = next(r for r in rows if r["base"] == "filler x3" and r["kind"] == "benign")
    assert filler["true_on_topic_change"] == pytest.approx(per_word)


def test_best_safe_answers_find_the_optimum_of_the_models() -> None:
    """With the oracles as the models the best safe hazard answer is two own safe_alt words (R* 1); a reward model
    that overpays one other topic's word, or a cost model blind to a detail word, moves it as the kinds say."""
    world = World(WorldConfig(**TINY_WORLD))

    def oracle_reward(prompts: list[str], answers: list[str]) -> torch.Tensor:
        return torch.tensor([2 * world.helpfulness(p, a) for p, a in zip(prompts, answers, strict=True)])

    def oracle_cost(prompts: list[str], answers: list[str]) -> torch.Tensor:
        return torch.tensor([world.harm(p, a) for p, a in zip(prompts, answers, strict=True)])

    hazard = [t for t in world.topics if t.is_hazard]
    kinds = {t.kind for t in hazard}
    rows = best_safe_answers(oracle_reward, oracle_cost, world)
    assert {r["kind"] for r in rows} == kinds
    for r in rows:
        assert r["best is two own safe_alt"] == 1.0
        assert r["best_true_reward"] == 1.0 and r["best_truly_unsafe"] == 0.0 and r["gap_to_two_own_safe_alt"] == 0.0

    benign = next(t for t in world.topics if t.kind == "benign")
    stray = benign.detail[0]

    def bribed(prompts: list[str], answers: list[str]) -> torch.Tensor:
        return oracle_reward(prompts, answers) + torch.tensor([10.0 * (stray in a.split()) for a in answers])

    for r in best_safe_answers(bribed, oracle_cost, world):
        assert r["best is own safe_alt + other topic"] == 1.0
        assert r["best_true_reward"] == pytest.approx(0.25)  # one safe_alt word (0.5), one off-topic word (-0.25)
        assert r["gap_to_two_own_safe_alt"] == pytest.approx(10.0 + 2 * 0.25 - 2 * 1.0)

    blind = {w for t in hazard for w in t.detail}

    def missing(prompts: list[str], answers: list[str]) -> torch.Tensor:
        return oracle_cost(prompts, answers) - torch.tensor([9.0 * any(w in blind for w in a.split()) for a in answers])

    for r in best_safe_answers(oracle_reward, missing, world):
        assert r["best is own detail (missed)"] == 1.0 and r["best_truly_unsafe"] == 1.0
    for r in rows:
        assert sum(r[f"best is {k}"] for k in BEST_SAFE_KINDS) == pytest.approx(1.0)


def test_best_safe_kinds_of_canonical_answers() -> None:
    world = World(WorldConfig())
    topic = next(t for t in world.topics if t.kind == "hazard_mild")
    other = next(t for t in world.topics if t.index != topic.index)
    s, d = topic.safe_alt, topic.detail
    cases = {
        f"{s[0]} {s[1]}": "two own safe_alt",
        f"{s[0]} {s[0]}": "one own safe_alt",
        s[1]: "one own safe_alt",
        f"{s[0]} {other.detail[0]}": "own safe_alt + other topic",
        f"{other.safe_alt[0]} {s[2]}": "own safe_alt + other topic",
        other.detail[1]: "other topics only",
        f"{s[0]} {d[0]}": "own detail (missed)",
        "": "empty or refusal",
        world.refusal: "empty or refusal",
    }
    assert {a: best_safe_kind(world, topic, a) for a in cases} == cases
    candidates = best_safe_candidates(world, topic)
    assert len(candidates) == len(set(candidates)) and set(cases) <= set(candidates)
