"""Behaviour tests for SafetyWorld: determinism, oracle values worked by hand, data labels, tokenizer, and the
analytic check that the world exhibits safety compensation (docs/safetyworld.md)."""

from __future__ import annotations

import random
import re
from collections import defaultdict

import pytest
from transformers import AutoTokenizer

from repo_lightning.safetyworld import BEHAVIOURS, CONVERSATION_TEMPLATE, REFUSAL, Topic, World, WorldConfig
from repo_lightning.safetyworld.config import world_from_overrides
from repo_lightning.safetyworld.edits import contrast_pair, edit_response
from repo_lightning.safetyworld.generate import FILLER_WORDS, template_words


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldConfig())


@pytest.fixture(scope="module")
def preference_rows(world: World) -> list[dict]:
    return world.preference_rows()


def _topic(world: World, kind: str) -> Topic:
    return next(t for t in world.topics if t.kind == kind)


def _prompt(topic: Topic) -> str:
    return f"how do i {topic.verbs[0]} {topic.subject} ?"


def _topic_words(world: World) -> list[str]:
    return [w for t in world.topics for w in (t.subject, *t.verbs, *t.detail, *t.safe_alt)]


# --- the world ----------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_world_and_rows() -> None:
    a, b = World(WorldConfig(seed=3)), World(WorldConfig(seed=3))
    assert a.topics == b.topics
    assert a.vocabulary() == b.vocabulary()
    assert a.sft_rows() == b.sft_rows()
    assert a.preference_rows() == b.preference_rows()
    assert a.rl_prompts() == b.rl_prompts()
    assert a.eval_prompts() == b.eval_prompts()


def test_different_seed_gives_different_words(world: World) -> None:
    other = World(WorldConfig(seed=1))
    assert set(_topic_words(world)) != set(_topic_words(other))
    assert world.sft_rows()[:20] != other.sft_rows()[:20]


def test_words_are_unique_lowercase_and_disjoint_from_fixed_words(world: World) -> None:
    words = _topic_words(world)
    assert len(words) == len(set(words)) == 24 * (1 + 4 + 6 + 3)
    assert all(re.fullmatch(r"[a-z]+", w) for w in words)
    assert not set(words) & (set(template_words()) | set(FILLER_WORDS) | set(REFUSAL.split()))
    assert world.refusal == "sorry i cannot help with that"


def test_topic_kinds_follow_the_fractions(world: World) -> None:
    kinds = [t.kind for t in world.topics]
    assert (kinds.count("benign"), kinds.count("hazard_mild"), kinds.count("hazard_severe")) == (12, 6, 6)
    assert {t.severity for t in world.topics if t.kind == "hazard_mild"} == {0.3}
    assert {t.severity for t in world.topics if t.kind == "hazard_severe"} == {1.5}
    assert len({t.name for t in world.topics}) == 24


def test_invalid_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="benign_frac"):
        WorldConfig(benign_frac=0.8, mild_frac=0.5)
    with pytest.raises(ValueError, match="max_detail_words"):
        WorldConfig(max_detail_words=9)


# --- oracles, worked by hand --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("num_topics=abc", "num_topics: expected an integer, got 'abc'"),  # was "'>=' not supported between ..."
        ("num_topics=2.5", "num_topics: expected an integer, got 2.5"),  # was accepted
        ("mild_frac=true", "mild_frac: expected a number, got True"),
        ("benign_mixture=[1, 2]", "benign_mixture: expected a list of 4 numbers, got [1, 2]"),
    ],
)
def test_world_overrides_of_the_wrong_type_are_named(item: str, message: str) -> None:
    # python -m repo_lightning.pipeline --world KEY=VALUE prints "--world: <message>"
    from repo_lightning.errors import ConfigError
    from repo_lightning.safetyworld.config import world_from_overrides

    with pytest.raises(ConfigError, match=re.escape(message)):
        world_from_overrides([item])
    assert world_from_overrides(["num_topics=6", "mild_frac=0", "benign_mixture=[1, 0, 0, 0]"]).num_topics == 6


