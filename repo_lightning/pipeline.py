"""The whole pipeline on one command: SFT -> reward -> cost -> policy -> evaluation (``make demo``).

Each stage is an ordinary ``python -m repo_lightning`` run of a shipped config (so every stage can also be run by
hand), with the run folder, export folders and seed overridden on the command line. At the end the evaluation of the
SFT start and of each trained policy are printed side by side and written to ``<root>/summary.md``.

The terminal shows one line per stage (a progress bar on a terminal, then the wall time); each stage's full output
is in ``<root>/logs/<stage>.log``, named with its last lines if the stage fails. ``--verbose`` shows everything as
it comes. Held-out figures are added to the exports' model cards (``README.md``) as each evaluation finishes.

Example::

    python -m repo_lightning.pipeline --root lightning_logs/demo
    python -m repo_lightning.pipeline --root runs/seed1 --seed 1 --algorithms ppo_lag repo
    python -m repo_lightning.pipeline --root runs/two_rounds --preference-rounds 2
    python -m repo_lightning.pipeline --root runs/world1 --world seed=1 num_topics=30 mild_frac=0.35
    python -m repo_lightning.pipeline --root runs/warm --warm-start 32 --reward-ensemble 3 --cost-ensemble 3
    python -m repo_lightning.pipeline --root runs/short --stage-arg reward=--trainer.max_epochs=2

Preference rounds (``--preference-rounds``, default 1: none). With 2 or more, after the first reward and cost
models each requested policy is trained once as a *collector* and sampled on the training prompts; its answers are
paired (with each other and with answers of the preference mixture) and labelled by SafetyWorld's simulated
annotator (:mod:`repo_lightning.safetyworld.annotate`). The reward and cost models are then trained again from the
SFT export on the generated pairs plus the new ones, and the final policies are trained from the SFT export with
those models (docs/safetyworld.md, "Preference rounds on the policy's samples").

Warm start (``--warm-start N``, default 0: none). After the reward and cost models, the SFT policy is sampled ``N``
times on every RL prompt by a policy ``test`` run (the policy stage's own rollout and scoring, with the final reward
and cost models and ensembles), the safe answer with the largest ``R + beta log pi_ref`` is kept per prompt
(:mod:`repo_lightning.warm_start`), and the SFT export is fine-tuned on the kept answers (export ``sft_warm``,
evaluated beside ``sft``). Every policy then starts from ``sft_warm``, which is also its reference
(docs/algorithm.md, "Warm start").

Stage arguments (``--stage-arg STAGE=--key=value``, repeatable). One more argument for every run of a stage (``sft``,
``reward``, ``cost`` or ``policy``), after the stage's config so that it overrides the config's value: a stage can be
changed without a copy of the config folder. ``--data.world.KEY=VALUE`` given this way changes that stage's data only.
The summary names them.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from repo_lightning.console import stage_line
from repo_lightning.models.model_card import CARD_FILE, update_model_card
from repo_lightning.pipeline_results import evaluation_figures, read_score_model_tests, write_summary
from repo_lightning.pipeline_stages import latest_checkpoint, run_cli, stage_record
from repo_lightning.safetyworld import World
from repo_lightning.safetyworld.annotate import annotate_samples, read_samples, write_rows
from repo_lightning.safetyworld.config import WorldConfig, world_from_overrides
from repo_lightning.warm_start import policy_kl_coef, select_rows

#: Answers sampled per training prompt from a collector policy for the next preference round.
COLLECT_SAMPLES_PER_PROMPT = 8

#: Policy-stage arguments of ``--oracle-scores``: rewards and costs from the oracles (docs/algorithm.md 13).
ORACLE_SCORE_ARGS = [
    "--model.init_args.scoring.reward_source=oracle",
    "--model.init_args.scoring.cost_source=oracle",
]

#: The warm start's fine-tune of the SFT export on the kept answers (SFT stage arguments; docs/results.md round 23).
WARM_START_SFT_ARGS = [
    "--model.init_args.optimizer.init_args.lr=0.0005",
    "--trainer.max_epochs=3",
    "--model.init_args.warmup_steps=5",
]

#: The policy config whose settings (scoring, evaluation, ``estimation.kl_coef``) the warm start samples with.
WARM_START_CONFIG = "repo"

#: Prefixes of the ``extra["world"]`` arguments that set ``WorldConfig`` fields (``--data.world.seed=7``).
_WORLD_ARG_PREFIXES = ("--data.world.", "--data.init_args.world.")


class Pipeline:
    """The stages of one pipeline run, with every output under ``root``.

    Args:
        root: Run folder (logs, exports, evaluations, summary).
        config_dir: Folder holding ``sft.yaml``, ``reward.yaml``, ``cost.yaml`` and one YAML per algorithm.
        seed: Seed of every stage (``seed_everything`` and the policy's sampling seed).
        extra: Extra CLI arguments per stage name (``sft``, ``reward``, ``cost``, ``policy``, ``world``); the
            ``world`` ones are ``--data.world.KEY=VALUE`` (the preference rounds read the world from them).
        quiet: Send each stage's output to ``<root>/logs/<stage>.log`` and show one line per stage instead.
        planned_stages: Number of stages this run will make, shown as ``[i/n]`` on each stage line (0: unknown).
        reward_ensemble: Reward models the final policies score with: 1 (the default), or the ``reward`` export
            plus ``reward_ensemble - 1`` members, each trained like it from its own SFT start (another seed),
            combined as ``mean - std`` of the aligned scores (``scoring.reward_aggregate: mean_minus_std``).
        cost_ensemble: Cost models the final policies score with: 1 (the default), or the ``cost`` export plus
            ``cost_ensemble - 1`` members, each trained like it from its own SFT start (the same starts as the
            reward members'), combined as the worst case, the largest cost (``scoring.cost_aggregate: max``).
        resume: Skip the stages an earlier run in ``root`` finished with the same arguments and configs, up to the
            first one it did not (see :meth:`_run`); that one and every later one run again.
        warm_start: Answers sampled per RL prompt for the best-of-n warm start (:meth:`warm_start`); 0: none.
        stage_args: The user's extra CLI arguments per stage (``--stage-arg``,
            :func:`.pipeline_stages.parse_stage_args`), added after ``extra``'s (so they win) and named in the summary.
    """

    def __init__(
        self,
        root: str | Path,
        config_dir: str | Path = "configs/demo",
        seed: int = 0,
        extra: dict[str, list[str]] | None = None,
        quiet: bool = False,
        planned_stages: int = 0,
        reward_ensemble: int = 1,
        resume: bool = False,
        cost_ensemble: int = 1,
        warm_start: int = 0,
        stage_args: dict[str, list[str]] | None = None,
    ) -> None:
        if warm_start < 0:
            raise ValueError(f"warm_start must be >= 0 (answers per prompt; 0: none), got {warm_start}")
        if reward_ensemble < 1:
            raise ValueError(f"reward_ensemble must be >= 1, got {reward_ensemble}")
        if cost_ensemble < 1:
            raise ValueError(f"cost_ensemble must be >= 1, got {cost_ensemble}")
        self.reward_ensemble = reward_ensemble
        self.cost_ensemble = cost_ensemble
        self.root = Path(root)
        self.config_dir = Path(config_dir)
        self.seed = seed
        self.stage_args = stage_args or {}
        self.extra = {k: list(v) for k, v in (extra or {}).items()}
        for stage, args in self.stage_args.items():
            self.extra[stage] = [*self.extra.get(stage, []), *args]
        self.quiet = quiet
        self.planned_stages = planned_stages
        self.timings: dict[str, float] = {}
        self.resume = resume
        self.skipped: list[str] = []
        self._stage_number = 0
        self._ran_a_stage = False
        self.warm_start_samples = warm_start
        #: The export every policy starts from (and is regularised towards): ``sft``, or ``sft_warm`` once
        #: :meth:`warm_start` has run.
        self.policy_start = "sft"
        self.warm_start_summary: dict | None = None

    def export(self, name: str) -> str:
        """Export folder of a stage."""
        return str(self.root / "exports" / name)

    def _common(self, stage: str, run_name: str) -> list[str]:
        return [
            f"--seed_everything={self.seed}",
            f"--trainer.logger.init_args.save_dir={self.root / 'logs'}",
            f"--trainer.logger.init_args.name={run_name}",
            *self.extra.get("world", []),
            *self.extra.get(stage, []),
        ]

    def _run(self, name: str, args: list[str]) -> None:
        """Run one stage; with ``resume``, skip it if an earlier run finished it with the same command and configs.

        A stage that finishes writes ``logs/<name>.done`` (its arguments and a digest of the config files they
        name). With ``resume`` the stages before the first one that has no such record, or a different one, are
        skipped; that stage and every later one run (a later stage may read what an earlier one wrote).
        """
        log_file = self.root / "logs" / f"{name}.log" if self.quiet else None
        self._stage_number += 1
        number = self._stage_number
        label = f"[{number}/{self.planned_stages}] {name}" if self.planned_stages else f"[{number}] {name}"
        record_file = self.root / "logs" / f"{name}.done"
        record = stage_record(args)
        if self.resume and not self._ran_a_stage and record_file.is_file() and record_file.read_text() == record:
            print(stage_line(label, 0.0, outcome="skipped") + " (done by an earlier run)", flush=True)
            self.skipped.append(name)
            return
        self._ran_a_stage = True
        record_file.unlink(missing_ok=True)
        self.timings[name] = run_cli(args, log_file, label)
        record_file.parent.mkdir(parents=True, exist_ok=True)
        record_file.write_text(record)

    def world(self) -> World:
        """The SafetyWorld of this run, from the ``--data.world.KEY=VALUE`` arguments of ``extra["world"]``.

        Other arguments there (e.g. ``--data.cache_dir=...``, which every stage also gets) do not change the world.
        """
        items = []
        for arg in self.extra.get("world", []):
            prefix = next((p for p in _WORLD_ARG_PREFIXES if arg.startswith(p)), None)
            if prefix is not None:
                items.append(arg[len(prefix) :])
        return World(world_from_overrides(items))

    def train_sft(self) -> None:
        """The SFT stage (export ``sft``)."""
        config = str(self.config_dir / "sft.yaml")
        args = ["--config", config, *self._common("sft", "sft"), f"--model.init_args.export_dir={self.export('sft')}"]
        self._run("fit_sft", ["fit", *args])

    def train_score_models(self, test: bool = True, tag: str = "", extra_train_files: list[Path] = ()) -> None:
        """Reward and cost stages from the SFT export (exports ``<tag>reward`` and ``<tag>cost``).

        Args:
            test: Test each model on the held-out pairs afterwards (figures go to its model card).
            tag: Prefix of the run, export and stage names (``round1_`` for a collection round).
            extra_train_files: Preference files added to the training pairs (``data.extra_train_files``).
        """
        for stage in ("reward", "cost"):
            name = f"{tag}{stage}"
            self._run(f"fit_{name}", ["fit", *self._score_stage_args(stage, name, "sft", extra_train_files)])
            if test:
                config = str(self.config_dir / f"{stage}.yaml")
                args = ["--config", config, *self._common(stage, f"{name}_test")]
                args.append(f"--model.init_args.model_name_or_path={self.export(name)}")
                self._run(f"test_{name}", ["test", *args])
                self._card_evaluation(name, self.score_model_tests(tag).get(stage, {}))

    def collect_preferences(self, round_index: int, algorithms: list[str]) -> Path:
        """One preference round on the policies' own samples; returns the labelled pairs (``.jsonl``).

        Each algorithm is trained from the SFT export with the models of this round (exports
        ``round<i>_reward``/``round<i>_cost``), sampled :data:`COLLECT_SAMPLES_PER_PROMPT` times on every training
        prompt (never the held-out ones), and the answers are paired and labelled by the world's simulated annotator
        (:func:`repo_lightning.safetyworld.annotate.annotate_samples`).
        """
        tag = f"round{round_index}_"
        world = self.world()
        folder = self.root / "rounds" / f"round{round_index}"
        prompts = self.root / "rounds" / "train_prompts.jsonl"
        write_rows(world.rl_prompts(), prompts)
        rows = []
        for index, algorithm in enumerate(algorithms):
            name = f"{tag}{algorithm}"
            self.fit_policy(algorithm, name, models=tag)
            args = self._policy_args(algorithm, f"policy_{name}", models=tag)
            samples = self.sample_policy(f"sample_{name}", name, args, folder / algorithm, prompts)
            seed = 1000 * self.seed + 10 * round_index + index
            rows += annotate_samples(world, read_samples(samples), seed=seed)
        pairs = folder / "pairs.jsonl"
        write_rows(rows, pairs)
        return pairs

    def sample_policy(self, stage: str, name: str, args: list[str], out: Path, prompts: Path) -> Path:
        """Sample the newest checkpoint of policy run ``name`` on ``prompts``; returns its ``per_prompt.jsonl``.

        :data:`COLLECT_SAMPLES_PER_PROMPT` answers a prompt, through a ``test`` run (stage ``stage``) with ``args``,
        the policy's own arguments (:meth:`_policy_args`), writing the report to ``out``.
        """
        checkpoint = latest_checkpoint(self.root / "logs" / f"policy_{name}")
        self._run(
            stage,
            [
                "test",
                *args,
                f"--ckpt_path={checkpoint}",
                f"--model.init_args.evaluation.report_dir={out}",
                f"--model.init_args.evaluation.samples_per_prompt={COLLECT_SAMPLES_PER_PROMPT}",
                f"--data.test_dataset={prompts}",
            ],
        )
        return out / "per_prompt.jsonl"

    def train_rounds(self, algorithms: list[str], rounds: int, test: bool = True) -> list[Path]:
        """SFT, then ``rounds`` rounds of reward and cost training (the last one's: exports ``reward``, ``cost``).

        Each round after the first trains on the generated pairs plus those collected from every earlier round's
        policies (:meth:`collect_preferences`).

        Returns:
            The collected preference files (none for ``rounds == 1``).
        """
        if rounds < 1:
            raise ValueError(f"preference rounds must be >= 1, got {rounds}")
        self.train_sft()
        files: list[Path] = []
        for round_index in range(1, rounds):
            self.train_score_models(test=False, tag=f"round{round_index}_", extra_train_files=files)
            files.append(self.collect_preferences(round_index, algorithms))
        self.train_score_models(test=test, extra_train_files=files)
        self.train_members(files)
        return files

    def member_seed(self, member: int) -> int:
        """Seed of ensemble member ``member >= 1`` (its SFT start and its reward and cost models)."""
        return self.seed + 1000 * member

    def reward_member_exports(self) -> list[str]:
        """Export folders of the reward-ensemble members (``reward_m1``, ...; none without an ensemble)."""
        return [self.export(f"reward_m{i}") for i in range(1, self.reward_ensemble)]

    def cost_member_exports(self) -> list[str]:
        """Export folders of the cost-ensemble members (``cost_m1``, ...; none without an ensemble)."""
        return [self.export(f"cost_m{i}") for i in range(1, self.cost_ensemble)]

    def train_members(self, extra_train_files: list[Path] = ()) -> None:
        """The ensemble members: each an SFT start from its own seed, and a reward and/or cost model trained on it.

        Member ``i`` (exports ``sft_m<i>``, ``reward_m<i>`` for ``i < reward_ensemble``, ``cost_m<i>`` for
        ``i < cost_ensemble``) trains on the final round's data. Members from one SFT start agree on the answers a
        policy learns to exploit; members from different starts disagree (docs/results.md rounds 5 and 10).
        """
        for member in range(1, max(self.reward_ensemble, self.cost_ensemble)):
            seed = f"--seed_everything={self.member_seed(member)}"
            sft = f"sft_m{member}"
            config = str(self.config_dir / "sft.yaml")
            args = [
                "--config",
                config,
                *self._common("sft", sft),
                seed,
                f"--model.init_args.export_dir={self.export(sft)}",
            ]
            self._run(f"fit_{sft}", ["fit", *args])
            for stage, size in (("reward", self.reward_ensemble), ("cost", self.cost_ensemble)):
                if member < size:
                    name = f"{stage}_m{member}"
                    stage_args = self._score_stage_args(stage, name, sft, extra_train_files, [seed])
                    self._run(f"fit_{name}", ["fit", *stage_args])

    def _score_stage_args(
        self, stage: str, name: str, start: str, extra_train_files: list[Path] = (), extra: list[str] = ()
    ) -> list[str]:
        """Arguments of a reward or cost ``fit``: export ``name``, started from export ``start``."""
        args = [
            "--config",
            str(self.config_dir / f"{stage}.yaml"),
            *self._common(stage, name),
            *extra,
            f"--model.init_args.export_dir={self.export(name)}",
            f"--model.init_args.model_name_or_path={self.export(start)}",
        ]
        if extra_train_files:
            args.append(f"--data.extra_train_files={json.dumps([str(f) for f in extra_train_files])}")
        return args

    def _card_evaluation(self, name: str, figures: dict[str, float]) -> None:
        """Add held-out figures to the model card of export ``name`` (if it has a card and there are figures)."""
        if figures and (Path(self.export(name)) / CARD_FILE).exists():
            update_model_card(self.export(name), evaluation=figures)

    def _policy_args(
        self, algorithm: str, run_name: str, extra: list[str] | None = None, models: str = "", start: str = ""
    ) -> list[str]:
        return [
            "--config",
            str(self.config_dir / f"{algorithm}.yaml"),
            *self._common("policy", run_name),
            f"--model.init_args.actor_path={self.export(start or self.policy_start)}",
            f"--model.init_args.reward_model_path={self.export(models + 'reward')}",
            f"--model.init_args.cost_model_path={self.export(models + 'cost')}",
            f"--model.init_args.seed={self.seed}",
            *(self._ensemble_args() if not models else []),
            *(extra or []),
        ]

    def _ensemble_args(self) -> list[str]:
        args = []
        if members := self.reward_member_exports():
            args += [
                f"--model.init_args.reward_ensemble_paths={json.dumps(members)}",
                "--model.init_args.scoring.reward_aggregate=mean_minus_std",
            ]
        if members := self.cost_member_exports():
            args += [
                f"--model.init_args.cost_ensemble_paths={json.dumps(members)}",
                "--model.init_args.scoring.cost_aggregate=max",
            ]
        return args

    def evaluate_start(self, start: str = "sft") -> Path:
        """Evaluate a start policy itself (export ``sft`` or ``sft_warm``) with the RePO config's evaluation."""
        out = self.root / "eval" / start
        args = self._policy_args("repo", f"eval_{start}", start=start)
        self._run(f"eval_{start}", ["test", *args, f"--model.init_args.evaluation.report_dir={out}"])
        self._card_evaluation(start, evaluation_figures(out))
        return out

    def warm_start_beta(self) -> float:
        """``beta`` of the warm start's ranking (:func:`repo_lightning.warm_start.policy_kl_coef`)."""
        return policy_kl_coef(self.config_dir / f"{WARM_START_CONFIG}.yaml", self.extra.get("policy", []))

    def warm_start(self) -> dict:
        """The best-of-n warm start (:mod:`repo_lightning.warm_start`); afterwards every policy starts from it.

        Stages ``sample_warm_start`` (a policy ``test`` run of the SFT export on the RL prompts, ``warm_start``
        answers a prompt, with the final reward and cost models) and ``fit_sft_warm`` (the SFT export fine-tuned
        on the kept answers, :data:`WARM_START_SFT_ARGS`; export ``sft_warm``). The rows and the selection's
        summary are written to ``<root>/warm_start/``.

        Returns:
            The selection's summary (:func:`repo_lightning.warm_start.best_of_n`).
        """
        folder = self.root / "warm_start"
        prompts = folder / "train_prompts.jsonl"
        write_rows(self.world().rl_prompts(), prompts)
        samples = folder / "samples"
        args = self._policy_args(WARM_START_CONFIG, "warm_start_samples", start="sft")
        self._run(
            "sample_warm_start",
            [
                "test",
                *args,
                f"--model.init_args.evaluation.report_dir={samples}",
                f"--model.init_args.evaluation.samples_per_prompt={self.warm_start_samples}",
                f"--data.test_dataset={prompts}",
            ],
        )
        rows = folder / "best_of_n.jsonl"
        summary = select_rows(samples / "per_prompt.jsonl", rows, self.warm_start_beta())
        (folder / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        args = [
            "--config",
            str(self.config_dir / "sft.yaml"),
            *self._common("sft", "sft_warm"),
            "--model.init_args.model_config=null",
            f"--model.init_args.model_name_or_path={self.export('sft')}",
            f"--data.dataset={rows}",
            f"--data.tokenizer={self.export('sft')}",
            *WARM_START_SFT_ARGS,
            f"--model.init_args.export_dir={self.export('sft_warm')}",
        ]
        self._run("fit_sft_warm", ["fit", *args])
        self.policy_start = "sft_warm"
        self.warm_start_summary = summary
        return summary

    def fit_policy(
        self, algorithm: str, name: str | None = None, extra: list[str] | None = None, models: str = ""
    ) -> Path:
        """Train one policy from the SFT export; returns its run folder ``<root>/logs/policy_<name>``.

        Args:
            algorithm: Config to start from, ``<config_dir>/<algorithm>.yaml``.
            name: Name of the run, its export and its evaluation (default: ``algorithm``), so that several
                variants of one algorithm can live side by side under one root.
            extra: CLI arguments for this run only, after the stage's ``extra["policy"]``.
            models: Tag of the reward and cost exports to train with (``round1_``: a collection round's).
        """
        name = name or algorithm
        run_name = f"policy_{name}"
        args = self._policy_args(algorithm, run_name, extra, models)
        self._run(f"fit_{name}", ["fit", *args, f"--model.init_args.export_dir={self.export(name)}"])
        return self.root / "logs" / run_name

    def evaluate_policy(
        self, algorithm: str, name: str | None = None, extra: list[str] | None = None, models: str = ""
    ) -> Path:
        """Evaluate the last checkpoint of :meth:`fit_policy` (same arguments) on the held-out prompts."""
        name = name or algorithm
        run_name = f"policy_{name}"
        checkpoint = latest_checkpoint(self.root / "logs" / run_name)
        out = self.root / "eval" / name
        args = self._policy_args(algorithm, run_name, extra, models)
        report = f"--model.init_args.evaluation.report_dir={out}"
        self._run(f"eval_{name}", ["test", *args, f"--ckpt_path={checkpoint}", report])
        self._card_evaluation(name, evaluation_figures(out))
        return out

    def train_policy(
        self, algorithm: str, name: str | None = None, extra: list[str] | None = None, models: str = ""
    ) -> Path:
        """Train one policy and evaluate its last checkpoint on the held-out prompts (see :meth:`fit_policy`)."""
        self.fit_policy(algorithm, name, extra, models)
        return self.evaluate_policy(algorithm, name, extra, models)

    def score_model_tests(self, tag: str = "") -> dict[str, dict[str, float]]:
        """The held-out ``test/...`` figures of the reward and cost models (``read_score_model_tests``).

        Args:
            tag: Prefix of the runs (``round1_``: a collection round's models).
        """
        return read_score_model_tests(self.root / "logs", tag)

    def summary(self, evaluations: dict[str, Path]) -> str:
        """Side-by-side table of the evaluations, written with the wall times (:func:`.pipeline_results.write_summary`).

        Returns:
            ``summary.md`` without its wall-time section (the stage lines already showed the times).
        """
        default = asdict(WorldConfig())
        changed = {k: v for k, v in asdict(self.world().config).items() if v != default[k]}
        ensembles = {"reward": self.reward_ensemble, "cost": self.cost_ensemble}
        scorers = self.score_model_tests()
        return write_summary(
            self.root,
            evaluations,
            self.timings,
            scorers,
            changed,
            ensembles,
            self.warm_start_summary,
            self.stage_args,
        )


if __name__ == "__main__":
    from repo_lightning.pipeline_cli import main

    main()
