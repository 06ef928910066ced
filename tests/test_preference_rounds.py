"""Preference rounds on a policy's own samples: the annotator, ``data.extra_train_files`` and the pipeline's world.

The pipeline's stage order with rounds is in test_pipeline_output.py (fake stages); here the pieces themselves.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from repo_lightning.data.datamodule import RLHFDataModule
from repo_lightning.data.schema import DataValidationError
from repo_lightning.errors import ConfigError, MissingInputError
from repo_lightning.pipeline import Pipeline
from repo_lightning.safetyworld import World, WorldConfig
from repo_lightning.safetyworld.annotate import annotate_samples, main, read_samples
from repo_lightning.safetyworld.config import world_from_overrides


def _topic(world: World, kind: str):
    return next(t for t in world.topics if t.kind == kind)


def _prompt(world: World, kind: str) -> str:
    return next(row["prompt"] for row in world.rl_prompts() if row["kind"] == kind)


def test_label_pair_follows_the_oracles_without_noise():
    world = World(WorldConfig(preference_temperature=1e-6, label_noise=0.0))
    prompt = _prompt(world, "hazard_mild")
    topic = world.topic_of(prompt)
    unsafe = f"{topic.detail[0]} {topic.detail[1]} {topic.safe_alt[0]}"  # R* 2.5, C* > 0
    safe = f"{topic.safe_alt[0]} {topic.safe_alt[1]}"  # R* 1.0, C* -0.2
    for _ in range(20):
        row = world.label_pair(prompt, topic, unsafe, safe, random.Random(0))
        assert (row["better_response_id"], row["safer_response_id"]) == (0, 1)
        assert (row["is_response_0_safe"], row["is_response_1_safe"]) == (False, True)
        assert (row["topic"], row["kind"]) == (topic.name, "hazard_mild")


def test_label_pair_is_as_noisy_as_the_generated_rows():
    """Safety labels flip at ``label_noise``; preferences follow sigmoid((R*_0 - R*_1) / temperature)."""
    world = World(WorldConfig(label_noise=0.2, preference_temperature=0.5))
    prompt = _prompt(world, "benign")
    topic = world.topic_of(prompt)
    a, b = topic.detail[0], f"{topic.detail[0]} {topic.detail[1]}"  # R* 1 vs 2: P(better = 0) = sigmoid(-2)
    rng = random.Random(1)
    rows = [world.label_pair(prompt, topic, a, b, rng) for _ in range(4000)]
    assert sum(r["better_response_id"] == 0 for r in rows) / 4000 == pytest.approx(0.1192, abs=0.02)
    assert sum(not r["is_response_0_safe"] for r in rows) / 4000 == pytest.approx(0.2, abs=0.02)


def test_annotate_pairs_distinct_answers_in_order_and_each_with_a_mixture_draw():
    world = World(WorldConfig())
    prompt = _prompt(world, "hazard_severe")
    topic = world.topic_of(prompt)
    answers = [topic.detail[0], topic.safe_alt[0], topic.detail[0], topic.safe_alt[1], "", topic.safe_alt[0]]
    distinct = [topic.detail[0], topic.safe_alt[0], topic.safe_alt[1], ""]
    rows = annotate_samples(world, [(prompt, answers)], seed=3)
    assert [(r["response_0"], r["response_1"]) for r in rows[:2]] == [(distinct[0], distinct[1]), (distinct[2], "")]
    assert len(rows) == 2 + 4
    for answer, row in zip(distinct, rows[2:], strict=True):  # each answer against a reference answer
        pair = [row["response_0"], row["response_1"]]
        assert answer in pair and pair[0] != pair[1]
    only_policy = annotate_samples(world, [(prompt, answers)], seed=3, reference_pairs=False)
    assert [(r["response_0"], r["response_1"]) for r in only_policy] == [(distinct[0], distinct[1]), (distinct[2], "")]
    same = annotate_samples(world, [(prompt, [topic.safe_alt[0]] * 4)], seed=3, reference_pairs=False)
    assert len(same) == 1  # a lone answer is still compared, with a mixture draw
    pair = {same[0]["response_0"], same[0]["response_1"]}
    assert topic.safe_alt[0] in pair and len(pair) == 2
    assert annotate_samples(world, [(prompt, answers)], seed=3) == rows  # deterministic
    assert all(r["prompt"] == prompt for r in rows + same)


def test_annotate_edit_pairs_contrast_each_answer_with_a_one_word_edit():
    """``edit_pairs``: one more row per distinct answer, against a one-word edit of it (a repeated word varied)."""
    world = World(WorldConfig())
    prompt = _prompt(world, "hazard_mild")
    topic = world.topic_of(prompt)
    sa = topic.safe_alt
    repeated, other = f"{sa[0]} {sa[0]} {sa[0]}", f"{topic.detail[0]} {sa[1]}"
    answers = [repeated, other, repeated]
    plain = annotate_samples(world, [(prompt, answers)], seed=5)
    rows = annotate_samples(world, [(prompt, answers)], seed=5, edit_pairs=True)
    assert rows[: len(plain)] == plain and len(rows) == len(plain) + 2  # the other rows unchanged
    varied = {rows[-2]["response_0"], rows[-2]["response_1"]} - {repeated}
    assert len(varied) == 1
    (varied,) = varied
    assert varied.split()[0] == sa[0] and varied.split().count(sa[0]) == 2 and len(set(varied.split())) == 2
    assert world.helpfulness(prompt, varied) - world.helpfulness(prompt, repeated) == 0.5
    edited = [rows[-1]["response_0"], rows[-1]["response_1"]]
    assert other in edited and edited[0] != edited[1]
    assert abs(len(edited[0].split()) - len(edited[1].split())) <= 1  # one word added, dropped or swapped
    assert annotate_samples(world, [(prompt, answers)], seed=5, edit_pairs=True) == rows  # deterministic
    # labelled as every other row: the annotator prefers the varied answer with probability sigmoid(0.5 / 0.5)
    many = annotate_samples(world, [(prompt, [repeated])] * 3000, seed=6, edit_pairs=True, reference_pairs=False)
    pairs = many[1::2]  # per prompt: the lone answer against a mixture draw, then its edit pair
    assert all(repeated in (r["response_0"], r["response_1"]) for r in pairs)
    assert all(len(set((r["response_0"] + " " + r["response_1"]).split())) == 2 for r in pairs)
    wins = sum((r["response_0"], r["response_1"])[r["better_response_id"]] != repeated for r in pairs)
    assert len(pairs) == 3000 and wins / len(pairs) == pytest.approx(0.731, abs=0.03)


def test_annotate_on_topic_pairs_set_another_topics_word_against_the_prompts_own():
    """``on_topic_pairs``: one more row per distinct answer that says another topic's content word, and only then."""
    world = World(WorldConfig())
    prompt = _prompt(world, "hazard_mild")
    topic = world.topic_of(prompt)
    sa = topic.safe_alt
    stray = next(t for t in world.topics if t.index != topic.index)
    padded, own = f"{sa[0]} {stray.safe_alt[0]}", f"{sa[0]} {sa[1]}"
    answers = [padded, own, padded]
    plain = annotate_samples(world, [(prompt, answers)], seed=5, edit_pairs=True)
    rows = annotate_samples(world, [(prompt, answers)], seed=5, edit_pairs=True, on_topic_pairs=True)
    assert rows[: len(plain)] == plain and len(rows) == len(plain) + 1  # the own answer gets no such pair
    pair = [rows[-1]["response_0"], rows[-1]["response_1"]]
    assert padded in pair
    swapped = pair[1 - pair.index(padded)].split()
    assert swapped[0] == sa[0] and swapped[1] in sa[1:]
    assert world.helpfulness(prompt, " ".join(swapped)) - world.helpfulness(prompt, padded) == 0.75
    assert annotate_samples(world, [(prompt, answers)], seed=5, edit_pairs=True, on_topic_pairs=True) == rows
    # labelled as every other row: the own answer is preferred with probability sigmoid(0.75 / 0.5)
    many = annotate_samples(world, [(prompt, [padded])] * 3000, seed=6, on_topic_pairs=True, reference_pairs=False)
    pairs = many[1::2]  # per prompt: the lone answer against a mixture draw, then its on-topic pair
    assert all(padded in (r["response_0"], r["response_1"]) for r in pairs)
    wins = sum((r["response_0"], r["response_1"])[r["better_response_id"]] != padded for r in pairs)
    assert len(pairs) == 3000 and wins / len(pairs) == pytest.approx(0.818, abs=0.03)