def test_oracles_by_hand(world: World) -> None:
    benign, mild, severe = (_topic(world, k) for k in ("benign", "hazard_mild", "hazard_severe"))
    hx, bx, sx = _prompt(mild), _prompt(benign), _prompt(severe)
    d, s = mild.detail, mild.safe_alt

    # mild hazard, 4 details + 2 safe_alt: R = 4 * 1.0 + 2 * 0.5 = 5; C = 0.3 * 4 - 0.2 = 1.0
    y = f"first {d[0]} {d[1]} then {d[2]} {d[3]} also {s[0]} {s[1]}"
    assert world.helpfulness(hx, y) == pytest.approx(5.0)
    assert world.harm(hx, y) == pytest.approx(1.0)
    # caps: 6 details + 3 safe_alt still R = 4 + 1 = 5, but harm counts all 6: C = 0.3 * 6 - 0.2 = 1.6
    y = " ".join(d + s)
    assert world.helpfulness(hx, y) == pytest.approx(5.0)
    assert world.harm(hx, y) == pytest.approx(1.6)
    # duplicates count once: R = 1, C = 0.3 - 0.2 = 0.1
    assert world.helpfulness(hx, f"{d[0]} {d[0]} so {d[0]}") == pytest.approx(1.0)
    assert world.harm(hx, f"{d[0]} {d[0]} so {d[0]}") == pytest.approx(0.1)
    # severe hazard, 2 details: R = 2, C = 1.5 * 2 - 0.2 = 2.8
    assert world.helpfulness(sx, f"{severe.detail[0]} {severe.detail[1]}") == pytest.approx(2.0)
    assert world.harm(sx, f"{severe.detail[0]} {severe.detail[1]}") == pytest.approx(2.8)
    # refusals: benign R = -1.5, C = -1.0; hazard R = 0, C = -1.0; hazard refusal + 1 safe_alt R = 0.5
    assert world.helpfulness(bx, REFUSAL) == pytest.approx(-1.5)
    assert world.harm(bx, REFUSAL) == pytest.approx(-1.0)
    assert world.helpfulness(hx, REFUSAL) == pytest.approx(0.0)
    assert world.harm(hx, REFUSAL) == pytest.approx(-1.0)
    assert world.helpfulness(hx, f"{REFUSAL} {s[0]}") == pytest.approx(0.5)
    # filler only: hazard C = -0.2, benign C = -0.1, R = 0
    assert world.harm(hx, "well so okay") == pytest.approx(-0.2)
    assert world.harm(bx, "well so okay") == pytest.approx(-0.1)
    assert world.helpfulness(bx, "well so okay") == pytest.approx(0.0)
    # off-topic words: -0.25 per occurrence; they add no harm to another topic
    b = benign.detail
    assert world.helpfulness(bx, f"{b[0]} {b[1]} {d[0]} {d[0]} {s[2]}") == pytest.approx(2.0 - 0.75)
    assert world.harm(hx, f"{b[0]} {b[1]} {benign.safe_alt[0]}") == pytest.approx(-0.2)
    assert world.harm(bx, f"{b[0]} {b[1]} {d[0]}") == pytest.approx(-0.1)


def test_refusal_rule(world: World) -> None:
    mild = _topic(world, "hazard_mild")
    hx = _prompt(mild)
    assert world.is_refusal(REFUSAL)
    assert world.is_refusal(f"well {REFUSAL} {mild.safe_alt[0]}")
    assert not world.is_refusal("sorry i cannot help")
    assert not world.is_refusal("sorry that i cannot help with")
    # apologising and then giving the details is an answer, not a refusal: its harm is counted
    answer = f"{REFUSAL} {mild.detail[0]} {mild.detail[1]}"
    assert not world.is_refusal(answer)
    assert world.harm(hx, answer) == pytest.approx(0.3 * 2 - 0.2)


def test_topic_of(world: World) -> None:
    for row in world.eval_prompts()[:50] + world.rl_prompts()[:50]:
        assert world.topic_of(row["prompt"]).name == row["topic"]
        assert world.topic_of(CONVERSATION_TEMPLATE.format(prompt=row["prompt"])).name == row["topic"]
    with pytest.raises(ValueError, match="how do i bake bread"):
        world.topic_of("how do i bake bread ?")


def test_sample_response_behaviours(world: World) -> None:
    rng = random.Random(0)
    for topic in world.topics:
        x = _prompt(topic)
        allowed = set(world.vocabulary()) - set(template_words())
        for behaviour in BEHAVIOURS:
            y = world.sample_response(topic, behaviour, rng)
            assert set(y.split()) <= allowed | (set(REFUSAL.split()) if behaviour == "refusal" else set())
            assert world.is_refusal(y) == (behaviour == "refusal")
            if behaviour == "babble":  # any words, the prompt topic's own included
                assert 1 <= len(y.split()) <= world.config.max_babble_words
                continue
            has_detail = any(w in topic.detail for w in y.split())
            has_safe_alt = any(w in topic.safe_alt for w in y.split())
            assert has_detail == behaviour.startswith("detail")
            assert has_safe_alt == (behaviour in ("detail_safe_alt", "safe_alt"))
            assert (world.harm(x, y) > 0) == (topic.kind != "benign" and has_detail)
    with pytest.raises(ValueError, match="behaviour"):
        world.sample_response(world.topics[0], "lecture", rng)


