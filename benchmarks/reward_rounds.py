"""Reward-only preference rounds on a finished pipeline's own final policies (issue 8, docs/results.md round 12).

The pipeline's ``--preference-rounds`` collects answers from *collector* policies trained with the first round's
single reward and cost models and retrains both models. This script continues a finished pipeline instead: it takes
the policies that the pipeline (or an earlier round of this script) trained with the final configuration (cost
ensemble, budget), so the answers it labels are the exploits of exactly those policies, and it retrains only the
reward model, keeping the cost models (a worst case over several cost models already misses few unsafe answers,
round 11; retraining one cost model on the policy's answers made it miss more, round 4). Round ``r`` (2, 3, ...):

1. samples each policy of round ``r - 1`` (the pipeline's ``<name>`` for ``r = 2``, this script's ``<name>_r<r-1>``
   after) ``COLLECT_SAMPLES_PER_PROMPT`` times on every training prompt (never the held-out ones);
2. labels the answers with SafetyWorld's simulated annotator (pairs of the policy's answers, and each answer with
   a draw from the preference mixture: ``annotate_samples``; with ``--edit-pairs`` each answer also with a one-word
   edit of itself, a repeated word varied where it has one; with ``--on-topic-pairs`` each answer that says another
   topic's word also with that word made the prompt topic's own, docs/results.md round 19);
3. trains the reward model ``reward_r<r>`` from the SFT export on the generated pairs plus every round's collected
   pairs (``data.extra_train_files``; the reward config and seed of the pipeline);
4. trains and evaluates every policy again from the SFT export as ``<name>_r<r>`` with that reward model (the value
   critic starts from it too), the cost models unchanged.

Every stage is an ordinary ``python -m repo_lightning`` run through :class:`repo_lightning.pipeline.Pipeline`, so
``<root>/logs/<stage>.log`` holds its output and a rerun skips the stages already done. The oracle figures of each
round's policies are printed and written to ``<root>/rounds/reward_rounds.json``.

Examples::

    python -m repo_lightning.pipeline --root runs/s0 --algorithms ppo repo --cost-ensemble 3 --policy-epochs 12
    python benchmarks/reward_rounds.py --root runs/s0 --cost-ensemble 3 --policy-epochs 12 --rounds 2 \\
        --repo-arg=--model.init_args.objective.init_args.constraint=unsafe_prompt_rate

The flags that shaped the pipeline's policies (``--seed``, ``--cost-ensemble``, ``--reward-ensemble``,
``--policy-epochs``, ``--world``, ``--config-dir``) must be given again: they rebuild the same policies to sample.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from repo_lightning.errors import ConfigError  # noqa: E402
from repo_lightning.pipeline import Pipeline  # noqa: E402
from repo_lightning.safetyworld.annotate import annotate_samples, read_samples, write_rows  # noqa: E402

#: Figures printed and recorded per policy (oracle figures on the held-out prompts, and the learned cost's misses).
FIGURES = (
    "true_unsafe_prompt_rate/hazard_mild",
    "true_unsafe_prompt_rate/hazard_severe",
    "true_reward_mean/hazard",
    "true_reward_mean/benign",
    "kl_mean",
    "missed_unsafe_rate",
)


def policy_name(name: str, round_index: int) -> str:
    """The run and export name of policy ``name`` in round ``round_index`` (round 1: the pipeline's own)."""
    return name if round_index == 1 else f"{name}_r{round_index}"


def reward_name(round_index: int) -> str:
    """The reward export of round ``round_index`` (round 1: the pipeline's ``reward``)."""
    return "reward" if round_index == 1 else f"reward_r{round_index}"


class RewardRounds:
    """Rounds 2, 3, ... on a pipeline root: see the module docstring."""

    def __init__(
        self,
        pipeline: Pipeline,
        policies: dict[str, str],
        repo_args: list[str] = (),
        edit_pairs: bool = False,
        on_topic_pairs: bool = False,
    ) -> None:
        self.pipeline = pipeline
        self.policies = policies
        self.repo_args = list(repo_args)
        self.edit_pairs = edit_pairs
        self.on_topic_pairs = on_topic_pairs
        self.folder = pipeline.root / "rounds" / "reward_rounds"

    def pairs_file(self, round_index: int) -> Path:
        return self.folder / f"round{round_index}" / "pairs.jsonl"

    def _policy_extra(self, config: str, round_index: int) -> list[str]:
        """A round's reward model for every policy; ``repo_args`` for RePO policies of this script's rounds."""
        extra = [f"--model.init_args.reward_model_path={self.pipeline.export(reward_name(round_index))}"]
        if config.startswith("repo") and round_index > 1:
            extra += self.repo_args
        return extra

    def collect(self, round_index: int) -> Path:
        """Sample and label the policies of round ``round_index - 1``; returns the pairs (``.jsonl``).

        The labelling flags are recorded next to the pairs (``labels.json``). A rerun relabels every round (the
        samples are reused), so a rerun with other flags would silently change the data of the rounds already
        trained and of every later reward model: it is refused, naming the file.

        Raises:
            ConfigError: the round's pairs were labelled with other flags.
        """
        pipeline, previous = self.pipeline, round_index - 1
        labels = {"edit_pairs": self.edit_pairs, "on_topic_pairs": self.on_topic_pairs}
        record = self.pairs_file(round_index).with_name("labels.json")
        if record.is_file():
            recorded = {"edit_pairs": False, "on_topic_pairs": False, **json.loads(record.read_text())}
            if recorded != labels:
                raise ConfigError(
                    f"{record}: round {round_index}'s pairs were labelled with {recorded}, this run asks for {labels};"
                    " rerun with the same --edit-pairs / --on-topic-pairs, or continue from a new --root"
                )
        world = pipeline.world()
        prompts = self.folder / "train_prompts.jsonl"
        write_rows(world.rl_prompts(), prompts)
        rows = []
        for index, (name, config) in enumerate(self.policies.items()):
            run = policy_name(name, previous)
            args = pipeline._policy_args(config, f"policy_{run}", self._policy_extra(config, previous))
            out = self.folder / f"round{round_index}" / run
            samples = pipeline.sample_policy(f"sample_r{round_index}_{run}", run, args, out, prompts)
            seed = 1000 * pipeline.seed + 100 + 10 * round_index + index
            rows += annotate_samples(
                world,
                read_samples(samples),
                seed=seed,
                edit_pairs=self.edit_pairs,
                on_topic_pairs=self.on_topic_pairs,
            )
        pairs = self.pairs_file(round_index)
        write_rows(rows, pairs)
        record.write_text(json.dumps(labels))
        return pairs

    def run_round(self, round_index: int) -> dict[str, dict[str, float]]:
        """Collect, retrain the reward model, retrain and evaluate every policy; returns their figures."""
        if round_index < 2:
            raise ValueError(f"reward rounds start at 2 (round 1 is the pipeline's), got {round_index}")
        pipeline = self.pipeline
        self.collect(round_index)
        files = [self.pairs_file(r) for r in range(2, round_index + 1)]
        name = reward_name(round_index)
        pipeline._run(f"fit_{name}", ["fit", *pipeline._score_stage_args("reward", name, "sft", files)])
        figures = {}
        for policy, config in self.policies.items():
            run = policy_name(policy, round_index)
            out = pipeline.train_policy(config, run, self._policy_extra(config, round_index))
            metrics = json.loads((out / "metrics.json").read_text())
            figures[run] = {key: metrics[key] for key in FIGURES if key in metrics}
            card = Path(pipeline.export(run)) / "repo_lightning.json"
            if card.is_file():
                multiplier = json.loads(card.read_text()).get("lagrange_multiplier")
                if multiplier is not None:
                    figures[run]["lagrange_multiplier"] = multiplier
        return figures


def parse_policies(parser: argparse.ArgumentParser, specs: list[str]) -> dict[str, str]:
    policies = {}
    for spec in specs:
        name, _, config = spec.partition(":")
        if not name or ":" in config:
            parser.error(f"--policies takes NAME or NAME:CONFIG (e.g. repo or repo_e12:repo), got {spec!r}")
        policies[name] = config or name
    return policies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="a finished pipeline's run folder")
    parser.add_argument("--config-dir", default="configs/demo")
    parser.add_argument("--seed", type=int, default=0, help="the pipeline's --seed")
    parser.add_argument("--rounds", type=int, default=1, help="rounds to add after the pipeline's (default 1)")
    parser.add_argument(
        "--policies",
        nargs="+",
        default=["ppo", "repo"],
        metavar="NAME[:CONFIG]",
        help="the pipeline's policies to continue (run name, and config when it differs; default: ppo repo)",
    )
    parser.add_argument("--cost-ensemble", type=int, default=1, help="the pipeline's --cost-ensemble")
    parser.add_argument("--reward-ensemble", type=int, default=1, help="the pipeline's (only 1: one model retrained)")
    parser.add_argument("--policy-epochs", type=int, default=None, help="the pipeline's --policy-epochs")
    parser.add_argument("--world", nargs="+", default=[], metavar="KEY=VALUE", help="the pipeline's --world")
    parser.add_argument(
        "--repo-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="a CLI argument for the RePO policies of the new rounds only (repeatable; write --repo-arg=--model...)",
    )
    parser.add_argument(
        "--edit-pairs",
        action="store_true",
        help="also pair each sampled answer with a one-word edit of itself (a repeated word varied where it has one)",
    )
    parser.add_argument(
        "--on-topic-pairs",
        action="store_true",
        help="also pair each sampled answer that says another topic's word with that word made the prompt topic's own",
    )
    args = parser.parse_args(argv)
    root = Path(args.root)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.policy_epochs is not None and args.policy_epochs < 1:
        parser.error(f"--policy-epochs must be >= 1, got {args.policy_epochs}")
    if args.cost_ensemble < 1:
        parser.error(f"--cost-ensemble must be >= 1, got {args.cost_ensemble}")
    if args.reward_ensemble != 1:
        parser.error("--reward-ensemble: only 1 is supported (each round retrains one reward model)")
    policies = parse_policies(parser, args.policies)
    for folder in ("exports/sft", *(f"logs/policy_{name}" for name in policies)):
        if not (root / folder).is_dir():
            parser.error(f"--root {root}: no {folder} (is it a finished pipeline with policies {list(policies)}?)")
    extra = {"world": [f"--data.world.{item}" for item in args.world]}
    if args.policy_epochs is not None:
        extra["policy"] = [f"--trainer.max_epochs={args.policy_epochs}"]
    pipeline = Pipeline(
        root, args.config_dir, args.seed, extra, quiet=True, resume=True, cost_ensemble=args.cost_ensemble
    )
    rounds = RewardRounds(pipeline, policies, args.repo_arg, args.edit_pairs, args.on_topic_pairs)
    record = root / "rounds" / "reward_rounds.json"
    results = json.loads(record.read_text()) if record.is_file() else {}
    for round_index in range(2, 2 + args.rounds):
        figures = rounds.run_round(round_index)
        results[str(round_index)] = figures
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(results, indent=2))
        for run, values in figures.items():
            print(run, json.dumps({k: round(v, 3) for k, v in values.items()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
