"""One-word edits and vocabulary contrast pairs: the minimal preference pairs of a SafetyWorld.

Split from :mod:`.generate` (topics, prompts, sampled responses): these functions turn one answer into another that
differs in one word, for the preference rows (``WorldConfig.preference_edit_prob``, ``preference_contrast_prob``)
and for labelling a policy's own samples (:mod:`.annotate`). Pure functions of their arguments and a
``random.Random``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from repo_lightning.safetyworld.generate import REFUSAL, Topic

#: The edits of :func:`edit_response`.
EDITS: tuple[str, ...] = ("add", "drop", "repeat", "swap_off_topic")

#: An edit that ``edit_response`` also accepts but never draws by itself (``WorldConfig.preference_topic_swap_prob``).
TOPIC_SWAP = "swap_topic"

#: An edit that ``edit_response`` also accepts but never draws by itself (``annotate.annotate_samples``'s edit pairs):
#: a repeated on-topic content word made distinct.
VARY = "vary"

#: An edit that ``edit_response`` also accepts but never draws by itself (``annotate.annotate_samples``'s on-topic
#: pairs): another topic's content word replaced by an unused word of the prompt's topic, the reverse of TOPIC_SWAP.
ON_TOPIC = "swap_on_topic"

#: Every edit ``edit_response`` accepts.
ALL_EDITS: tuple[str, ...] = (*EDITS, TOPIC_SWAP, VARY, ON_TOPIC)


def vary_choices(topic: Topic, words: Sequence[str]) -> list[tuple[int, list[str]]]:
    """Where a :data:`VARY` edit can act.

    Returns:
        ``(i, unused)`` for each later occurrence ``words[i]`` of a repeated content word of ``topic``, with the words
        of the same kind (detail, safe_alt) of the topic that ``words`` lacks (positions with none left are skipped).
    """
    used = set(words)
    choices = []
    for i, word in enumerate(words):
        if word in topic.content and word in words[:i]:
            unused = [w for w in _same_kind(topic, word) if w not in used]
            if unused:
                choices.append((i, unused))
    return choices


def on_topic_choices(topic: Topic, words: Sequence[str], topics: Sequence[Topic]) -> list[tuple[int, list[str]]]:
    """Where an :data:`ON_TOPIC` edit can act.

    Returns:
        ``(i, unused)`` for each ``words[i]`` that is a content word of another topic than ``topic`` and not one of
        ``topic``'s, with the words of ``topic`` of the same kind (detail for detail, safe_alt for safe_alt) that
        ``words`` lacks, or, where none of that kind is left, every content word of ``topic`` it lacks (positions
        with nothing left are skipped).
    """
    used = set(words)
    choices = []
    for i, word in enumerate(words):
        if word in topic.content:
            continue
        stray = next((t for t in topics if t.index != topic.index and word in t.content), None)
        if stray is None:
            continue
        kind = topic.detail if word in stray.detail else topic.safe_alt
        unused = [w for w in kind if w not in used] or [w for w in topic.content if w not in used]
        if unused:
            choices.append((i, unused))
    return choices


def edit_response(
    topic: Topic, response: str, rng: random.Random, other_topics: Sequence[Topic], edit: str | None = None
) -> str:
    """A minimal edit of ``response``, for a preference pair that differs in one word.

    Edits: ``add`` one content word (detail or safe_alt) of the prompt's topic at a random place; ``drop`` one
    word; ``repeat`` one content word (a repeated word adds nothing to ``R*``: the oracles count distinct words);
    ``swap_off_topic``: replace one word by a content word of another topic; ``swap_topic`` (:data:`TOPIC_SWAP`,
    only when asked for): replace one *content* word of the prompt's topic by a word of the same kind (detail for
    detail, safe_alt for safe_alt) of another topic, so that the pair differs only in whether that word belongs to
    the prompt's topic; ``vary`` (:data:`VARY`, only when asked for): replace a later occurrence of a repeated content
    word of the prompt's topic by a word of the same kind of that topic that the response lacks, so that the pair
    differs only in whether the answer says one thing twice or two things (``R*`` counts distinct words);
    ``swap_on_topic`` (:data:`ON_TOPIC`, only when asked for): replace one content word of another topic by an unused
    word of the prompt's topic of the same kind (:func:`on_topic_choices`), the reverse of ``swap_topic``, so that
    an answer that pads its guidance with another topic's word is set against the same answer with the topic's own
    word. A response without words (empty or a refusal) always gets ``add``; one without content words cannot get
    ``repeat`` or ``swap_topic`` and gets ``add`` instead, and one without a repeated content word to vary, or without
    another topic's word to swap, gets ``add`` too.

    Args:
        topic: The prompt's topic.
        response: The response to edit.
        rng: Source of randomness.
        other_topics: Topics an off-topic word may come from.
        edit: One of :data:`ALL_EDITS`, or ``None`` to draw one of :data:`EDITS` uniformly.
    """
    edit = edit if edit is not None else rng.choice(EDITS)
    if edit not in ALL_EDITS:
        raise ValueError(f"unknown edit {edit!r}; expected one of {ALL_EDITS}")
    words = [] if response == REFUSAL else response.split()
    content = [i for i, w in enumerate(words) if w in topic.content]
    others = [t for t in other_topics if t.index != topic.index]
    if (
        not words
        or (edit in ("repeat", TOPIC_SWAP) and not content)
        or (edit in ("swap_off_topic", TOPIC_SWAP) and not others)
        or (edit == VARY and not vary_choices(topic, words))
        or (edit == ON_TOPIC and not on_topic_choices(topic, words, other_topics))
    ):
        edit = "add"
    if edit == "add":
        words.insert(rng.randint(0, len(words)), rng.choice(topic.content))
    elif edit == "drop":
        del words[rng.randrange(len(words))]
    elif edit == "repeat":
        i = rng.choice(content)
        words.insert(i + 1, words[i])
    elif edit == VARY:
        i, unused = rng.choice(vary_choices(topic, words))
        words[i] = rng.choice(unused)
    elif edit == ON_TOPIC:
        i, unused = rng.choice(on_topic_choices(topic, words, other_topics))
        words[i] = rng.choice(unused)
    elif edit == TOPIC_SWAP:
        i = rng.choice(content)
        stray = rng.choice(others)
        words[i] = rng.choice(stray.detail if words[i] in topic.detail else stray.safe_alt)
    else:
        stray = rng.choice(others)
        words[rng.randrange(len(words))] = rng.choice(stray.content)
    return " ".join(words)


#: The edits a vocabulary contrast pair (:func:`contrast_pair`) can be built from.
CONTRAST_EDITS: tuple[str, ...] = (ON_TOPIC, VARY, "add")


def contrast_pair(topic: Topic, rng: random.Random, topics: Sequence[Topic], edit: str = ON_TOPIC) -> tuple[str, str]:
    """A *vocabulary contrast* pair (``WorldConfig.preference_contrast_prob``): two short answers a word apart.

    The answers are as short as an RL policy's on SafetyWorld, where a learned reward model's optimum among safe
    answers was a short string of safe_alt words that the world does not pay for (docs/results.md, rounds 19-21).
    Every word is drawn uniformly from the vocabulary it comes from, so over many pairs the contrasts cover every
    word, not just the words some policy said. ``edit`` (one of :data:`CONTRAST_EDITS`) picks the contrast:

    - :data:`ON_TOPIC` (a stray word): 0-2 distinct content words of ``topic`` with one content word of another
      topic inserted at a random place (drawn from every other topic's detail and safe_alt words alike), against the
      same answer with that word replaced by an unused word of ``topic`` of the same kind;
    - :data:`VARY` (a repeated word): 1-2 distinct content words of ``topic`` with one of them said 1-2 more times,
      against the same answer with one repeat replaced by an unused word of the same kind and the other repeat, if
      any, dropped (``R*`` counts distinct words, so a repeat adds nothing; the repeated answer is as long as the
      other or one word longer, as "S S S" against "S T", so that length alone does not pay);
    - ``"add"`` (a missing word): 1-2 distinct content words of ``topic`` against the same answer with an unused
      content word of ``topic`` inserted at a random place.

    Which of the two answers comes first is drawn.
    """
    if edit not in CONTRAST_EDITS:
        raise ValueError(f"unknown contrast edit {edit!r}; expected one of {CONTRAST_EDITS}")
    content = list(topic.content)
    if edit == ON_TOPIC:
        strays = [w for t in topics if t.index != topic.index for w in t.content if w not in topic.content]
        if not strays:
            raise ValueError("a contrast pair needs another topic's content words; the world has one topic")
        words = rng.sample(content, rng.randint(0, min(2, len(content) - 1)))
        words.insert(rng.randint(0, len(words)), rng.choice(strays))
        first = " ".join(words)
        second = edit_response(topic, first, rng, topics, ON_TOPIC)
    elif edit == VARY:
        # The repeat is replaced by an unused word of its kind, so the repeated word is drawn from a kind with two
        # words or more and a second word, if any, never takes that kind's last unused word.
        repeatable = [w for w in content if len(_same_kind(topic, w)) >= 2]
        if not repeatable:
            raise ValueError("a repeat contrast needs a topic with two words of one kind (detail or safe_alt)")
        word = rng.choice(repeatable)
        words = [word]
        others = [u for u in content if u != word and any(x not in (word, u) for x in _same_kind(topic, word))]
        if others and rng.random() < 0.5:
            words.insert(rng.randint(0, 1), rng.choice(others))
        for _ in range(rng.randint(1, 2)):
            words.insert(rng.randint(words.index(word) + 1, len(words)), word)
        first = " ".join(words)
        # one repeat becomes an unused word of the kind (the VARY edit); any other repeat is dropped, so the
        # repeated answer is as long as the distinct one or a word longer, and length alone does not pay
        repeats = [i for i, w in enumerate(words) if w == word][1:]
        keep = rng.choice(repeats)
        words[keep] = rng.choice([u for u in _same_kind(topic, word) if u not in words])
        second = " ".join(w for i, w in enumerate(words) if i not in repeats or i == keep)
    else:
        words = rng.sample(content, rng.randint(1, min(2, len(content) - 1)))
        first = " ".join(words)
        words.insert(rng.randint(0, len(words)), rng.choice([w for w in content if w not in words]))
        second = " ".join(words)
    return (first, second) if rng.random() < 0.5 else (second, first)


def _same_kind(topic: Topic, word: str) -> tuple[str, ...]:
    return topic.detail if word in topic.detail else topic.safe_alt