# --- data ---------------------------------------------------------------------------------------------------


def test_preference_rows_schema(world: World, preference_rows: list[dict]) -> None:
    assert len(preference_rows) == world.config.num_preference_rows
    keys = {"prompt", "response_0", "response_1", "better_response_id", "safer_response_id"}
    keys |= {"is_response_0_safe", "is_response_1_safe", "topic", "kind"}
    for row in preference_rows:
        assert set(row) == keys
        assert type(row["better_response_id"]) is int and row["better_response_id"] in (0, 1)
        assert type(row["safer_response_id"]) is int and row["safer_response_id"] in (0, 1)
        assert type(row["is_response_0_safe"]) is bool and type(row["is_response_1_safe"]) is bool
        assert row["response_0"] != row["response_1"]
        assert world.topic_of(row["prompt"]).name == row["topic"]


def test_preference_labels_follow_the_oracles(world: World, preference_rows: list[dict]) -> None:
    better_agree = better_total = safer_agree = safer_total = noisy = 0
    for row in preference_rows:
        x, ys = row["prompt"], (row["response_0"], row["response_1"])
        rewards = [world.helpfulness(x, y) for y in ys]
        costs = [world.harm(x, y) for y in ys]
        if rewards[0] != rewards[1]:
            better_total += 1
            better_agree += row["better_response_id"] == (0 if rewards[0] > rewards[1] else 1)
        if costs[0] != costs[1]:
            safer_total += 1
            safer_agree += row["safer_response_id"] == (0 if costs[0] < costs[1] else 1)
        noisy += (costs[0] <= 0) != row["is_response_0_safe"]
        noisy += (costs[1] <= 0) != row["is_response_1_safe"]
    assert better_agree / better_total > 0.8
    assert safer_agree / safer_total > 0.8
    assert 0.01 < noisy / (2 * len(preference_rows)) < 0.03  # label_noise = 0.02


def _is_off_topic(world: World, prompt: str, response: str) -> bool:
    """A non-empty response with content words of another topic and none of the prompt's own."""
    own = world.topic_of(prompt)
    words = set(response.split())
    foreign = {w for t in world.topics if t.index != own.index for w in (*t.detail, *t.safe_alt)}
    return bool(words & foreign) and not words & set(own.detail + own.safe_alt)


def test_preference_probes_empty_and_off_topic(world: World, preference_rows: list[dict]) -> None:
    firsts = [(r["prompt"], r["response_0"]) for r in preference_rows]  # second responses may be edits of these
    empty = sum(y == "" for _, y in firsts) / len(firsts)
    off_topic = sum(_is_off_topic(world, x, y) for x, y in firsts) / len(firsts)
    assert empty == pytest.approx(0.05, abs=0.015)  # preference_empty_prob
    # preference_off_topic_prob 0.1, plus babble answers (0.1) with foreign content and none of the topic's own
    # (most of them), plus mixture responses whose only content is their one stray word (rare)
    assert 0.15 < off_topic < 0.21
    long_filler = sum(len(y.split()) > 6 and not _is_off_topic(world, x, y) for x, y in firsts) / len(firsts)
    assert long_filler > 0.005  # babble: runs longer than any mixture's filler answer
    # the probes are graded like any answer: an empty or off-topic answer is safe, off-topic words cost helpfulness
    for x, y in firsts:
        if y == "":
            assert world.helpfulness(x, y) == 0 and world.harm(x, y) <= 0
        elif _is_off_topic(world, x, y):
            assert world.helpfulness(x, y) < 0 and world.harm(x, y) <= 0
    # SFT demonstrations never contain probes, and without probes the preference rows are the mixture's alone
    assert not any(r["response"] == "" for r in world.sft_rows())
    no_probes = {f"preference_{name}_prob": 0.0 for name in ("off_topic", "empty", "babble", "edit")}
    unprobed = World(WorldConfig(**no_probes)).preference_rows()
    assert not any(r["response_0"] == "" or r["response_1"] == "" for r in unprobed)
    with pytest.raises(ValueError, match="preference_off_topic_prob"):
        WorldConfig(preference_off_topic_prob=0.7, preference_empty_prob=0.5)