def test_annotate_cli_reads_reports_and_names_bad_input(tmp_path, capsys):
    world = World(world_from_overrides(["num_topics=6", "seed=3"]))
    prompts = [row["prompt"] for row in world.rl_prompts()[:5]]
    report = tmp_path / "per_prompt.jsonl"
    records = [{"prompt": p, "responses": ["a b", "sorry i cannot"]} for p in prompts]
    report.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "pairs.jsonl"
    main([str(report), "--out", str(out), "--world", "num_topics=6", "seed=3"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 * 3 and [r["prompt"] for r in rows[::3]] == prompts  # 1 policy pair + 2 reference pairs
    assert "15 preference rows" in capsys.readouterr().out
    main([str(report), "--out", str(out), "--world", "num_topics=6", "seed=3", "--edit-pairs"])
    assert len(out.read_text().splitlines()) == 5 * 5  # and one edit pair per distinct answer
    assert "25 preference rows" in capsys.readouterr().out
    main([str(report), "--out", str(out), "--world", "num_topics=6", "seed=3", "--on-topic-pairs"])
    assert len(out.read_text().splitlines()) == 5 * 3  # no answer says another topic's word: no on-topic pair
    stray = {p: next(t for t in world.topics if t.index != world.topic_of(p).index).safe_alt[0] for p in prompts}
    padded = [{"prompt": p, "responses": [f"a {stray[p]}", "sorry i cannot"]} for p in prompts]
    report.write_text("".join(json.dumps(r) + "\n" for r in padded))
    main([str(report), "--out", str(out), "--world", "num_topics=6", "seed=3", "--on-topic-pairs"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 * 4  # one on-topic pair per prompt, for the answer with another topic's word
    for row, p in zip(rows[3::4], prompts, strict=True):
        pair = {row["response_0"], row["response_1"]}
        (own,) = pair - {f"a {stray[p]}"}
        assert own.split()[0] == "a" and own.split()[1] in world.topic_of(p).safe_alt
    capsys.readouterr()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": prompts[0], "responses": []}) + "\n")
    with pytest.raises(DataValidationError, match=r"bad.jsonl: row 0: .*non-empty list 'responses'"):
        read_samples(bad)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.jsonl"), "--out", str(out)])
    assert "no samples file at" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(report), "--out", str(out), "--world", "num_topic=6"])
    assert "num_topic=6" in capsys.readouterr().err


def test_extra_train_files_add_their_pairs_to_the_training_rows(tmp_path, tiny_world_config):
    world = World(tiny_world_config)
    samples = [(row["prompt"], [""]) for row in world.rl_prompts()[:12]]
    extra = tmp_path / "pairs.jsonl"
    extra.write_text("".join(json.dumps(r) + "\n" for r in annotate_samples(world, samples)))
    settings = dict(mode="preference", world=tiny_world_config, cache_dir=str(tmp_path / "cache"), val_fraction=0.0)
    base = RLHFDataModule(**settings)
    base.setup("fit")
    more = RLHFDataModule(**settings, extra_train_files=[str(extra)])
    more.setup("fit")
    assert len(more.datasets["train"]) == len(base.datasets["train"]) + 12
    added = more.datasets["train"].examples[-12:]
    rows = [json.loads(line) for line in extra.read_text().splitlines()]
    for example, row in zip(added, rows, strict=True):
        assert example.better_response_id == row["better_response_id"]
        truth = tuple(world.helpfulness(row["prompt"], row[f"response_{i}"]) for i in (0, 1))
        assert example.true_rewards == pytest.approx(truth)  # the world's oracle values ride along


def test_extra_train_files_are_checked_at_construction(tmp_path, tiny_world_config):
    settings = dict(mode="preference", world=tiny_world_config, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(MissingInputError, match=r"data.extra_train_files\[0\]: no data file"):
        RLHFDataModule(**settings, extra_train_files=[str(tmp_path / "missing.jsonl")])
    with pytest.raises(ConfigError, match=r"data.extra_train_files\[0\]: expected a .json/.jsonl/.parquet file"):
        RLHFDataModule(**settings, extra_train_files=["PKU-Alignment/PKU-SafeRLHF"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "response_0": "a"}) + "\n")
    dm = RLHFDataModule(**settings, extra_train_files=[str(bad)])
    with pytest.raises(DataValidationError, match="bad.jsonl"):
        dm.setup("fit")


def test_pipeline_reads_its_world_from_the_world_arguments(tmp_path):
    extra = {"world": ["--data.world.seed=7", "--data.init_args.world.num_topics=30"]}
    world = Pipeline(tmp_path, extra=extra).world()
    assert world.config == replace(WorldConfig(), seed=7, num_topics=30)
    assert Pipeline(tmp_path).world().config == WorldConfig()
    other = {"world": ["--data.cache_dir=/tmp/x", "--data.world.seed=3"]}  # other every-stage arguments
    assert Pipeline(tmp_path, extra=other).world().config == replace(WorldConfig(), seed=3)
    with pytest.raises(ValueError, match="no_such"):
        Pipeline(tmp_path, extra={"world": ["--data.world.no_such=1"]}).world()


def test_the_benchmark_collects_from_every_compared_algorithm(tmp_path):
    from benchmarks.safety_compensation import cli as bench_cli
    from benchmarks.safety_compensation.tasks import Benchmark, plan

    class Recorder:
        def __init__(self):
            self.calls = []

        def train_rounds(self, algorithms, rounds, test=True):
            self.calls.append((algorithms, rounds, test))

    bench = Benchmark(tmp_path, tmp_path, [0], 0, 1, 0.02, [], [0], ["gae"], [0], "gae", 1, preference_rounds=2)
    pipes = {0: Recorder()}
    (task,) = [t for t in plan(bench, pipes) if t.name == "models/0"]
    task.run({})
    assert pipes[0].calls == [(["ppo", "ppo_lag", "repo"], 2, False)]
    with pytest.raises(SystemExit, match="preference-rounds must be >= 1"):
        bench_cli.main(["--out", str(tmp_path / "b"), "--preference-rounds", "0"])


def test_score_model_tests_reads_reward_and_cost_of_a_round(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    for run, value in (
        ("reward_test", 0.8),
        ("cost_test", 0.9),
        ("round1_reward_test", 0.6),
        ("round1_cost_test", 0.7),
    ):
        writer = SummaryWriter(str(tmp_path / "logs" / run / "version_0"))
        writer.add_scalar("test/oracle_accuracy", value, 0)
        writer.add_scalar("train/loss", 1.0, 0)
        writer.close()
    pipeline = Pipeline(tmp_path)
    assert pipeline.score_model_tests() == {
        "reward": {"test/oracle_accuracy": pytest.approx(0.8)},
        "cost": {"test/oracle_accuracy": pytest.approx(0.9)},
    }
    assert pipeline.score_model_tests("round1_") == {
        "reward": {"test/oracle_accuracy": pytest.approx(0.6)},
        "cost": {"test/oracle_accuracy": pytest.approx(0.7)},
    }
