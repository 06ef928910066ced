"""Stage 3: policy optimisation under an :class:`~repo_lightning.objectives.Objective` (algorithm.md 5-8).

Each ``training_step`` is one iteration: rollout with the KV cache and scoring by the frozen models
(``rollout.py``), the advantage estimator and the objective's mix (``policy_steps.compute_advantages``),
``ppo_epochs`` passes of minibatch PPO updates (``policy_steps.ppo_update``, manual optimization), then the dual
update of the objective's constraint statistic, averaged across ranks so every rank holds the same multiplier.
docs/architecture.md draws the data flow.

Departures from the papers, all configurable: log-probabilities are those of the untempered policy (sample with
``temperature: 1.0`` to stay on-policy); the multiplier used for an iteration's advantages is the one before that
iteration's dual update (algorithm.md section 5 order); dropout is off in the trained models.
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from repo_lightning.data.records import PromptBatch
from repo_lightning.errors import ConfigError
from repo_lightning.evaluation import PromptResult, summarize
from repo_lightning.finite_guard import (
    FiniteGuard,
    OnNonFinite,
    check_finite,
    finite_on_all_ranks,
    guard_gradients,
    model_source,
)
from repo_lightning.models.export import export_from_trainer
from repo_lightning.models.sharding import as_sharding, move_offloaded_to_cpu, shard_models
from repo_lightning.modules.optimization import build_optimizer
from repo_lightning.modules.policy_config import (
    Estimation,
    Evaluation,
    Memory,
    PPOUpdate,
    Sampling,
    Scoring,
    as_group,
    check_combinations,
    plain,
)
from repo_lightning.modules.policy_evaluation import dual_plot_settings, gather_results, write_policy_report
from repo_lightning.modules.policy_models import FROZEN, PolicySources, drop_frozen_models, load_policy_models
from repo_lightning.modules.policy_steps import compute_advantages, ppo_update, prompt_results, rollout_metrics
from repo_lightning.modules.rollout import Rollout, collect_rollout
from repo_lightning.objectives import Objective, RePO
from repo_lightning.objectives.objective import describe
from repo_lightning.rl.dual import DualVariable
from repo_lightning.text.templates import SAFE_RLHF_TEMPLATE
from repo_lightning.validation import check_checkpoint_matches


class PolicyModule(L.LightningModule):
    """Actor, frozen reference / reward / cost models, optional critics, the objective and its dual variable.

    Args:
        actor_path: Start policy (the SFT export): hub name or folder. The reference model is a frozen copy.
        reward_model_path: Reward model export (``AutoModelForSequenceClassification``, one label).
        cost_model_path: Cost model export; required when the objective uses a cost.
        reward_ensemble_paths: Further reward model exports (e.g. trained from other SFT starts or seeds), scored
            beside ``reward_model_path`` as one ensemble and combined by ``scoring.reward_aggregate``; the critic
            still starts from ``reward_model_path``.
        cost_ensemble_paths: The same for cost models (``scoring.cost_aggregate`` over every head of every model).
        tokenizer_path: The policy's tokenizer (linked from ``data.tokenizer`` by the CLI).
        reward_template: Prompt template the reward model expects; used only when its tokenizer or template
            differs from the policy's (then responses are decoded and re-tokenised).
        cost_template: The same for the cost model.
        critic_init: ``score_model`` starts each critic from the reward / cost model (needs the policy's
            tokenizer); ``actor`` starts both from the actor's backbone with a fresh head.
        critics: With the ``gae`` estimator and a cost: ``separate`` (default) trains a reward critic and a cost
            critic (two models, as Safe RLHF); ``shared`` trains one backbone with two value heads (cost: the
            backbone and head of the cost model, or of the actor with ``critic_init: actor``; reward: a new head
            starting at zero), so ``repo`` / ``ppo_lag`` train and run as many networks as ``ppo`` (algorithm.md
            section 10). Without a cost the two are the same.
        objective: What is optimised: ``PPO``, ``PPOLagrangian`` (Safe RLHF) or ``RePO`` (default) from
            ``repo_lightning.objectives``, or your own subclass of ``Objective``.
        dual: The multiplier and its update rule (``DualVariable`` with a ``LogRule`` by default).
        sampling: Rollout sampling.
        estimation: Advantage estimator, KL penalty and shaping.
        update: PPO epochs, minibatches, clips, learning rates.
        evaluation: Validation / ``test`` sampling and the report folder.
        memory: dtype, attention kernel, activation checkpointing, scoring chunks, LoRA, FSDP2 layout.
        scoring: How a cost-model ensemble's heads become one cost (mean, mean + kappa * std, or max).
        optimizer: Optimizer factory; called with the actor's (and, with critics, the critics') parameter group.
        export_dir: Where the trained actor is written in Hugging Face layout at the end of ``fit``.
        trust_remote_code: Allow hub model code.
        on_nonfinite: On a NaN or infinite score, value, advantage, loss, gradient or dual statistic: ``raise``
            (stop before anything is updated, checkpointed or exported, naming the quantity and the model it came
            from) or ``skip`` the iteration / minibatch (counted, logged as ``train/nonfinite_skipped``).
        seed: Base seed of the per-iteration sampling seed (so resumed runs draw the same samples).
    """

    def __init__(
        self,
        actor_path: str | None = None,
        reward_model_path: str | None = None,
        cost_model_path: str | None = None,
        reward_ensemble_paths: list[str] | None = None,
        cost_ensemble_paths: list[str] | None = None,
        tokenizer_path: str | None = None,
        reward_template: str = SAFE_RLHF_TEMPLATE,
        cost_template: str = SAFE_RLHF_TEMPLATE,
        critic_init: Literal["score_model", "actor"] = "score_model",
        critics: Literal["separate", "shared"] = "separate",
        objective: Objective | None = None,
        dual: DualVariable | None = None,
        sampling: Sampling | None = None,
        estimation: Estimation | None = None,
        update: PPOUpdate | None = None,
        evaluation: Evaluation | None = None,
        memory: Memory | None = None,
        scoring: Scoring | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        export_dir: str | None = None,
        trust_remote_code: bool = False,
        on_nonfinite: OnNonFinite = "raise",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.objective = RePO() if objective is None else objective
        if not isinstance(self.objective, Objective):
            raise TypeError(f"model.objective must be an Objective (PPO, PPOLagrangian, RePO, ...), got {objective!r}")
        self.sampling = as_group(Sampling, sampling)
        self.estimation = as_group(Estimation, estimation)
        self.update_config = as_group(PPOUpdate, update)
        self.evaluation = as_group(Evaluation, evaluation)
        self.memory = as_group(Memory, memory)
        self.scoring = as_group(Scoring, scoring)
        check_combinations(
            self.objective, self.sampling, self.estimation, cost_model_path, cost_ensemble_paths, critics
        )
        self.save_hyperparameters(ignore=["optimizer", "objective", "dual"])
        for name, group in (
            ("sampling", self.sampling),
            ("estimation", self.estimation),
            ("update", self.update_config),
        ):
            self.hparams[name] = plain(group)
        self.hparams["evaluation"], self.hparams["memory"] = plain(self.evaluation), plain(self.memory)
        self.hparams["objective"] = describe(self.objective)  # plain, so checkpoints load with weights_only
        self.finite_guard = FiniteGuard(on_nonfinite, "the policy")
        self.automatic_optimization = False
        self.strict_loading = False  # frozen models are reloaded from their paths, not stored in checkpoints
        self.optimizer = optimizer
        self.dual = DualVariable() if dual is None else dual
        self.hparams["dual"] = describe(self.dual)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.lambda_history: list[tuple[int, float]] = []
        self.statistic_history: list[tuple[int, float]] = []  # the (windowed) dual statistic of each update
        self.actor = None
        self.last_rollout: Rollout | None = None
        self._sharded = False
        self._eval_results: list[PromptResult] = []
        self.register_state_dict_post_hook(drop_frozen_models)

    # ----------------------------------------------------------------------------------------------- models
    def configure_model(self) -> None:
        """Load the models once; under ``ModelParallelStrategy`` each is sharded as soon as it is loaded."""
        if self.actor is not None:
            return
        hp = self.hparams
        for name in ("actor_path", "reward_model_path", "tokenizer_path"):
            if hp[name] is None:
                raise ConfigError(f"model.init_args.{name} is not set")
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        sources = PolicySources(
            hp.actor_path,
            hp.reward_model_path,
            hp.cost_model_path,
            hp.tokenizer_path,
            hp.reward_template,
            hp.cost_template,
            datamodule.template if datamodule is not None else SAFE_RLHF_TEMPLATE,
            hp.critic_init,
            hp.trust_remote_code,
            tuple(hp.reward_ensemble_paths or ()),
            tuple(hp.cost_ensemble_paths or ()),
            hp.critics,
        )
        self._sharded = self.device_mesh is not None
        if self._sharded and self.sampling.resample_identical_temperature is not None:
            raise ConfigError(
                "model.init_args.sampling.resample_identical_temperature does not work with a sharded actor "
                "(ModelParallelStrategy): the extra generate would run on some ranks only; unset it"
            )

        def shard_frozen(model):
            shard_models(self.device_mesh, [], [model], sharding=self.memory.sharding)

        self.models = load_policy_models(
            sources,
            self.memory,
            self.scoring,
            with_cost=self.objective.uses_cost,
            with_critics=self.estimation.estimator == "gae",
            device_mesh=self.device_mesh,
            shard_frozen=shard_frozen,
        )
        m = self.models
        self.tokenizer, self.actor, self.ref_model = m.tokenizer, m.actor, m.ref_model
        self.reward_scorer, self.cost_scorer = m.reward_scorer, m.cost_scorer
        self.reward_model = m.reward_scorer.model
        self.cost_model = m.cost_scorer.model if m.cost_scorer is not None else None
        self.reward_critic, self.cost_critic = m.reward_critic, m.cost_critic
        # registered (so they move with the module and stay in eval mode), left out of checkpoints like the others
        self.reward_members = nn.ModuleList([scorer.model for scorer in m.reward_members])
        self.cost_members = nn.ModuleList([scorer.model for scorer in m.cost_members])
        oracle_keys = [k for k in ("reward_source", "cost_source") if getattr(self.scoring, k) == "oracle"]
        if oracle_keys and self._oracle() is None:
            raise ConfigError(
                f"model.init_args.scoring.{oracle_keys[0]}: oracle needs data with ground truth "
                "(data.dataset: safetyworld); this data module has no oracle"
            )

    def train(self, mode: bool = True) -> PolicyModule:
        """Switch train/eval mode, keeping the frozen models in eval mode always."""
        super().train(mode)
        for name in FROZEN:
            model = getattr(self, name, None)
            if model is not None:
                model.eval()
        return self

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """One optimizer: an actor group and, with critics, a critic group, each with its learning rate.

        ``update.fused_optimizer`` builds it with torch's fused kernel where it has one (``build_optimizer``).
        """
        update = self.update_config

        def groups() -> list[dict]:
            out = [{"params": list(self.actor.parameters()), "lr": update.actor_lr}]
            critics = [p for m in self.models.critics for p in m.parameters()]
            if critics:  # critic-free estimators train the actor alone
                out.append({"params": critics, "lr": update.critic_lr})
            return out

        return build_optimizer(self.optimizer, groups, fused=update.fused_optimizer)

    # ----------------------------------------------------------------------------------------------- train
    def _rollout(
        self,
        batch: PromptBatch,
        k: int,
        temperature: float,
        with_values: bool = True,
        resample_temperature: float | None = None,
    ) -> Rollout:
        return collect_rollout(
            self.models,
            batch,
            self.sampling,
            k,
            temperature,
            with_values,
            self.memory.scoring_batch_size,
            synced_gpus=self._sharded,
            scoring=self.scoring,
            oracle=self._oracle(),
            resample_temperature=resample_temperature,
        )

    def _seed_iteration(self, salt: int = 0) -> None:
        # A seed that depends only on (seed, iteration, rank) makes a resumed run draw the samples an
        # uninterrupted one would.
        torch.manual_seed(
            self.hparams.seed * 1_000_003 + int(self.iteration) * 7919 + self.global_rank * 104_729 + salt
        )

    def _finite(self, values: dict[str, tuple[torch.Tensor | None, str]]) -> bool:
        return finite_on_all_ranks(self, self.finite_guard, values)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Check the actor's and critics' gradients before they reach the weights (``on_nonfinite`` decides)."""
        guard_gradients(self, self.finite_guard, self, prefix="")

    def _optimizer_step(self, loss: torch.Tensor) -> None:
        if not self._finite({"train/loss": (loss, model_source(self, "actor"))}):
            return
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        if self.update_config.max_grad_norm is not None:
            self.clip_gradients(optimizer, self.update_config.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """One RLHF iteration: rollout, advantages, PPO epochs, dual update, logging."""
        k = self.sampling.samples_per_prompt
        self._seed_iteration()
        temperature = self.sampling.training_temperature(int(self.iteration))
        resample = self.sampling.resample_identical_temperature
        rollout = self._rollout(batch, k, temperature, resample_temperature=resample)
        self.last_rollout = rollout  # read by callbacks (TensorBoardViews' sampled-responses panel)
        scored = {
            "rewards": (rollout.rewards, "reward_model"),
            "costs": (rollout.costs, "cost_model"),
            "logprobs": (rollout.logprobs, "actor"),
            "ref_logprobs": (rollout.ref_logprobs, "ref_model"),
            "reward_values": (rollout.reward_values, "reward_critic"),
            "cost_values": (rollout.cost_values, "cost_critic"),
        }
        sources = {n: model_source(self, m) for n, (_, m) in scored.items()}
        if self.models.shared_critic:  # one critic, started from the cost model, gives both streams' values
            key = "actor_path" if self.hparams.critic_init == "actor" else "cost_model_path"
            shared = f"the shared critic (reward_critic, started from model.init_args.{key}={self.hparams[key]!r})"
            sources["reward_values"] = sources["cost_values"] = shared
        if not self._finite({n: (t, sources[n]) for n, (t, _) in scored.items()}):
            return
        multiplier = self.dual.value.to(self.device)
        targets = compute_advantages(rollout, self.objective, self.estimation, k, multiplier)
        where = "the advantage computation (model.init_args.estimation)"
        if not self._finite({"advantages": (targets.advantages, where)}):
            return
        metrics = ppo_update(self.models, rollout, targets, self.update_config, self.estimation, self._optimizer_step)
        statistic = None
        if self.objective.constrained:
            local = self.objective.statistic(rollout.costs, k)
            statistic = self.trainer.strategy.reduce(local, reduce_op="mean")
            if self._finite({"dual_statistic": (statistic, model_source(self, "cost_model"))}):
                self.dual.update(statistic.detach().float().cpu().reshape(1))
                check_finite("lagrange_multiplier", self.dual.lagrange_multiplier, "the dual update")
        self.iteration += 1
        multiplier_now = float(self.dual.value[0])
        self.lambda_history.append((int(self.iteration), multiplier_now))
        metrics = {**rollout_metrics(rollout, k, self._oracle()), **metrics}
        if self.objective.constrained:
            metrics["lambda"] = torch.tensor(multiplier_now)
            metrics["dual_statistic"] = self.dual.previous[0].clone()  # the (windowed) g that drove the update
            self.statistic_history.append((int(self.iteration), float(metrics["dual_statistic"])))
        for key, value in metrics.items():
            self.log(
                f"train/{key}",
                value.to(self.device),
                sync_dist=key not in ("lambda", "dual_statistic"),
                prog_bar=key in ("lambda", "reward_mean", "unsafe_response_rate"),
                batch_size=rollout.num_samples,
            )
        self._log_histograms(rollout)

    def _oracle(self):
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        return datamodule.oracle if datamodule is not None else None

    def _log_histograms(self, rollout: Rollout) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_histogram") or not self.trainer.is_global_zero:
            return
        step = int(self.iteration)
        experiment.add_histogram("train/reward_hist", rollout.rewards.float().cpu(), step)
        if rollout.costs is not None:
            per_prompt = rollout.costs.view(-1, self.sampling.samples_per_prompt).mean(1)
            experiment.add_histogram("train/prompt_cost_hist", per_prompt.float().cpu(), step)

    # ------------------------------------------------------------------------------------------ validation
    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """One sample per held-out prompt: mean reward, cost and unsafe rates (learned and, if known, true)."""
        self._seed_iteration(salt=1 + batch_idx)
        rollout = self._rollout(batch, 1, self.evaluation.temperature, with_values=False)
        for key, value in rollout_metrics(rollout, 1, self._oracle()).items():
            self.log(f"val/{key}", value.to(self.device), sync_dist=True, batch_size=rollout.num_samples)

    # ------------------------------------------------------------------------------------------ evaluation
    def on_test_epoch_start(self) -> None:
        """Start collecting per-prompt results."""
        self._eval_results = []

    def test_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """Sample ``evaluation.samples_per_prompt`` responses per held-out prompt and score them (algorithm.md 9)."""
        self._seed_iteration(salt=100_000 + batch_idx)
        k = self.evaluation.samples_per_prompt
        rollout = self._rollout(batch, k, self.evaluation.temperature, with_values=False)
        self._eval_results.extend(prompt_results(rollout, batch, k, self._oracle()))

    def on_test_epoch_end(self) -> None:
        """Gather results from all ranks, write the report on rank 0 and log ``test/...`` scalars."""
        results = gather_results(self._eval_results)
        summary = summarize(results, self.evaluation.unsafe_at_k)
        for key, value in summary.items():
            self.log(f"test/{key}", float(value), rank_zero_only=True)
        if self.trainer.is_global_zero:
            out_dir = self.evaluation.report_dir or f"{self.trainer.log_dir or '.'}/evaluation"
            history = self.lambda_history if self.objective.constrained else None
            ckpt = getattr(self.trainer, "ckpt_path", None)
            dual = dual_plot_settings(self.objective, self.dual, self.statistic_history)
            write_policy_report(
                results,
                out_dir,
                self.objective.name,
                self.hparams.actor_path,
                int(self.iteration),
                history,
                ckpt,
                dual,
                self.evaluation.unsafe_at_k,
            )
        self.evaluation_summary = summary

    # ---------------------------------------------------------------------------------------- checkpoints
    def on_fit_start(self) -> None:
        """Return CPU-offloaded frozen shards to CPU memory (the strategy moved the whole module to the GPU)."""
        if self._sharded and as_sharding(self.memory.sharding).offload_frozen:
            move_offloaded_to_cpu([m for m in (getattr(self, n, None) for n in FROZEN) if m is not None])

    def on_test_start(self) -> None:
        """As :meth:`on_fit_start`."""
        self.on_fit_start()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Save the multiplier and dual-statistic histories (frozen models are left out of ``state_dict`` itself)."""
        checkpoint["lambda_history"] = [list(item) for item in self.lambda_history]
        checkpoint["dual_statistic_history"] = [list(item) for item in self.statistic_history]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Check the weights match, restore the multiplier and dual-statistic histories (older checkpoints: empty)."""
        check_checkpoint_matches(self, checkpoint)
        self.lambda_history = [(int(s), float(v)) for s, v in checkpoint.get("lambda_history", [])]
        self.statistic_history = [(int(s), float(v)) for s, v in checkpoint.get("dual_statistic_history", [])]

    def on_fit_end(self) -> None:
        """Write the trained actor and tokenizer in Hugging Face layout."""
        if self.hparams.export_dir:
            metadata = {"stage": "policy", "algorithm": self.objective.name, "objective": self.hparams.objective}
            if self.objective.constrained:
                metadata["lagrange_multiplier"] = float(self.dual.value[0])
            export_from_trainer(self.trainer, self.actor, self.tokenizer, self.hparams.export_dir, metadata)