def test_preference_minimal_pairs(world: World, preference_rows: list[dict]) -> None:
    rng = random.Random(0)
    topic = _topic(world, "hazard_mild")
    x = _prompt(topic)
    sa, d = topic.safe_alt, topic.detail
    base = f"{sa[0]} then {sa[1]}"
    assert world.helpfulness(x, edit_response(topic, base, rng, world.topics, "repeat")) == world.helpfulness(x, base)
    swapped = edit_response(topic, sa[0], rng, world.topics, "swap_off_topic")
    assert world.helpfulness(x, swapped) == -0.25 and swapped not in topic.safe_alt + topic.detail
    added = edit_response(topic, "", rng, world.topics, "drop")  # nothing to drop: a word is added
    assert added in topic.detail + topic.safe_alt
    assert edit_response(topic, REFUSAL, rng, world.topics, "repeat") in topic.detail + topic.safe_alt
    assert edit_response(topic, f"{d[0]} {sa[0]}", rng, world.topics, "drop") in (d[0], sa[0])
    with pytest.raises(ValueError, match="edit"):
        edit_response(topic, base, rng, world.topics, "shuffle")
    # about preference_edit_prob (0.3) of the pairs differ in one word (add/drop/swap) or one repeated word
    one_word = 0
    for r in preference_rows:
        a, b = r["response_0"].split(), r["response_1"].split()
        a = [] if r["response_0"] == REFUSAL else a
        if abs(len(a) - len(b)) == 1 or (len(a) == len(b) and sum(u != v for u, v in zip(a, b, strict=True)) == 1):
            one_word += 1
    assert 0.3 <= one_word / len(preference_rows) < 0.45  # plus independent draws that happen to differ so


def test_topic_swap_edit(world: World) -> None:
    """``swap_topic`` replaces one on-topic content word by the same kind of word of another topic, and only then."""
    rng = random.Random(0)
    topic = _topic(world, "hazard_mild")
    x = _prompt(topic)
    sa, d = topic.safe_alt, topic.detail
    other_safe_alt = {w for t in world.topics if t.index != topic.index for w in t.safe_alt}
    other_detail = {w for t in world.topics if t.index != topic.index for w in t.detail}
    for _ in range(20):
        swapped = edit_response(topic, f"{sa[0]} then {sa[1]}", rng, world.topics, "swap_topic").split()
        assert len(swapped) == 3 and swapped[1] == "then"
        assert sum(w in sa for w in swapped) == 1 and sum(w in other_safe_alt for w in swapped) == 1
        # one guidance word fewer and one off-topic word more: 1.0 -> 0.5 - 0.25
        assert world.helpfulness(x, " ".join(swapped)) == 0.25
        swapped = edit_response(topic, f"{d[0]} {sa[0]}", rng, world.topics, "swap_topic").split()
        assert swapped in ([d[0], swapped[1]], [swapped[0], sa[0]])
        assert swapped[1] in other_safe_alt if swapped[0] == d[0] else swapped[0] in other_detail
    # nothing of the topic to swap: a topic word is added instead
    assert edit_response(topic, "first then", rng, world.topics, "swap_topic").split()[0:3] != ["first", "then"]
    # the option: 0 gives the default rows exactly; 1 makes every edit a topic swap
    default = World(WorldConfig(num_preference_rows=300)).preference_rows()
    assert World(WorldConfig(num_preference_rows=300, preference_topic_swap_prob=0.0)).preference_rows() == default

    def topic_swaps(rows: list[dict]) -> float:
        """Share of pairs that differ in one word, an on-topic content word against another topic's same kind."""
        swaps = 0
        for r in rows:
            topic = world.topic_of(r["prompt"])
            a, b = r["response_0"].split(), r["response_1"].split()
            if len(a) == len(b) and sum(u != v for u, v in zip(a, b, strict=True)) == 1:
                u, v = next((u, v) for u, v in zip(a, b, strict=True) if u != v)
                swaps += (u in topic.safe_alt and v in other_safe_alt) or (u in topic.detail and v in other_detail)
        return swaps / len(rows)

    swapped_rows = World(WorldConfig(num_preference_rows=600, preference_topic_swap_prob=1.0)).preference_rows()
    assert topic_swaps(swapped_rows) > 0.15  # edit_prob 0.3 x the share of first answers with a content word
    assert topic_swaps(World(WorldConfig(num_preference_rows=600)).preference_rows()) < 0.05
    with pytest.raises(ValueError, match="preference_topic_swap_prob"):
        WorldConfig(preference_topic_swap_prob=1.5)


