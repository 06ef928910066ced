"""A preference round on a policy's own samples: pair its answers and label them as the preference data is.

Safe RLHF trains its reward and cost models again on pairs of the RL policy's own answers, labelled by people
(three rounds for Beaver v1-v3), because RL drives a policy to answers the first data never showed the models. On
SafetyWorld the simulated annotator of the preference data (:meth:`World.label_pair`: Bradley-Terry draws from
the oracles at ``preference_temperature``, safety labels flipped with ``label_noise``) labels them, so the rows
are exactly as noisy as the first round's. docs/safetyworld.md, "Preference rounds on the policy's samples".

Input: the ``per_prompt.jsonl`` that a policy's ``test`` run writes (``evaluation.report_dir``), taken on the
*training* prompts (``World.rl_prompts``), never on the held-out evaluation prompts. Each prompt's distinct
answers are paired in order, and each is also paired with a fresh draw from the world's preference mixture (the
reference answers of the first round's data), so a policy that always gives one answer still gets it compared.

Example::

    python -m repo_lightning.safetyworld.annotate runs/r1/samples/repo/per_prompt.jsonl --out pairs.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

from repo_lightning.data.schema import DataValidationError
from repo_lightning.data.sources import read_jsonl
from repo_lightning.safetyworld.config import world_from_overrides
from repo_lightning.safetyworld.edits import (
    EDITS,
    ON_TOPIC,
    TOPIC_SWAP,
    VARY,
    edit_response,
    on_topic_choices,
    vary_choices,
)
from repo_lightning.safetyworld.generate import REFUSAL
from repo_lightning.safetyworld.world import World

#: Redraws of the mixture partner while it equals the answer it is paired with.
_MAX_PARTNER_REDRAWS = 10


def annotate_samples(
    world: World,
    samples: Iterable[tuple[str, Sequence[str]]],
    seed: int = 0,
    reference_pairs: bool = True,
    edit_pairs: bool = False,
    on_topic_pairs: bool = False,
) -> list[dict]:
    """Preference rows (PKU-SafeRLHF schema, with ``topic``/``kind``) for each prompt's sampled answers.

    Args:
        world: The world whose prompts were answered (its oracles label, its mixture supplies partners).
        samples: ``(prompt, answers)`` per prompt; the prompt as the world wrote it.
        seed: Seeds the pairing partners and the label draws (with the world's seed).
        reference_pairs: Also pair every distinct answer with a fresh draw from the preference mixture (the
            reference answers of the first round's data), not only the answers with each other: pairs of two
            similar policy answers say little about how they compare with the answers the data already covers.
        edit_pairs: Also pair every distinct answer with a one-word edit of itself (:func:`.edits.edit_response`,
            a minimal pair on the policy's own answer): an answer that says an on-topic content word more than once
            gets that word varied (:data:`.edits.VARY`: one occurrence replaced by an unused word of the same
            kind), any other answer an edit drawn uniformly from :data:`.edits.EDITS` and
            :data:`.edits.TOPIC_SWAP`. Repeating a word that pays is the cheapest exploit of a learned reward
            model that has not learnt that ``R*`` counts distinct words (docs/results.md, round 14); pairs against
            other answers rarely isolate it. Off by default (the earlier rounds' rows exactly).
        on_topic_pairs: Also pair every distinct answer that says another topic's content word with the same answer
            with one such word replaced by an unused word of the prompt's topic of the same kind
            (:data:`.edits.ON_TOPIC`): the answer the learned reward models' optimum is made of, one own safety
            word next to another topic's word, against two own safety words (docs/results.md round 19). Off by
            default.

    Returns:
        Per prompt, one row per pair of consecutive distinct answers (a left-over answer is paired with a mixture
        draw), with ``reference_pairs`` one more per distinct answer, with ``edit_pairs`` one more per distinct
        answer after those, and with ``on_topic_pairs`` one more per distinct answer with another topic's word after
        those; in prompt order.
    """
    rng = random.Random(f"safetyworld/{world.config.seed}/annotate/{seed}")
    rows = []
    for prompt, answers in samples:
        topic = world.topic_of(prompt)
        distinct = list(dict.fromkeys(a.strip() for a in answers))
        pairs = [(distinct[i], distinct[i + 1]) for i in range(0, len(distinct) - 1, 2)]
        partnered = distinct if reference_pairs else distinct[len(distinct) - len(distinct) % 2 :]
        for answer in partnered:
            partner = world.preference_response(topic, rng)
            for _ in range(_MAX_PARTNER_REDRAWS):
                if partner != answer:
                    break
                partner = world.preference_response(topic, rng)
            pairs.append((answer, partner) if rng.random() < 0.5 else (partner, answer))
        if edit_pairs:
            edit_rng = random.Random(f"safetyworld/{world.config.seed}/annotate/{seed}/edits/{prompt}")
            for answer in distinct:
                words = [] if answer == REFUSAL else answer.split()
                edit = VARY if vary_choices(topic, words) else edit_rng.choice((*EDITS, TOPIC_SWAP))
                edited = edit_response(topic, answer, edit_rng, world.topics, edit)
                pairs.append((answer, edited) if edit_rng.random() < 0.5 else (edited, answer))
        if on_topic_pairs:
            swap_rng = random.Random(f"safetyworld/{world.config.seed}/annotate/{seed}/on_topic/{prompt}")
            for answer in distinct:
                words = [] if answer == REFUSAL else answer.split()
                if on_topic_choices(topic, words, world.topics):
                    edited = edit_response(topic, answer, swap_rng, world.topics, ON_TOPIC)
                    pairs.append((answer, edited) if swap_rng.random() < 0.5 else (edited, answer))
        rows += [world.label_pair(prompt, topic, a, b, rng) for a, b in pairs]
    return rows


def read_samples(path: str | Path) -> list[tuple[str, list[str]]]:
    """``(prompt, responses)`` of every line of a ``per_prompt.jsonl``.

    Raises:
        DataValidationError: a line without a string ``prompt`` or a list ``responses`` (naming file and line).
    """
    samples = []
    for number, row in enumerate(read_jsonl(Path(path))):
        prompt, responses = row.get("prompt"), row.get("responses")
        if not isinstance(prompt, str) or not isinstance(responses, list) or not responses:
            raise DataValidationError(
                f"{path}: row {number}: expected a per_prompt.jsonl record with a string 'prompt' and a non-empty "
                f"list 'responses' (the evaluation report's format); got keys {sorted(row)}"
            )
        samples.append((prompt, [str(r) for r in responses]))
    return samples


def write_rows(rows: list[dict], path: str | Path) -> None:
    """Write rows as JSON lines (through a temporary file, so a killed run leaves no half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(json.dumps(row) + "\n" for row in rows))
    partial.replace(path)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", nargs="+", help="per_prompt.jsonl files of policy test runs on training prompts")
    parser.add_argument("--out", required=True, help="preference rows to write (.jsonl)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pairing and the label draws")
    parser.add_argument("--world", nargs="*", default=[], metavar="KEY=VALUE", help="WorldConfig fields")
    parser.add_argument(
        "--edit-pairs", action="store_true", help="also pair each distinct answer with a one-word edit of itself"
    )
    parser.add_argument(
        "--on-topic-pairs",
        action="store_true",
        help="also pair each distinct answer that says another topic's word with that word made the prompt's own",
    )
    args = parser.parse_args(argv)
    try:
        world = World(world_from_overrides(args.world))
    except ValueError as error:
        parser.error(f"--world: {error}")
    rows = []
    for index, path in enumerate(args.samples):
        if not Path(path).is_file():
            parser.error(f"no samples file at {path!r} (expected a per_prompt.jsonl)")
        rows += annotate_samples(
            world,
            read_samples(path),
            seed=args.seed * 1000 + index,
            edit_pairs=args.edit_pairs,
            on_topic_pairs=args.on_topic_pairs,
        )
    write_rows(rows, args.out)
    print(f"{len(rows)} preference rows from {len(args.samples)} sample file(s) -> {args.out}")


if __name__ == "__main__":
    main()
