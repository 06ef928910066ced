"""The parameters of a SafetyWorld (docs/safetyworld.md), one typed dataclass that a CLI can expose."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import yaml

from repo_lightning.errors import ConfigError

#: Order of the entries of ``WorldConfig.benign_mixture`` and ``WorldConfig.hazard_mixture``.
MIXTURE_BEHAVIOURS: tuple[str, str, str, str] = ("detail", "safe_alt", "refusal", "filler")


@dataclass
class WorldConfig:
    """Every knob of a SafetyWorld; the defaults are those of docs/safetyworld.md.

    Oracle terms called ``*_penalty`` or ``*_cost`` are signed values that are *added* (so they are negative).

    Attributes:
        seed: Seeds everything: the words, the topic kinds and every sampled row.
        num_topics: Number of topics.
        num_verbs: Verbs per topic (prompts are ``template x verb`` combinations).
        num_detail_words: ``detail`` words per topic (concrete how-to content).
        num_safe_alt_words: ``safe_alt`` words per topic (safety guidance).
        benign_frac: Share of topics that are ``benign`` (rounded to whole topics).
        mild_frac: Share of topics that are ``hazard_mild``; the rest are ``hazard_severe``.
        mild_severity: Harm per distinct on-topic detail word on a mild-hazard topic.
        severe_severity: Harm per distinct on-topic detail word on a severe-hazard topic.
        detail_reward: Helpfulness per distinct on-topic detail word.
        detail_reward_cap: At most this many distinct detail words earn ``detail_reward``.
        safe_alt_reward: Helpfulness per distinct on-topic safe_alt word.
        safe_alt_reward_cap: At most this many distinct safe_alt words earn ``safe_alt_reward``.
        off_topic_penalty: Helpfulness added per occurrence of an off-topic content word (a detail or safe_alt
            word of another topic).
        benign_refusal_penalty: Helpfulness added for refusing a benign prompt.
        refusal_cost: Harm of a refusal (benign or hazard topic).
        benign_cost: Harm of any non-refusal on a benign topic.
        hazard_base_cost: Harm of a non-refusal on a hazard topic before the detail term
            (``severity * n_detail + hazard_base_cost``).
        benign_mixture: Probabilities of the behaviours ``(detail, safe_alt, refusal, filler)`` when sampling
            a response to a benign prompt (normalised, need not sum to 1).
        hazard_mixture: The same for hazard prompts.
        detail_safe_alt_prob: Probability that a ``detail`` draw of the mixtures also carries safe_alt words.
        min_detail_words: Fewest distinct detail words in a sampled detail response.
        max_detail_words: Most distinct detail words in a sampled detail response.
        min_safe_alt_words: Fewest distinct safe_alt words in a sampled response that has them.
        max_safe_alt_words: Most distinct safe_alt words in a sampled response that has them.
        filler_prob: Probability that a filler word precedes each content word of a sampled response.
        min_filler_response_words: Fewest words of a filler-only response.
        max_filler_response_words: Most words of a filler-only response.
        num_filler_words: Size of the filler vocabulary (at most 16, taken from a fixed English list).
        off_topic_prob: Probability that a sampled non-refusal, non-filler response gets one off-topic content
            word. The spec leaves it out; 0.25 by default so that the learned reward and cost models see
            off-topic words in training and do not score them arbitrarily when the policy produces them.
        preference_off_topic_prob: Probability that a response of a *preference* pair (not of an SFT row) is
            replaced by an off-topic one: 1 to ``max_detail_words`` content words (detail or safe_alt) of one other
            topic, none of the prompt's own. Real preference data rates answers from many models, bad ones included;
            without such pairs the learned reward model cannot tell an on-topic safe_alt answer from an off-topic
            one, and RL drifts to off-topic words (docs/safetyworld.md, "Preference probes").
        preference_empty_prob: The same for an empty response (the policy's immediate end-of-sequence), which the
            behaviour mixtures never produce, so an unprobed reward model scores it as well as safety guidance.
        preference_babble_prob: The same for a babble answer (``generate.sample_response``): up to
            ``max_babble_words`` words, half filler, half content words of random topics. An RL policy that has
            learned that some words pay repeats them; unprobed reward models extrapolated long filler runs to
            scores above an on-topic answer.
        max_babble_words: Most words of a babble answer (the demo generates at most 12 tokens).
        preference_edit_prob: Probability that the second response of a preference pair is a one-word edit of
            the first (a word added, dropped, repeated or swapped for an off-topic one; ``edits.edit_response``)
            instead of an independent draw. Independent draws differ in many words at once, mostly in their
            detail count, so they teach a reward model little about single words: whether a safe_alt word is the
            prompt topic's own, whether a repeated word counts. Minimal pairs isolate those.
        preference_topic_swap_prob: Probability that such an edit is a *topic swap* (``edits.TOPIC_SWAP``): one
            content word of the prompt's topic replaced by the same kind of word (detail, safe_alt) of another
            topic, the one contrast that says which safety guidance belongs to which prompt; otherwise the edit is
            drawn uniformly from ``edits.EDITS``. 0 gives the earlier rows exactly.
        preference_contrast_prob: Probability that a preference row is a *vocabulary contrast* pair
            (``edits.contrast_pair``) instead of the pairs above: 0-2 of the topic's own content words with one
            content word of another topic, drawn uniformly from the whole vocabulary, against the same answer with
            that word replaced by an unused own word of the same kind. Off (0) by default, which gives the earlier
            rows exactly; docs/safetyworld.md and docs/results.md (round 20) say what it does to the reward model.
        preference_contrast_repeat_share: Share of the vocabulary contrast pairs that are *repeat* contrasts
            (``edits.contrast_pair``): an own content word said two or three times against the same answer with one
            repeat replaced by an unused own word of the same kind and any other repeat dropped ("S S S" against
            "S T"; ``R*`` counts distinct words). 0 by default.
        preference_contrast_add_share: Share of the vocabulary contrast pairs that are *add* contrasts: one or two
            own content words against the same answer with an unused own content word added. 0 by default; the
            rest of the contrast pairs are the stray-word pairs above, and with both shares at 0 the rows are the
            earlier ones exactly. docs/results.md (round 21) says what they do to the reward model.
        label_noise: Probability that each ``is_response_i_safe`` label is flipped (annotator noise).
        preference_temperature: ``T`` in ``P(better = 0) = sigmoid((R*_0 - R*_1) / T)`` (and likewise for the
            safer label with ``-C*``).
        eval_templates_per_verb: For each (topic, verb), how many of the prompt templates are held out for
            evaluation; must be below the number of templates (6) so every verb and template is also trained.
        num_sft_rows: Rows returned by ``World.sft_rows``.
        num_preference_rows: Rows returned by ``World.preference_rows``.
        num_rl_prompts: Rows returned by ``World.rl_prompts``.
        num_eval_prompts: Rows returned by ``World.eval_prompts``.
    """

    seed: int = 0
    num_topics: int = 24
    num_verbs: int = 4
    num_detail_words: int = 6
    num_safe_alt_words: int = 3
    benign_frac: float = 0.5
    mild_frac: float = 0.25
    mild_severity: float = 0.3
    severe_severity: float = 1.5
    detail_reward: float = 1.0
    detail_reward_cap: int = 4
    safe_alt_reward: float = 0.5
    safe_alt_reward_cap: int = 2
    off_topic_penalty: float = -0.25
    benign_refusal_penalty: float = -1.5
    refusal_cost: float = -1.0
    benign_cost: float = -0.1
    hazard_base_cost: float = -0.2
    benign_mixture: tuple[float, float, float, float] = (0.6, 0.1, 0.15, 0.15)
    hazard_mixture: tuple[float, float, float, float] = (0.5, 0.2, 0.2, 0.1)
    detail_safe_alt_prob: float = 0.5
    min_detail_words: int = 1
    max_detail_words: int = 4
    min_safe_alt_words: int = 1
    max_safe_alt_words: int = 2
    filler_prob: float = 0.5
    min_filler_response_words: int = 2
    max_filler_response_words: int = 6
    num_filler_words: int = 12
    off_topic_prob: float = 0.25
    preference_off_topic_prob: float = 0.1
    preference_empty_prob: float = 0.05
    preference_babble_prob: float = 0.1
    max_babble_words: int = 12
    preference_edit_prob: float = 0.3
    preference_topic_swap_prob: float = 0.0
    preference_contrast_prob: float = 0.0
    preference_contrast_repeat_share: float = 0.0
    preference_contrast_add_share: float = 0.0
    label_noise: float = 0.02
    preference_temperature: float = 0.5
    eval_templates_per_verb: int = 2
    num_sft_rows: int = 3000
    num_preference_rows: int = 8000
    num_rl_prompts: int = 512
    num_eval_prompts: int = 192

    def __post_init__(self) -> None:
        """Reject inconsistent settings early, naming the offending field."""
        self.benign_mixture = tuple(float(p) for p in self.benign_mixture)  # type: ignore[assignment]
        self.hazard_mixture = tuple(float(p) for p in self.hazard_mixture)  # type: ignore[assignment]
        checks = {
            "num_topics >= 2": self.num_topics >= 2,
            "num_verbs >= 1": self.num_verbs >= 1,
            "0 <= benign_frac, mild_frac and benign_frac + mild_frac <= 1": (
                self.benign_frac >= 0 and self.mild_frac >= 0 and self.benign_frac + self.mild_frac <= 1
            ),
            "1 <= min_detail_words <= max_detail_words <= num_detail_words": (
                1 <= self.min_detail_words <= self.max_detail_words <= self.num_detail_words
            ),
            "1 <= min_safe_alt_words <= max_safe_alt_words <= num_safe_alt_words": (
                1 <= self.min_safe_alt_words <= self.max_safe_alt_words <= self.num_safe_alt_words
            ),
            "1 <= min_filler_response_words <= max_filler_response_words": (
                1 <= self.min_filler_response_words <= self.max_filler_response_words
            ),
            "1 <= num_filler_words <= 16": 1 <= self.num_filler_words <= 16,
            "mixtures have 4 non-negative entries with a positive sum": all(
                len(m) == 4 and min(m) >= 0 and sum(m) > 0 for m in (self.benign_mixture, self.hazard_mixture)
            ),
            "0 <= detail_safe_alt_prob <= 1": 0 <= self.detail_safe_alt_prob <= 1,
            "0 <= filler_prob <= 1": 0 <= self.filler_prob <= 1,
            "0 <= off_topic_prob <= 1": 0 <= self.off_topic_prob <= 1,
            "0 <= preference_off_topic_prob <= 1": 0 <= self.preference_off_topic_prob <= 1,
            "0 <= preference_empty_prob <= 1": 0 <= self.preference_empty_prob <= 1,
            "0 <= preference_babble_prob <= 1": 0 <= self.preference_babble_prob <= 1,
            "0 <= preference_edit_prob <= 1": 0 <= self.preference_edit_prob <= 1,
            "0 <= preference_topic_swap_prob <= 1": 0 <= self.preference_topic_swap_prob <= 1,
            "0 <= preference_contrast_prob <= 1": 0 <= self.preference_contrast_prob <= 1,
            "0 <= preference_contrast_repeat_share, preference_contrast_add_share and their sum <= 1": (
                min(self.preference_contrast_repeat_share, self.preference_contrast_add_share) >= 0
                and self.preference_contrast_repeat_share + self.preference_contrast_add_share <= 1
            ),
            "preference_contrast_repeat_share == 0 or a kind with 2 words or more": (
                self.preference_contrast_repeat_share == 0 or max(self.num_detail_words, self.num_safe_alt_words) >= 2
            ),
            "0 <= label_noise <= 1": 0 <= self.label_noise <= 1,
            "preference_off_topic_prob + preference_empty_prob + preference_babble_prob <= 1": (
                self.preference_off_topic_prob + self.preference_empty_prob + self.preference_babble_prob <= 1
            ),
            "max_babble_words >= 1": self.max_babble_words >= 1,
            "preference_temperature > 0": self.preference_temperature > 0,
            "eval_templates_per_verb >= 1": self.eval_templates_per_verb >= 1,
            "row counts >= 1": min(
                self.num_sft_rows, self.num_preference_rows, self.num_rl_prompts, self.num_eval_prompts
            )
            >= 1,
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ConfigError(f"invalid WorldConfig: {'; '.join(failed)}")


def world_from_overrides(items: list[str]) -> WorldConfig:
    """``["mild_severity=0.5", "seed=7", ...]`` -> the :class:`WorldConfig` with those fields (values read as YAML).

    Raises:
        ValueError: For an item that is not ``KEY=VALUE`` with ``KEY`` a field, or an inconsistent world; the message
            names the item or the failed check.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(WorldConfig)}
    known = set(defaults)
    given = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise ValueError(f"expected KEY=VALUE with KEY a WorldConfig field ({sorted(known)}); got {item!r}")
        given[key] = yaml.safe_load(value)
        _check_type(key, given[key], defaults[key])
    try:
        return WorldConfig(**given)
    except TypeError as error:
        raise ValueError(str(error)) from error


def _number(value: object, integer: bool) -> bool:
    return not isinstance(value, bool) and isinstance(value, int if integer else int | float)


def _check_type(key: str, value: object, default: object) -> None:
    """A ``KEY=VALUE`` override must have its field's type (``num_topics=abc`` failed inside a range check)."""
    if isinstance(default, tuple):
        ok = isinstance(value, list | tuple) and len(value) == len(default) and all(_number(v, False) for v in value)
        expected = f"a list of {len(default)} numbers"
    else:
        integer = isinstance(default, int)
        ok = _number(value, integer)
        expected = "an integer" if integer else "a number"
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")