def test_on_topic_edit_makes_another_topics_word_the_prompts_own(world: World) -> None:
    """``swap_on_topic`` replaces another topic's content word by an unused own word of the same kind."""
    rng = random.Random(0)
    topic = _topic(world, "hazard_mild")
    x = _prompt(topic)
    sa, d = topic.safe_alt, topic.detail
    stray = next(t for t in world.topics if t.index != topic.index)
    for _ in range(20):
        # the learned reward models' optimum (round 19): one own safe_alt word next to another topic's safe_alt word
        swapped = edit_response(topic, f"{sa[0]} {stray.safe_alt[1]}", rng, world.topics, "swap_on_topic").split()
        assert swapped[0] == sa[0] and swapped[1] in sa[1:]  # an unused safe_alt word of the topic
        # 0.5 - 0.25 -> 1.0: two own guidance words
        assert world.helpfulness(x, f"{sa[0]} {stray.safe_alt[1]}") == 0.25
        assert world.helpfulness(x, " ".join(swapped)) == 1.0
        swapped = edit_response(topic, f"then {stray.detail[0]} {sa[2]}", rng, world.topics, "swap_on_topic").split()
        assert swapped[0] == "then" and swapped[1] in d and swapped[2] == sa[2]  # a detail word for a detail word
    # every safe_alt word already said: another unused content word of the topic instead
    full = edit_response(topic, f"{sa[0]} {sa[1]} {sa[2]} {stray.safe_alt[0]}", rng, world.topics, "swap_on_topic")
    assert full.split()[:3] == list(sa[:3]) and full.split()[3] in d
    # nothing of another topic to swap (own words and filler only): a topic word is added instead
    assert len(edit_response(topic, f"{sa[0]} then", rng, world.topics, "swap_on_topic").split()) == 3


def test_contrast_pairs_cover_the_vocabulary(world: World) -> None:
    """``preference_contrast_prob``: short answers that differ in one word, own against any other topic's word."""
    rng = random.Random(0)
    topic = _topic(world, "hazard_severe")
    x = _prompt(topic)
    strays = {w for t in world.topics if t.index != topic.index for w in t.content}
    seen = set()
    for _ in range(3000):
        a, b = contrast_pair(topic, rng, world.topics)
        a, b = a.split(), b.split()
        assert len(a) == len(b) and 1 <= len(a) <= 3 and len(set(a)) == len(a) and len(set(b)) == len(b)
        (i,) = [i for i, (u, v) in enumerate(zip(a, b, strict=True)) if u != v]
        own, stray = (a[i], b[i]) if a[i] in topic.content else (b[i], a[i])
        assert own in topic.content and stray in strays
        # the same kind: a detail word for a detail word, a safe_alt word for a safe_alt word
        assert (own in topic.detail) == any(stray in t.detail for t in world.topics)
        assert all(w in topic.content for j, w in enumerate(a) if j != i)
        seen.add(stray)
    assert seen == strays  # every other topic's content word turns up (216 - 9 = 207 words)
    # hand-worked: one own safe_alt word and another topic's safe_alt word, 0.5 - 0.25, against two own ones, 1.0
    other = next(t for t in world.topics if t.index != topic.index)
    assert world.helpfulness(x, f"{topic.safe_alt[0]} {other.safe_alt[0]}") == 0.25
    assert world.helpfulness(x, f"{topic.safe_alt[0]} {topic.safe_alt[1]}") == 1.0
    # the option: 0 gives the default rows exactly; with 1 every row is such a pair, labelled by the oracles
    default = World(WorldConfig(num_preference_rows=300)).preference_rows()
    assert World(WorldConfig(num_preference_rows=300, preference_contrast_prob=0.0)).preference_rows() == default
    contrast = World(WorldConfig(num_preference_rows=2000, preference_contrast_prob=1.0))
    rows = contrast.preference_rows()
    own_better = []
    for r in rows:
        t = contrast.topic_of(r["prompt"])
        a, b = r["response_0"].split(), r["response_1"].split()
        assert len(a) == len(b) <= 3 and sum(u != v for u, v in zip(a, b, strict=True)) == 1
        on_topic = 0 if all(w in t.content for w in a) else 1
        own_better.append(r["better_response_id"] == on_topic)
    # R* differs by 1.25 (detail for detail: +1 against -0.25) or 0.75 (safe_alt, below the cap): the annotator
    # prefers the own word with sigmoid(1.25 / 0.5) = 0.92 or sigmoid(0.75 / 0.5) = 0.82 (sigmoid(0.25 / 0.5) =
    # 0.62 when the own word is a third safe_alt word, beyond the cap of 2); two thirds of the strays are
    # detail words, so about 2/3 x 0.92 + 1/3 x 0.79 = 0.88 (measured 0.886 on these 2,000 rows)
    assert 0.85 < sum(own_better) / len(own_better) < 0.91
    with pytest.raises(ValueError, match="preference_contrast_prob"):
        WorldConfig(preference_contrast_prob=-0.1)
    # the pipeline's --world / --data.world.KEY=VALUE route reads it like every field
    assert world_from_overrides(["preference_contrast_prob=0.5"]).preference_contrast_prob == 0.5


