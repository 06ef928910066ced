"""Stage 3: policy optimisation with ``ppo``, ``ppo_lag`` (Safe RLHF) or ``repo`` (RePO), algorithm.md 5-8.

Each ``training_step`` is one iteration: rollout with the KV cache, scoring by the frozen reward and cost models,
KL shaping, GAE on the reward and cost streams, the advantage mix of the chosen algorithm, ``ppo_epochs`` passes of
minibatch PPO updates of the actor and both critics (manual optimization, one optimizer with an actor and a critic
parameter group), then the dual update, whose statistic is averaged across ranks so every rank holds the same
multiplier.

Departures from the papers, all configurable: log-probabilities are those of the untempered policy (sample with
``temperature: 1.0`` to stay on-policy); the multiplier used for an iteration's advantages is the one before that
iteration's dual update (algorithm.md section 5 order).
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable

from repo_lightning.data.records import PromptBatch
from repo_lightning.data.templates import SAFE_RLHF_TEMPLATE
from repo_lightning.evaluation import PromptResult, summarize
from repo_lightning.models.backbone import (
    DType,
    disable_dropout,
    freeze,
    load_causal_lm,
    load_score_model,
    load_tokenizer,
)
from repo_lightning.models.export import export_from_trainer
from repo_lightning.models.lora import LoRA
from repo_lightning.models.scorer import Scorer, same_tokenizer
from repo_lightning.models.sharding import (
    Sharding,
    as_sharding,
    move_offloaded_to_cpu,
    shard_models,
)
from repo_lightning.modules.model_setup import prepare_trained_model
from repo_lightning.modules.policy_evaluation import gather_results, write_policy_report
from repo_lightning.modules.policy_steps import (
    Advantages,
    compute_advantages,
    dual_statistic,
    iteration_metrics,
    ppo_update,
    prompt_results,
)
from repo_lightning.modules.rollout import Rollout, collect_rollout
from repo_lightning.rl.dual import DualVariable

Algorithm = Literal["ppo", "ppo_lag", "repo"]
FROZEN = ("ref_model", "reward_model", "cost_model")


class PolicyModule(L.LightningModule):
    """Actor, frozen reference / reward / cost models, reward and cost critics, and the dual variable.

    Args:
        actor_path: Start policy (the SFT export): hub name or folder. The reference model is a frozen copy.
        reward_model_path: Reward model export (``AutoModelForSequenceClassification``, one label).
        cost_model_path: Cost model export; required for ``ppo_lag`` and ``repo``, optional for ``ppo``.
        tokenizer_path: The policy's tokenizer (linked from ``data.tokenizer`` by the CLI).
        reward_template: Prompt template the reward model expects; used only when its tokenizer or template
            differs from the policy's (then responses are decoded and re-tokenised).
        cost_template: The same for the cost model.
        critic_init: ``score_model`` starts each critic from the reward / cost model (needs the policy's
            tokenizer); ``actor`` starts both from the actor's backbone with a fresh head.
        algorithm: ``ppo`` (no constraint), ``ppo_lag`` (expected cost <= threshold) or ``repo``
            (every response safe, rectified penalty).
        rectify: RePO's unsafe test per ``sample`` (C > 0) or per ``prompt`` (mean of its k samples > 0).
        normalize_advantage_mix: Keep the ``1 / (1 + lam)`` factor of the mixed advantage.
        advantage_estimator: ``gae`` (reward and cost critics, GAE), or critic-free group baselines over the ``k``
            samples of each prompt: ``rloo`` (leave-one-out mean) or ``grpo`` (group mean and std). The critic-free
            estimators load, train and checkpoint no critic.
        kl_coef: ``beta``, the KL penalty's weight.
        kl_placement: ``reward``: ``-beta * kl`` is part of the reward (per token with ``gae``, summed over the
            response with the group estimators); ``loss``: a ``beta``-weighted k3 KL loss term on the actor (GRPO's).
        missing_eos_penalty: Added to the reward of a response cut at ``max_new_tokens`` without eos (a guard
            against the policy padding answers to exploit the reward model); ``None`` disables.
        cost_kl_coef: ``beta_c`` on the cost stream; ``None`` gives every sample of every algorithm the same KL
            weight ``beta``: ``beta`` with ``normalize_advantage_mix`` (Safe RLHF's choice), else 0.
        score_clip: Clip reward and cost scores to ``+-score_clip`` before shaping; ``None`` disables.
        clip_ratio: PPO ratio clip ``eps``.
        value_clip: Critic value clip ``eps_v``; ``None`` disables.
        value_loss_coef: Weight of the critics' value losses in the joint loss.
        gamma: GAE discount.
        gae_lambda: GAE lambda.
        whiten_advantages: Whiten the combined advantages over the batch.
        samples_per_prompt: ``k`` responses sampled per prompt.
        max_new_tokens: Response length cap.
        temperature: Sampling temperature of rollouts.
        top_p: Nucleus sampling mass.
        top_k: Top-k cutoff (0 disables).
        ppo_epochs: Passes over each rollout batch.
        minibatch_size: Samples per PPO minibatch.
        actor_lr: Learning rate of the actor parameter group.
        critic_lr: Learning rate of the critic parameter group.
        optimizer: Optimizer factory; called with the two parameter groups.
        max_grad_norm: Gradient-norm clip over all trained parameters; ``None`` disables.
        dual_rule: ``log`` (Safe RLHF), ``additive`` (projected ascent) or ``pid`` (Stooke et al. 2020).
        lagrange_init: Initial multiplier.
        lagrange_lr: Multiplier step size (log and additive rules).
        lagrange_max: Upper bound of the multiplier.
        threshold: Safe RLHF's cost threshold ``d``.
        repo_constraint: RePO's dual statistic: ``unsafe_rate`` (share of unsafe samples minus
            ``target_unsafe_rate``; scale-free, so the multiplier settles where the target is met) or
            ``rectified_cost`` (the paper's ``E[{C}^+] - tolerance``, on the cost model's scale).
        target_unsafe_rate: Unsafe share that RePO's ``unsafe_rate`` constraint tolerates.
        tolerance: RePO's tolerance on ``E[{C}^+]`` (``repo_constraint: rectified_cost``).
        dual_update_delay: Iterations that hold the multiplier at its initial value.
        dual_window: The rule sees the mean statistic of this many recent iterations.
        pid_kp: PID proportional gain.
        pid_ki: PID integral gain.
        pid_kd: PID derivative gain.
        eval_samples_per_prompt: ``k`` of the ``test`` evaluation.
        eval_temperature: Sampling temperature of validation and evaluation.
        scoring_batch_size: Rows per forward pass of the frozen models (``None``: whole batch).
        report_dir: Where ``test`` writes its report; ``None`` uses ``<log_dir>/evaluation``.
        export_dir: Where the trained actor is written in Hugging Face layout at the end of ``fit``.
        dtype: Parameter dtype of all models.
        trust_remote_code: Allow hub model code.
        attn_implementation: Attention kernel; ``None`` keeps the default.
        gradient_checkpointing: Recompute activations of the actor and critics in the backward pass.
        lora: Train LoRA adapters of the actor and critics (and the critics' score heads) instead of every weight;
            ``None`` trains all (needs peft). The export merges the adapters into the actor's weights.
        sharding: FSDP2 layout under ``ModelParallelStrategy``: the actor and critics are sharded per transformer
            block, the frozen models sharded (optionally offloaded to CPU) or replicated; ignored elsewhere.
        seed: Base seed of the per-iteration sampling seed (so resumed runs draw the same samples).
    """

    def __init__(
        self,
        actor_path: str | None = None,
        reward_model_path: str | None = None,
        cost_model_path: str | None = None,
        tokenizer_path: str | None = None,
        reward_template: str = SAFE_RLHF_TEMPLATE,
        cost_template: str = SAFE_RLHF_TEMPLATE,
        critic_init: Literal["score_model", "actor"] = "score_model",
        algorithm: Algorithm = "repo",
        rectify: Literal["sample", "prompt"] = "sample",
        normalize_advantage_mix: bool = True,
        advantage_estimator: Literal["gae", "rloo", "grpo"] = "gae",
        kl_coef: float = 0.02,
        kl_placement: Literal["reward", "loss"] = "reward",
        missing_eos_penalty: float | None = None,
        cost_kl_coef: float | None = None,
        score_clip: float | None = 50.0,
        clip_ratio: float = 0.2,
        value_clip: float | None = 5.0,
        value_loss_coef: float = 1.0,
        gamma: float = 1.0,
        gae_lambda: float = 0.95,
        whiten_advantages: bool = False,
        samples_per_prompt: int = 4,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        ppo_epochs: int = 1,
        minibatch_size: int = 64,
        actor_lr: float = 1e-5,
        critic_lr: float = 5e-6,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        max_grad_norm: float | None = 1.0,
        dual_rule: Literal["log", "additive", "pid"] = "log",
        lagrange_init: float = 1.0,
        lagrange_lr: float = 0.1,
        lagrange_max: float = 100.0,
        threshold: float = 0.0,
        repo_constraint: Literal["unsafe_rate", "rectified_cost"] = "unsafe_rate",
        target_unsafe_rate: float = 0.02,
        tolerance: float = 0.0,
        dual_update_delay: int = 0,
        dual_window: int = 1,
        pid_kp: float = 0.0,
        pid_ki: float = 1.0,
        pid_kd: float = 0.0,
        eval_samples_per_prompt: int = 4,
        eval_temperature: float = 1.0,
        scoring_batch_size: int | None = None,
        report_dir: str | None = None,
        export_dir: str | None = None,
        dtype: DType = "float32",
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        lora: LoRA | None = None,
        sharding: Sharding | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if algorithm in ("ppo_lag", "repo") and cost_model_path is None:
            raise ValueError(f"model.cost_model_path is required for algorithm {algorithm!r}")
        for name, value in (
            ("samples_per_prompt", samples_per_prompt),
            ("ppo_epochs", ppo_epochs),
            ("minibatch_size", minibatch_size),
            ("max_new_tokens", max_new_tokens),
        ):
            if value < 1:
                raise ValueError(f"model.{name} must be >= 1, got {value}")
        if rectify == "prompt" and samples_per_prompt < 2:
            raise ValueError("model.rectify: prompt averages the k samples of a prompt; set samples_per_prompt >= 2")
        if advantage_estimator != "gae" and samples_per_prompt < 2:
            raise ValueError(
                f"model.advantage_estimator: {advantage_estimator} compares the k samples of a prompt; "
                "set model.samples_per_prompt >= 2"
            )
        if not 0.0 <= target_unsafe_rate < 1.0:
            raise ValueError(f"model.target_unsafe_rate must be in [0, 1), got {target_unsafe_rate}")
        self.save_hyperparameters(ignore=["optimizer"])
        self.automatic_optimization = False
        self.strict_loading = False  # frozen models are reloaded from their paths, not stored in checkpoints
        self.optimizer = optimizer
        self.dual = DualVariable(
            1,
            dual_rule,
            lagrange_init,
            lagrange_lr,
            lagrange_max,
            dual_update_delay,
            dual_window,
            pid_kp,
            pid_ki,
            pid_kd,
        )
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.lambda_history: list[tuple[int, float]] = []
        self.actor = None
        self._sharded = False
        self._eval_results: list[PromptResult] = []
        self.register_state_dict_post_hook(_drop_frozen_models)

    # ----------------------------------------------------------------------------------------------- models
    def configure_model(self) -> None:
        """Load the six models (once); the frozen ones are put in eval mode without gradients.

        Under ``ModelParallelStrategy`` each model is sharded as soon as it is loaded, so a rank holds at most one
        full model in CPU memory at a time.
        """
        if self.actor is not None:
            return
        hp = self.hparams
        for name in ("actor_path", "reward_model_path", "tokenizer_path"):
            if hp[name] is None:
                raise ValueError(f"model.{name} is not set")
        common = {
            "dtype": hp.dtype,
            "trust_remote_code": hp.trust_remote_code,
            "attn_implementation": hp.attn_implementation,
        }
        self.tokenizer = load_tokenizer(hp.tokenizer_path, hp.trust_remote_code)
        self._sharded = self.device_mesh is not None
        self.actor = self._trained(load_causal_lm(self.tokenizer, hp.actor_path, **common))
        self.ref_model = self._frozen(load_causal_lm(self.tokenizer, hp.actor_path, **common))
        self.reward_scorer = self._scorer(hp.reward_model_path, hp.reward_template, common)
        self.reward_model = self.reward_scorer.model
        self.cost_scorer = None
        if hp.cost_model_path is not None:
            self.cost_scorer = self._scorer(hp.cost_model_path, hp.cost_template, common)
            self.cost_model = self.cost_scorer.model
        self.reward_critic = self.cost_critic = None
        if hp.advantage_estimator != "gae":
            return
        self.reward_critic = self._trained(self._critic(hp.reward_model_path, self.reward_scorer, common))
        if hp.algorithm != "ppo":
            self.cost_critic = self._trained(self._critic(hp.cost_model_path, self.cost_scorer, common))

    def _trained(self, model):
        """Dropout off, LoRA and activation checkpointing if configured, then sharding (``ModelParallelStrategy``)."""
        return disable_dropout(prepare_trained_model(self, model, self.hparams))  # after LoRA: its dropout too

    def _frozen(self, model):
        """Frozen, then sharded, offloaded or replicated as ``sharding`` says (``ModelParallelStrategy`` only)."""
        shard_models(self, [], [freeze(model)], sharding=self.hparams.sharding)
        return model

    def _scorer(self, path: str, template: str, common: dict) -> Scorer:
        tokenizer = load_tokenizer(path, self.hparams.trust_remote_code)
        model = self._frozen(load_score_model(tokenizer, path, **common))
        reuse = same_tokenizer(tokenizer, self.tokenizer) and template == self._policy_template()
        return Scorer(model, tokenizer, template, reuse)

    def _critic(self, path: str, scorer: Scorer, common: dict):
        if self.hparams.critic_init == "actor":
            return load_score_model(self.tokenizer, self.hparams.actor_path, **common)
        if not same_tokenizer(scorer.tokenizer, self.tokenizer):
            raise ValueError(
                f"critic_init: score_model needs {path!r} to share the policy's tokenizer; it does not. "
                "Set model.critic_init: actor"
            )
        return load_score_model(self.tokenizer, path, **common)

    def _policy_template(self) -> str:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(datamodule, "template", SAFE_RLHF_TEMPLATE)

    def _oracle(self):
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(datamodule, "oracle", None)

    def _frozen_models(self) -> list[torch.nn.Module]:
        return [m for m in (getattr(self, name, None) for name in FROZEN) if m is not None]

    def train(self, mode: bool = True) -> PolicyModule:
        """Switch train/eval mode, keeping the frozen models in eval mode always."""
        super().train(mode)
        for name in FROZEN:
            model = getattr(self, name, None)
            if model is not None:
                model.eval()
        return self

    # --------------------------------------------------------------------------------------------- rollout
    @torch.no_grad()
    def rollout(
        self, batch: PromptBatch, samples_per_prompt: int, temperature: float, with_values: bool = True
    ) -> Rollout:
        """Sample ``k`` responses per prompt and record log-probs, values and scores (algorithm.md 5.1)."""
        return collect_rollout(self, batch, samples_per_prompt, temperature, with_values)

    def _seed_iteration(self, salt: int = 0) -> None:
        # A seed that depends only on (seed, iteration, rank) makes a resumed run draw the samples an
        # uninterrupted one would.
        torch.manual_seed(
            self.hparams.seed * 1_000_003 + int(self.iteration) * 7919 + self.global_rank * 104_729 + salt
        )

    # ----------------------------------------------------------------------------------------------- train
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """One RLHF iteration: rollout, advantages, PPO epochs, dual update, logging."""
        hp = self.hparams
        self._seed_iteration()
        rollout = self.rollout(batch, hp.samples_per_prompt, hp.temperature)
        lam = self.dual.value.to(self.device)
        advantages: Advantages = compute_advantages(rollout, hp, lam)
        update_stats = ppo_update(self, rollout, advantages)
        statistic = None
        if hp.algorithm != "ppo":
            local = dual_statistic(rollout.costs, hp)
            statistic = self.trainer.strategy.reduce(local, reduce_op="mean")
            self.dual.update(statistic.detach().float().cpu().reshape(1))
        self.iteration += 1
        lam_now = float(self.dual.value[0])
        self.lambda_history.append((int(self.iteration), lam_now))
        metrics = iteration_metrics(rollout, advantages, hp, self._oracle())
        metrics.update(update_stats)
        metrics["lambda"] = torch.tensor(lam_now)
        if statistic is not None:
            metrics["dual_statistic"] = statistic.detach().float()
        for key, value in metrics.items():
            self.log(
                f"train/{key}",
                value.to(self.device),
                sync_dist=key not in ("lambda", "dual_statistic"),
                prog_bar=key in ("lambda", "reward_mean", "unsafe_frac"),
                batch_size=rollout.num_samples,
            )
        self._log_histograms(rollout)

    def _log_histograms(self, rollout: Rollout) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_histogram") or not self.trainer.is_global_zero:
            return
        step = int(self.iteration)
        experiment.add_histogram("train/reward_hist", rollout.rewards.float().cpu(), step)
        if rollout.costs is not None:
            per_prompt = rollout.costs.view(-1, self.hparams.samples_per_prompt).mean(1)
            experiment.add_histogram("train/prompt_cost_hist", per_prompt.float().cpu(), step)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """One optimizer, an actor group and a critic group with their own learning rates."""
        groups = [{"params": list(self.actor.parameters()), "lr": self.hparams.actor_lr}]
        critics = [p for m in (self.reward_critic, self.cost_critic) if m is not None for p in m.parameters()]
        if critics:  # critic-free estimators train the actor alone
            groups.append({"params": critics, "lr": self.hparams.critic_lr})
        return self.optimizer(groups)

    # ------------------------------------------------------------------------------------------ validation
    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """One sample per held-out prompt: mean reward, cost and unsafe share (learned and, if known, true)."""
        self._seed_iteration(salt=1 + batch_idx)
        rollout = self.rollout(batch, 1, self.hparams.eval_temperature, with_values=False)
        metrics = iteration_metrics(rollout, None, self.hparams, self._oracle(), samples_per_prompt=1)
        for key, value in metrics.items():
            self.log(f"val/{key}", value.to(self.device), sync_dist=True, batch_size=rollout.num_samples)

    # ------------------------------------------------------------------------------------------ evaluation
    def on_test_epoch_start(self) -> None:
        """Start collecting per-prompt results."""
        self._eval_results = []

    def test_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """Sample ``eval_samples_per_prompt`` responses per held-out prompt and score them (algorithm.md 9)."""
        self._seed_iteration(salt=100_000 + batch_idx)
        k = self.hparams.eval_samples_per_prompt
        rollout = self.rollout(batch, k, self.hparams.eval_temperature, with_values=False)
        self._eval_results.extend(prompt_results(rollout, batch, k, self._oracle()))

    def on_test_epoch_end(self) -> None:
        """Gather results from all ranks, write the report on rank 0 and log ``test/...`` scalars."""
        results = gather_results(self._eval_results)
        summary = summarize(results)
        for key, value in summary.items():
            self.log(f"test/{key}", float(value), rank_zero_only=True)
        if self.trainer.is_global_zero:
            out_dir = self.hparams.report_dir or f"{self.trainer.log_dir or '.'}/evaluation"
            ckpt = getattr(self.trainer, "ckpt_path", None)
            write_policy_report(results, out_dir, self.hparams, int(self.iteration), self.lambda_history, ckpt)
        self.evaluation_summary = summary

    # ---------------------------------------------------------------------------------------- checkpoints
    def on_fit_start(self) -> None:
        """Return CPU-offloaded frozen shards to CPU memory (the strategy moved the whole module to the GPU)."""
        if self._sharded and as_sharding(self.hparams.sharding).offload_frozen:
            move_offloaded_to_cpu(self._frozen_models())

    def on_test_start(self) -> None:
        """As :meth:`on_fit_start`."""
        self.on_fit_start()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Save the multiplier history (frozen models are left out of ``state_dict`` itself)."""
        checkpoint["lambda_history"] = [list(item) for item in self.lambda_history]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore the multiplier history."""
        self.lambda_history = [(int(s), float(v)) for s, v in checkpoint.get("lambda_history", [])]

    def on_fit_end(self) -> None:
        """Write the trained actor and tokenizer in Hugging Face layout."""
        if self.hparams.export_dir:
            export_from_trainer(
                self.trainer,
                self.actor,
                self.tokenizer,
                self.hparams.export_dir,
                {
                    "stage": "policy",
                    "algorithm": self.hparams.algorithm,
                    "lagrange_multiplier": float(self.dual.value[0]),
                },
            )


def _drop_frozen_models(module: PolicyModule, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """``state_dict`` post-hook: frozen models reload from their paths, so checkpoints never hold them.

    Dropping them from the module's own ``state_dict`` (not only from a saved checkpoint) keeps them out of sharded
    (distributed) checkpoints too, whose loader asks the module which keys to read.
    """
    frozen = tuple(f"{prefix}{name}." for name in FROZEN)
    for key in [k for k in state_dict if k.startswith(frozen)]:
        del state_dict[key]
