"""SafetyWorld: a generated prompt/response language whose helpfulness and harm are known exactly.

See docs/safetyworld.md. A :class:`World` is a deterministic function of its :class:`WorldConfig`: the same
seed gives the same words, topics, prompts and rows. Each kind of row draws from its own random stream, so
calling one method never changes what another returns.

Details the spec leaves open, settled here: a refusal is defined in :mod:`.oracles`; the two responses of a
preference row are redrawn (up to 10 times) when identical, since an identical pair carries no preference;
prompt lists longer than their pool repeat the pool in freshly shuffled passes (each distinct prompt appears
once before any appears twice).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence

from transformers import PreTrainedTokenizerFast

from repo_lightning.safetyworld import oracles
from repo_lightning.safetyworld.config import WorldConfig
from repo_lightning.safetyworld.edits import ON_TOPIC, TOPIC_SWAP, VARY, contrast_pair, edit_response
from repo_lightning.safetyworld.generate import (
    FILLER_WORDS,
    REFUSAL,
    Topic,
    make_topics,
    prompt_pools,
    sample_behaviour,
    sample_preference_behaviour,
    sample_response,
    template_words,
)
from repo_lightning.safetyworld.tokenizer import build_word_tokenizer

# The split of tokenizers' ``Whitespace`` pre-tokenizer, so "tobrel?" reads as "tobrel" "?".
_WORD_PATTERN = re.compile(r"\w+|[^\w\s]+")
_MAX_PAIR_REDRAWS = 10


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _cycled(pool: Sequence[tuple[str, Topic]], n: int, rng: random.Random) -> list[tuple[str, Topic]]:
    """Draw ``n`` items as successive shuffled passes over ``pool`` (without replacement while n <= len)."""
    drawn: list[tuple[str, Topic]] = []
    while len(drawn) < n:
        order = list(pool)
        rng.shuffle(order)
        drawn += order
    return drawn[:n]


class World:
    """A SafetyWorld: topics, prompts, sampled responses, ground-truth oracles and a tokenizer.

    Attributes:
        config: The parameters the world was generated from.
        topics: The topics, ``topics[i].index == i``.
        refusal: The refusal phrase.
    """

    def __init__(self, config: WorldConfig | None = None) -> None:
        """Generate the world.

        Args:
            config: Parameters; ``WorldConfig()`` (the spec's defaults) when ``None``.
        """
        self.config = config if config is not None else WorldConfig()
        self.refusal = REFUSAL
        self.topics: list[Topic] = make_topics(self.config, self._rng("topics"))
        self._by_subject = {topic.subject: topic for topic in self.topics}
        self._content = oracles.content_index(self.topics)
        self._train_pool, self._eval_pool = prompt_pools(self.topics, self.config.eval_templates_per_verb)

    def _rng(self, stream: str) -> random.Random:
        # String seeds are hashed with SHA-512, so streams are reproducible across processes.
        return random.Random(f"safetyworld/{self.config.seed}/{stream}")

    def vocabulary(self) -> list[str]:
        """Every word a templated prompt or a response can contain, specials excluded, in a fixed order."""
        words = template_words() + list(FILLER_WORDS[: self.config.num_filler_words])
        for topic in self.topics:
            words += [topic.subject, *topic.verbs, *topic.detail, *topic.safe_alt]
        return list(dict.fromkeys(words))

    def topic_of(self, prompt: str) -> Topic:
        """Return the topic a prompt is about (the topic whose subject word it names).

        Also accepts a prompt wrapped in the conversation template.

        Raises:
            ValueError: If the prompt names no subject, or several.
        """
        found = {self._by_subject[w].index for w in _WORD_PATTERN.findall(prompt) if w in self._by_subject}
        if len(found) != 1:
            raise ValueError(f"prompt {prompt!r} names {len(found)} topic subjects; expected exactly one")
        return self.topics[found.pop()]

    def _counts(self, prompt: str, response: str) -> tuple[Topic, oracles.ResponseCounts]:
        topic = self.topic_of(prompt)
        return topic, self._topic_counts(topic, response)

    def _topic_counts(self, topic: Topic, response: str) -> oracles.ResponseCounts:
        return oracles.count_words(topic, " ".join(_WORD_PATTERN.findall(response)), self._content)

    def helpfulness(self, prompt: str, response: str) -> float:
        """Ground-truth helpfulness ``R*(x, y)``; see :func:`.oracles.helpfulness`."""
        topic, counts = self._counts(prompt, response)
        return oracles.helpfulness(topic, counts, self.config)

    def harm(self, prompt: str, response: str) -> float:
        """Ground-truth harm ``C*(x, y)``, ``> 0`` means unsafe; see :func:`.oracles.harm`."""
        topic, counts = self._counts(prompt, response)
        return oracles.harm(topic, counts, self.config)

    def is_refusal(self, response: str) -> bool:
        """Whether a response is a refusal: it contains the refusal phrase and no detail word of any topic."""
        return oracles.is_refusal(" ".join(_WORD_PATTERN.findall(response)), self._content)

    def sample_response(self, topic: Topic, behaviour: str, rng: random.Random) -> str:
        """Sample a response to a prompt about ``topic``.

        Args:
            topic: The prompt's topic.
            behaviour: ``"detail"``, ``"detail_safe_alt"``, ``"safe_alt"``, ``"refusal"`` or ``"filler"``
                (see :func:`.generate.sample_response`).
            rng: Source of randomness.
        """
        return sample_response(topic, behaviour, rng, self.config, self.topics)

    def _mixture_response(self, topic: Topic, rng: random.Random) -> str:
        return self.sample_response(topic, sample_behaviour(topic, rng, self.config), rng)

    def preference_response(self, topic: Topic, rng: random.Random) -> str:
        """A response drawn as a preference row's first response is: a mixture behaviour or a probe."""
        return self.sample_response(topic, sample_preference_behaviour(topic, rng, self.config), rng)

    def _second_response(self, topic: Topic, first: str, edited: bool, rng: random.Random) -> str:
        if edited:
            swap = self.config.preference_topic_swap_prob > 0 and rng.random() < self.config.preference_topic_swap_prob
            return edit_response(topic, first, rng, self.topics, TOPIC_SWAP if swap else None)
        return self.preference_response(topic, rng)

    def sft_rows(self) -> list[dict]:
        """``num_sft_rows`` rows ``{"prompt", "response", "topic", "kind"}`` on training prompts.

        Responses follow the kind's behaviour mixture, so about ``hazard_mixture[0]`` of the hazard rows are
        unsafe.
        """
        rng = self._rng("sft")
        rows = []
        for _ in range(self.config.num_sft_rows):
            prompt, topic = rng.choice(self._train_pool)
            response = self._mixture_response(topic, rng)
            rows.append({"prompt": prompt, "response": response, "topic": topic.name, "kind": topic.kind})
        return rows

    def preference_rows(self) -> list[dict]:
        """``num_preference_rows`` rows in the PKU-SafeRLHF schema on training prompts.

        Each response follows the kind's behaviour mixture, except that with probability
        ``preference_off_topic_prob`` / ``preference_empty_prob`` it is an off-topic or an empty answer (probes of
        what an RL policy drifts to; SFT rows never contain them), and with probability ``preference_edit_prob``
        the second response is a one-word edit of the first (a minimal pair). With probability
        ``preference_contrast_prob`` (0 by default) a row is instead a vocabulary contrast pair
        (``edits.contrast_pair``): a stray word, or with the shares ``preference_contrast_repeat_share`` and
        ``preference_contrast_add_share`` a repeated or a missing word.

        Keys: ``prompt``, ``response_0``, ``response_1``, ``better_response_id`` (int, drawn with
        ``P(0) = sigmoid((R*_0 - R*_1) / T)``), ``safer_response_id`` (int, the same with ``-C*``),
        ``is_response_0_safe`` / ``is_response_1_safe`` (bool, ``C*_i <= 0`` flipped with probability
        ``label_noise``), ``topic`` and ``kind``.
        """
        return self._preference_rows(self._train_pool, self.config.num_preference_rows, "preference")

    def eval_preference_rows(self) -> list[dict]:
        """Preference rows as :meth:`preference_rows`, but on the held-out prompts (``num_eval_prompts`` * 4 rows).

        These measure the reward and cost models on prompts they never saw; score them against the oracles, not
        against their noisy labels.
        """
        return self._preference_rows(self._eval_pool, 4 * self.config.num_eval_prompts, "eval_preference")

    def _preference_rows(self, pool, count: int, stream: str) -> list[dict]:
        cfg = self.config
        rng = self._rng(stream)
        rows = []
        for _ in range(count):
            prompt, topic = rng.choice(pool)
            if cfg.preference_contrast_prob > 0 and rng.random() < cfg.preference_contrast_prob:
                pair = contrast_pair(topic, rng, self.topics, self._contrast_edit(rng))
                rows.append(self.label_pair(prompt, topic, *pair, rng))
                continue
            responses = [self.preference_response(topic, rng)]
            edited = rng.random() < cfg.preference_edit_prob
            second = self._second_response(topic, responses[0], edited, rng)
            for _ in range(_MAX_PAIR_REDRAWS):
                if second != responses[0]:
                    break
                second = self._second_response(topic, responses[0], edited, rng)
            responses.append(second)
            rows.append(self.label_pair(prompt, topic, responses[0], responses[1], rng))
        return rows

    def _contrast_edit(self, rng: random.Random) -> str:
        """Which contrast a vocabulary contrast pair is (no draw when every contrast is a stray word, as before)."""
        cfg = self.config
        if cfg.preference_contrast_repeat_share == 0 and cfg.preference_contrast_add_share == 0:
            return ON_TOPIC
        draw = rng.random()
        if draw < cfg.preference_contrast_repeat_share:
            return VARY
        if draw < cfg.preference_contrast_repeat_share + cfg.preference_contrast_add_share:
            return "add"
        return ON_TOPIC

    def label_pair(self, prompt: str, topic: Topic, response_0: str, response_1: str, rng: random.Random) -> dict:
        """One PKU-SafeRLHF-schema row for two responses to ``prompt``, labelled as the preference data is.

        ``better_response_id`` is drawn with probability ``sigmoid((R*_0 - R*_1) / preference_temperature)``,
        ``safer_response_id`` likewise from ``-C*``, and ``is_response_i_safe`` is ``C*_i <= 0`` flipped with
        probability ``label_noise``: the simulated annotator of docs/safetyworld.md, used for the generated rows and
        for labelling a policy's own samples (:mod:`.annotate`).
        """
        cfg = self.config
        responses = (response_0, response_1)
        counts = [self._topic_counts(topic, r) for r in responses]
        rewards = [oracles.helpfulness(topic, c, cfg) for c in counts]
        costs = [oracles.harm(topic, c, cfg) for c in counts]
        temperature = cfg.preference_temperature
        better = 0 if rng.random() < _sigmoid((rewards[0] - rewards[1]) / temperature) else 1
        safer = 0 if rng.random() < _sigmoid((costs[1] - costs[0]) / temperature) else 1
        safe = [(cost <= 0) != (rng.random() < cfg.label_noise) for cost in costs]
        return {
            "prompt": prompt,
            "response_0": response_0,
            "response_1": response_1,
            "better_response_id": better,
            "safer_response_id": safer,
            "is_response_0_safe": safe[0],
            "is_response_1_safe": safe[1],
            "topic": topic.name,
            "kind": topic.kind,
        }

    def rl_prompts(self) -> list[dict]:
        """``num_rl_prompts`` rows ``{"prompt", "topic", "kind"}`` from the training prompt pool."""
        drawn = _cycled(self._train_pool, self.config.num_rl_prompts, self._rng("rl"))
        return [{"prompt": p, "topic": t.name, "kind": t.kind} for p, t in drawn]

    def eval_prompts(self) -> list[dict]:
        """``num_eval_prompts`` rows ``{"prompt", "topic", "kind"}`` from the held-out prompt pool.

        Held-out prompts are (template, verb) combinations that no training prompt uses, so they are disjoint
        from every prompt of :meth:`sft_rows`, :meth:`preference_rows` and :meth:`rl_prompts`.
        """
        drawn = _cycled(self._eval_pool, self.config.num_eval_prompts, self._rng("eval"))
        return [{"prompt": p, "topic": t.name, "kind": t.kind} for p, t in drawn]

    def build_tokenizer(self) -> PreTrainedTokenizerFast:
        """A word-level tokenizer over :meth:`vocabulary` plus ``<pad> <s> </s> <unk> <sep>``."""
        return build_word_tokenizer(self.vocabulary())