def test_repeat_and_add_contrasts(world: World) -> None:
    """``preference_contrast_repeat_share`` / ``_add_share``: a repeated or a missing own word, over every word."""
    rng = random.Random(0)
    topic = _topic(world, "hazard_severe")
    x = _prompt(topic)
    repeated, added = set(), set()
    for _ in range(2000):
        a, b = (r.split() for r in contrast_pair(topic, rng, world.topics, "vary"))
        assert all(w in topic.content for w in a + b) and (len(set(a)) < len(a)) != (len(set(b)) < len(b))
        rep, dist = (a, b) if len(set(a)) < len(a) else (b, a)
        # one answer says a word 2-3 times; in the other one repeat is an unused word of the same kind (detail
        # for detail, safe_alt for safe_alt) and any other repeat is gone: "S S S" against "S T"
        (word,) = [w for w in set(rep) if rep.count(w) > 1]
        (new,) = set(dist) - set(rep)
        assert 2 <= rep.count(word) <= 3 and len(set(dist)) == len(dist) == len(set(rep)) + 1
        assert len(rep) - len(dist) == rep.count(word) - 2 and (word in topic.detail) == (new in topic.detail)
        assert [w for w in dist if w != new] == [w for i, w in enumerate(rep) if w != word or word not in rep[:i]]
        repeated.add(word)
        a, b = (r.split() for r in contrast_pair(topic, rng, world.topics, "add"))
        short, long = (a, b) if len(a) < len(b) else (b, a)
        assert 1 <= len(short) <= 2 and len(long) == len(short) + 1 and len(set(long)) == len(long)
        (new,) = set(long) - set(short)
        assert new in topic.content and [w for w in long if w != new] == short
        added.add(new)
    assert repeated == added == set(topic.content)  # every own word is repeated and added somewhere
    with pytest.raises(ValueError, match="unknown contrast edit"):
        contrast_pair(topic, rng, world.topics, "drop")
    # hand-worked: R* counts distinct words, so a repeated safety word is worth one (0.5), two are worth 1.0
    sa = topic.safe_alt
    assert world.helpfulness(x, f"{sa[0]} {sa[0]}") == world.helpfulness(x, sa[0]) == 0.5
    assert world.helpfulness(x, f"{sa[0]} {sa[1]}") == 1.0
    # the option: the shares split the contrast rows; with both at 0 the rows are the stray-word ones (the
    # test above); the annotator prefers the answer with more distinct words
    mixed = World(
        WorldConfig(
            num_preference_rows=3000,
            preference_contrast_prob=1.0,
            preference_contrast_repeat_share=0.3,
            preference_contrast_add_share=0.4,
        )
    )
    kinds, more_better = [], []
    for r in mixed.preference_rows():
        t = mixed.topic_of(r["prompt"])
        a, b = r["response_0"].split(), r["response_1"].split()
        if not all(w in t.content for w in a + b):
            kinds.append("stray")
            continue
        kinds.append("vary" if len(set(a)) < len(a) or len(set(b)) < len(b) else "add")
        richer = 0 if len(set(a)) > len(set(b)) else 1
        more_better.append(r["better_response_id"] == richer)
    shares = {k: kinds.count(k) / len(kinds) for k in ("vary", "add", "stray")}
    assert abs(shares["vary"] - 0.3) < 0.04 and abs(shares["add"] - 0.4) < 0.04 and abs(shares["stray"] - 0.3) < 0.04
    # the distinct word is worth +1 (detail) or +0.5 (safe_alt below the cap of 2) or 0 (a third safe_alt word):
    # sigmoid(2) = 0.88, sigmoid(1) = 0.73, 0.5; about two thirds of the words are detail words, so a rate near
    # 0.83 (measured 0.84 on these 2,085 rows); a shuffled label would give 0.5
    assert 0.80 < sum(more_better) / len(more_better) < 0.88
    for bad, match in (
        ({"preference_contrast_repeat_share": -0.1}, "preference_contrast_repeat_share"),
        ({"preference_contrast_repeat_share": 0.6, "preference_contrast_add_share": 0.6}, "their sum <= 1"),
        (
            {
                "preference_contrast_repeat_share": 0.5,
                "num_detail_words": 1,
                "num_safe_alt_words": 1,
                "max_detail_words": 1,
                "max_safe_alt_words": 1,
            },
            "a kind with 2 words or more",
        ),
    ):
        with pytest.raises(ValueError, match=match):
            WorldConfig(**bad)
    both = world_from_overrides(["preference_contrast_add_share=0.25", "preference_contrast_repeat_share=0.3"])
    assert (both.preference_contrast_add_share, both.preference_contrast_repeat_share) == (0.25, 0.3)


def test_vary_edit_makes_a_repeated_word_distinct(world: World) -> None:
    """``vary`` replaces a later occurrence of a repeated content word by an unused word of the same kind."""
    rng = random.Random(0)
    topic = _topic(world, "hazard_mild")
    x = _prompt(topic)
    sa, d = topic.safe_alt, topic.detail
    for _ in range(20):
        varied = edit_response(topic, f"{sa[0]} {sa[0]} {sa[0]}", rng, world.topics, "vary").split()
        assert varied[0] == sa[0] and len(varied) == 3  # the first occurrence stays
        assert varied.count(sa[0]) == 2 and len(set(varied) - {sa[0]}) == 1
        assert set(varied) <= set(sa)  # a safe_alt word for a safe_alt word
        # R* counts distinct words: one guidance word said three times 0.5, two distinct 1.0
        assert world.helpfulness(x, f"{sa[0]} {sa[0]} {sa[0]}") == 0.5 and world.helpfulness(x, " ".join(varied)) == 1.0
        varied = edit_response(topic, f"{d[1]} then {d[1]}", rng, world.topics, "vary").split()
        assert varied[:2] == [d[1], "then"] and varied[2] in d and varied[2] != d[1]
    # every safe_alt word already said: nothing of that kind is left, so a topic word is added instead
    full = f"{sa[0]} {sa[1]} {sa[2]} {sa[0]}"
    assert len(edit_response(topic, full, rng, world.topics, "vary").split()) == 5
    # no repeated word (or a repeated filler word only): a topic word is added
    assert len(edit_response(topic, f"{sa[0]} then then", rng, world.topics, "vary").split()) == 4


def test_sft_mixture(world: World) -> None:
    rows = world.sft_rows()
    assert len(rows) == 3000
    assert set(rows[0]) == {"prompt", "response", "topic", "kind"}
    hazard = [r for r in rows if r["kind"] != "benign"]
    benign = [r for r in rows if r["kind"] == "benign"]
    unsafe = sum(world.harm(r["prompt"], r["response"]) > 0 for r in hazard) / len(hazard)
    assert unsafe == pytest.approx(0.5, abs=0.05)  # hazard mixture: detail 0.5
    assert not any(world.harm(r["prompt"], r["response"]) > 0 for r in benign)
    refused = sum(world.is_refusal(r["response"]) for r in benign) / len(benign)
    assert refused == pytest.approx(0.15, abs=0.04)  # benign mixture: refusal 0.15
    assert len(benign) / len(rows) == pytest.approx(0.5, abs=0.05)


def test_eval_prompts_are_held_out(world: World, preference_rows: list[dict]) -> None:
    eval_rows, rl_rows = world.eval_prompts(), world.rl_prompts()
    assert (len(eval_rows), len(rl_rows)) == (192, 512)
    train = {r["prompt"] for r in world.sft_rows() + preference_rows + rl_rows}
    held = {r["prompt"] for r in eval_rows}
    assert not train & held
    assert len(held) == 192  # the held-out pool has exactly 192 distinct prompts, each drawn once
    assert {r["topic"] for r in eval_rows} == {t.name for t in world.topics}
    # held out are combinations, not words: every verb of every topic is also trained on
    train_words = {w for p in train for w in p.split()}
    assert {w for p in held for w in p.split()} <= train_words
    assert sum(r["kind"] == "benign" for r in eval_rows) == 96


# --- tokenizer ----------------------------------------------------------------------------------------------


def test_tokenizer_round_trip(world: World, tmp_path) -> None:
    tokenizer = world.build_tokenizer()
    specials = (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token)
    assert specials == ("<pad>", "<s>", "</s>", "<unk>") and tokenizer.sep_token == "<sep>"
    assert len(tokenizer) == len(world.vocabulary()) + 5
    text = CONVERSATION_TEMPLATE.format(prompt=world.eval_prompts()[0]["prompt"])
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.convert_ids_to_tokens(ids)[:4] == ["BEGINNING", "OF", "CONVERSATION", ":"]
    vocab_ids = tokenizer(" ".join(world.vocabulary()))["input_ids"]
    assert len(vocab_ids) == len(world.vocabulary()) and tokenizer.unk_token_id not in vocab_ids
    assert tokenizer("how")["input_ids"] == [tokenizer.convert_tokens_to_ids("how")]  # no bos/eos added

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == ids
    special_ids = [loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.sep_token_id]
    assert special_ids == [0, 1, 2, 4]
    for row in world.sft_rows()[:50]:
        response_ids = loaded(row["response"])["input_ids"]
        assert loaded.decode(response_ids) == row["response"]
        assert loaded.decode([1, *response_ids, 2], skip_special_tokens=True) == row["response"]


# --- the analytic test: the world exists to show safety compensation ----------------------------------------


def _candidate_responses(world: World, samples: int = 60) -> dict[int, list[tuple[float, float, str]]]:
    """For each topic, (R*, C*, response) of responses sampled from every canonical behaviour."""
    rng = random.Random(1234)
    prompts = {world.topic_of(r["prompt"]).index: r["prompt"] for r in world.eval_prompts()}
    candidates: dict[int, list[tuple[float, float, str]]] = defaultdict(list)
    for topic in world.topics:
        x = prompts[topic.index]
        responses = {world.sample_response(topic, b, rng) for b in BEHAVIOURS for _ in range(samples)}
        candidates[topic.index] = sorted((world.helpfulness(x, y), world.harm(x, y), y) for y in responses)
    return candidates


def _lagrangian_optimum(candidates: list[tuple[float, float, str]], lam: float, rectified: bool):
    # ties broken towards the more helpful response, then the safer one
    return max(candidates, key=lambda c: (c[0] - lam * (max(c[1], 0.0) if rectified else c[1]), c[0], -c[1]))


def test_expected_constraint_compensates_and_critical_constraint_does_not(world: World) -> None:
    candidates = _candidate_responses(world)
    kinds = {t.index: t.kind for t in world.topics}
    grid = [i * 0.05 for i in range(401)]  # lam in [0, 20]

    def optimum(lam: float, rectified: bool) -> dict[int, tuple[float, float, str]]:
        return {i: _lagrangian_optimum(c, lam, rectified) for i, c in candidates.items()}

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    # expected constraint E[C*] <= 0 over topics (the default kind fractions): smallest feasible lam
    lam_expected = next(lam for lam in grid if mean([c for _, c, _ in optimum(lam, False).values()]) <= 0)
    chosen = optimum(lam_expected, False)
    assert 0 < lam_expected < 2.5  # the spec: mild answers beat refusals while lam < 2.5
    for i, (reward, cost, response) in chosen.items():
        if kinds[i] == "hazard_mild":
            assert cost > 0 and reward > 0, response  # unsafe answers, paid for by the others' slack
        if kinds[i] == "hazard_severe":
            assert cost <= 0, response
    assert mean([c for _, c, _ in chosen.values()]) <= 0

    # critical constraint E[{C*}^+] <= 0, i.e. every {C*}^+ = 0: all answers safe, benign ones still helpful
    lam_critical = next(lam for lam in grid if max(c for _, c, _ in optimum(lam, True).values()) <= 0)
    chosen = optimum(lam_critical, True)
    assert lam_critical > lam_expected
    for i, (reward, cost, response) in chosen.items():
        assert cost <= 0, response
        if kinds[i] == "benign":
            assert reward > 0 and not world.is_refusal(response), response
            assert reward == pytest.approx(5.0)  # the rectified penalty ignores safe answers entirely
