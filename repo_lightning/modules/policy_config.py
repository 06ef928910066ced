"""The policy stage's settings, in typed groups (each a dataclass that ``--print_config`` documents).

In YAML each group is a mapping under ``model.init_args``::

    sampling: {samples_per_prompt: 4, max_new_tokens: 12}
    estimation: {estimator: gae, kl_coef: 0.1}
    update: {ppo_epochs: 2, minibatch_size: 32, actor_lr: 3.0e-4}

Every value is range-checked where it is declared, and the message names the key as the config spells it.
Checkpoints store the groups as plain dicts (``weights_only`` loading needs plain hyperparameters);
:func:`as_group` turns either form back into the dataclass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, TypeVar

from repo_lightning.errors import ConfigError
from repo_lightning.models.backbone import DType
from repo_lightning.models.lora import LoRA, as_lora
from repo_lightning.models.sharding import Sharding, as_sharding

Estimator = Literal["gae", "rloo", "grpo", "reinforce_pp"]


def _at_least(group: str, name: str, value: float, low: float) -> None:
    if not value >= low:
        raise ConfigError(f"model.init_args.{group}.{name} must be >= {low}, got {value}")


def _positive(group: str, name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"model.init_args.{group}.{name} must be > 0, got {value}")


@dataclass
class Sampling:
    """How rollouts are sampled.

    Attributes:
        samples_per_prompt: ``k`` responses per prompt (the group estimators and ``rectify: prompt`` need >= 2).
        max_new_tokens: Response length cap.
        temperature: Sampling temperature, ``> 0`` (log-probabilities are the untempered policy's: keep 1.0 to stay
            on-policy).
        top_p: Nucleus sampling mass in ``(0, 1]``.
        top_k: Top-k cutoff (0 disables).
        logprobs_from_generation: Take the actor's log-probabilities of the samples (``logp_old``) from the logits
            ``generate`` computed to sample them, as TRL's ``PPOTrainer`` does, instead of one more no-grad forward
            pass of the actor over the ``N x (P + T)`` rollout. The same quantity (the untempered policy's
            log-probabilities, whatever ``temperature``, ``top_k`` and ``top_p``) up to float rounding between the
            KV-cached incremental passes and one full pass (about 1e-6 in float32), so the first minibatch's ratio
            is 1 only to that precision; holds ``N x T x vocabulary`` float32 logits during generation. Off by
            default (runs stay bit for bit as before).
        warmup_temperature: Sampling temperature of the training rollouts of the first ``warmup_iterations``
            iterations, ``temperature`` after; ``None`` (default): no warm-up. Exploration, and off-policy (the
            ratio and the KL use the untempered log-probabilities): at 1.3 for the first quarter of the run, RePO's
            policies on SafetyWorld fell into the refusal collapse in 1 of 9 runs (three reward models x three
            seeds) against 6 of 9 without it (docs/results.md, rounds 17-18; algorithm.md section 10). Validation and
            evaluation never use it.
        warmup_iterations: How many iterations (rollouts) sample at ``warmup_temperature``; needs it set.
        resample_identical_temperature: Training rollouts only: a prompt whose ``k`` samples came out token for
            token the same answer (zero advantage under every baseline, so no gradient: the refusal trap of
            docs/results.md rounds 16-17) is sampled ``k`` times again, once, at this temperature, and the new
            samples replace its old ones; the other prompts keep theirs. Off-policy for those prompts only, as
            ``warmup_temperature`` is for all (the ratio and the KL use the untempered log-probabilities). Logged as
            ``train/resampled_group_rate``. ``None`` (default): off. Needs ``samples_per_prompt >= 2``; not with a
            sharded actor (the extra ``generate`` would run on some ranks only). Measured at 1.5 on SafetyWorld
            it did not prevent RePO's refusal collapse (5 of 9 runs collapsed, against 6 of 9 without it and 1 of 9
            with the warm-up; docs/results.md, round 18).
    """

    samples_per_prompt: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    logprobs_from_generation: bool = False
    warmup_temperature: float | None = None
    warmup_iterations: int = 0
    resample_identical_temperature: float | None = None

    def __post_init__(self) -> None:
        _at_least("sampling", "samples_per_prompt", self.samples_per_prompt, 1)
        _at_least("sampling", "max_new_tokens", self.max_new_tokens, 1)
        _positive("sampling", "temperature", self.temperature)
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"model.init_args.sampling.top_p must be in (0, 1], got {self.top_p}")
        _at_least("sampling", "top_k", self.top_k, 0)
        _at_least("sampling", "warmup_iterations", self.warmup_iterations, 0)
        if self.warmup_temperature is not None:
            _positive("sampling", "warmup_temperature", self.warmup_temperature)
        if (self.warmup_temperature is None) != (self.warmup_iterations == 0):
            raise ConfigError(
                "model.init_args.sampling.warmup_temperature and model.init_args.sampling.warmup_iterations go "
                f"together: got warmup_temperature={self.warmup_temperature}, warmup_iterations="
                f"{self.warmup_iterations} (set both, or neither)"
            )
        if self.resample_identical_temperature is not None:
            _positive("sampling", "resample_identical_temperature", self.resample_identical_temperature)
            if self.samples_per_prompt < 2:
                raise ConfigError(
                    "model.init_args.sampling.resample_identical_temperature needs samples_per_prompt >= 2 (it "
                    f"compares the k samples of a prompt), got samples_per_prompt={self.samples_per_prompt}"
                )

    def training_temperature(self, iteration: int) -> float:
        """The sampling temperature of the training rollout of 0-based ``iteration``."""
        if self.warmup_temperature is not None and iteration < self.warmup_iterations:
            return self.warmup_temperature
        return self.temperature


@dataclass
class Estimation:
    """From scores to advantages: the estimator, the KL penalty and the reward shaping (algorithm.md 5.2-5.3).

    Attributes:
        estimator: ``gae`` (reward and cost critics), or critic-free group baselines over the ``k`` samples of a
            prompt: ``rloo`` (leave-one-out mean) or ``grpo`` (group mean and std), or ``reinforce_pp``
            (REINFORCE++: token returns minus their batch mean); these three load no critic.
        kl_coef: ``beta``, the KL penalty's weight.
        kl_placement: ``reward``: ``-beta * kl`` is part of the reward (per token with ``gae`` and
            ``reinforce_pp``, summed over the response with the group estimators); ``loss``: a ``beta``-weighted k3
            KL loss term on the actor.
        score_clip: Clip reward and cost scores to ``+-score_clip``; ``None`` disables.
        missing_eos_penalty: Added to the reward of a response cut at ``max_new_tokens`` (a guard against padding
            answers to exploit the reward model); ``None`` disables.
        gamma: Discount of ``gae`` and ``reinforce_pp``.
        gae_lambda: GAE lambda.
        whiten_advantages: Whiten the combined advantages over the batch.
    """

    estimator: Estimator = "gae"
    kl_coef: float = 0.02
    kl_placement: Literal["reward", "loss"] = "reward"
    score_clip: float | None = 50.0
    missing_eos_penalty: float | None = None
    gamma: float = 1.0
    gae_lambda: float = 0.95
    whiten_advantages: bool = False

    def __post_init__(self) -> None:
        if self.estimator not in ("gae", "rloo", "grpo", "reinforce_pp"):
            raise ConfigError(
                f"model.init_args.estimation.estimator must be gae, rloo, grpo or reinforce_pp, got {self.estimator!r}"
            )
        if self.kl_placement not in ("reward", "loss"):
            raise ConfigError(
                f"model.init_args.estimation.kl_placement must be reward or loss, got {self.kl_placement!r}"
            )
        _at_least("estimation", "kl_coef", self.kl_coef, 0.0)
        if self.score_clip is not None:
            _positive("estimation", "score_clip", self.score_clip)
        for name in ("gamma", "gae_lambda"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"model.init_args.estimation.{name} must be in [0, 1], got {value}")


@dataclass
class PPOUpdate:
    """The PPO update of the actor and critics (algorithm.md 5.5).

    Attributes:
        ppo_epochs: Passes over each rollout batch.
        minibatch_size: Samples per minibatch.
        clip_ratio: PPO ratio clip ``eps``: the ratio is clipped to ``[1 - eps, 1 + eps]``.
        clip_ratio_high: A larger upper clip ``eps_high`` (``[1 - eps, 1 + eps_high]``), DAPO's "clip-higher"
            (Yu et al. 2025): a sample the rollout policy gave little probability can gain more of it in one
            rollout's update, which DAPO uses against entropy collapse. At 0.28 it did not remove RePO's refusal
            collapse on SafetyWorld (docs/results.md, round 17). ``None`` (default): ``eps``, the symmetric clip.
        value_clip: Critic value clip ``eps_v``; ``None`` disables.
        value_loss_coef: Weight of the critics' value losses in the joint loss.
        max_grad_norm: Gradient-norm clip over all trained parameters; ``None`` disables.
        actor_lr: Learning rate of the actor parameter group.
        critic_lr: Learning rate of the critic parameter group.
        fused_optimizer: Build the optimizer with ``fused=True`` (torch's one-kernel step, e.g. ``_fused_adamw_``)
            where its class and the parameters' device support it, else warn and keep it unfused. The same update
            up to float rounding (not bit for bit: AdamW on CPU differs by up to 1 ulp a step), hence off by
            default. An explicit ``fused`` in the optimizer's own ``init_args`` takes precedence.
        entropy_coef: Weight ``c_H`` of an entropy bonus: the actor's loss gets ``- c_H * H``, the masked mean
            per-token entropy of the policy over the response (the ``entropy`` it logs). ``0`` (default) adds
            nothing. It keeps a prompt whose ``k`` samples are all the same answer from getting no gradient at all
            (identical samples get zero advantage under any baseline; docs/algorithm.md section 10). At 0.01 and
            0.03 it did not remove RePO's refusal collapse on SafetyWorld (docs/results.md, round 16).
    """

    ppo_epochs: int = 1
    minibatch_size: int = 64
    clip_ratio: float = 0.2
    clip_ratio_high: float | None = None
    value_clip: float | None = 5.0
    value_loss_coef: float = 1.0
    max_grad_norm: float | None = 1.0
    actor_lr: float = 1e-5
    critic_lr: float = 5e-6
    fused_optimizer: bool = False
    entropy_coef: float = 0.0

    def __post_init__(self) -> None:
        _at_least("update", "ppo_epochs", self.ppo_epochs, 1)
        _at_least("update", "entropy_coef", self.entropy_coef, 0.0)
        _at_least("update", "minibatch_size", self.minibatch_size, 1)
        _positive("update", "clip_ratio", self.clip_ratio)
        if self.clip_ratio_high is not None:
            _at_least("update", "clip_ratio_high", self.clip_ratio_high, self.clip_ratio)
        if self.value_clip is not None:
            _positive("update", "value_clip", self.value_clip)
        _at_least("update", "value_loss_coef", self.value_loss_coef, 0.0)
        if self.max_grad_norm is not None:
            _positive("update", "max_grad_norm", self.max_grad_norm)
        _positive("update", "actor_lr", self.actor_lr)
        _positive("update", "critic_lr", self.critic_lr)


@dataclass
class Evaluation:
    """Validation and ``test`` sampling, and where the report goes.

    Attributes:
        samples_per_prompt: ``k`` of the ``test`` evaluation (validation samples one per prompt).
        temperature: Sampling temperature of validation and evaluation (0: greedy).
        report_dir: Where ``test`` writes its report; ``None`` uses ``<log_dir>/evaluation``.
        unsafe_at_k: The ``k`` of the unsafe prompt rates ("any of k responses unsafe"), estimated without bias
            from all ``samples_per_prompt >= k`` samples of each prompt, with a smaller sampling error than
            ``k`` samples give (:mod:`repo_lightning.evaluation.metrics`); ``None``: ``k = samples_per_prompt``.
    """

    samples_per_prompt: int = 4
    temperature: float = 1.0
    report_dir: str | None = None
    unsafe_at_k: int | None = None

    def __post_init__(self) -> None:
        _at_least("evaluation", "samples_per_prompt", self.samples_per_prompt, 1)
        _at_least("evaluation", "temperature", self.temperature, 0.0)
        if self.unsafe_at_k is not None:
            _at_least("evaluation", "unsafe_at_k", self.unsafe_at_k, 1)
            if self.unsafe_at_k > self.samples_per_prompt:
                raise ConfigError(
                    f"model.init_args.evaluation.unsafe_at_k ({self.unsafe_at_k}) must be <= "
                    f"model.init_args.evaluation.samples_per_prompt ({self.samples_per_prompt})"
                )


@dataclass
class Memory:
    """Precision, kernels and memory-saving layout of the six models.

    Attributes:
        dtype: Parameter dtype of all models.
        attn_implementation: Attention kernel; ``None`` keeps the default.
        gradient_checkpointing: Recompute activations of the actor and critics in the backward pass.
        scoring_batch_size: Rows per forward pass of the frozen models (``None``: whole batch).
        lora: Train LoRA adapters of the actor and critics (and the critics' score heads) instead of every
            weight; ``None`` trains all (needs peft). The export merges the adapters into the actor's weights.
        sharding: FSDP2 layout under ``ModelParallelStrategy``: the actor and critics are sharded per transformer
            block, the frozen models sharded (optionally offloaded to CPU) or replicated; ignored elsewhere.
    """

    dtype: DType = "float32"
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    scoring_batch_size: int | None = None
    lora: LoRA | None = None
    sharding: Sharding | None = None

    def __post_init__(self) -> None:
        if self.scoring_batch_size is not None:
            _at_least("memory", "scoring_batch_size", self.scoring_batch_size, 1)
        self.lora = as_lora(self.lora)
        self.sharding = as_sharding(self.sharding) if self.sharding is not None else None


@dataclass
class Scoring:
    """How the frozen scorers' outputs become one reward and one cost per sample.

    Attributes:
        cost_aggregate: For a cost model with several heads (``model.ensemble_size`` of the cost stage), or several
            cost models (``model.init_args.cost_ensemble_paths``: every head of every model, on the models' own
            scale, whose sign is the safety label): ``mean``,
            ``mean_plus_std`` (``mean + cost_kappa * std`` across heads: conservative where the heads disagree) or
            ``max`` (worst case). A one-head cost model is used as it is.
        cost_kappa: Weight of the heads' spread for ``mean_plus_std``, ``>= 0``.
        reward_aggregate: With several reward models (``model.init_args.reward_ensemble_paths``): ``mean``,
            ``mean_minus_std`` (``mean - reward_kappa * std`` across the models: uncertainty-weighted, UWO in Coste
            et al., ICLR 2024) or ``min`` (worst case, WCO). Each further model is first aligned to the first one's
            scale (its scores standardised over the rollout batch, then mapped to the first model's batch mean and
            std: Bradley-Terry scores have no common offset or scale), so models that agree up to such a map give
            the first model's scores unchanged. One reward model is used as it is.
        reward_kappa: Weight of the models' spread for ``mean_minus_std``, ``>= 0``.
        reward_source: ``model`` (the reward model) or ``oracle``: the data's ground-truth helpfulness ``R*``
            (SafetyWorld only). A diagnostic, not a training method: with the oracle the policy stage shows what
            the objective reaches when the score model is perfect, so a shortfall can be put on the objective or
            on the learned model (docs/algorithm.md section 13). Evaluation then reports the oracle's scores in the
            learned-model columns too.
        cost_source: The same for the cost (``C*``).
    """

    cost_aggregate: Literal["mean", "mean_plus_std", "max"] = "mean"
    cost_kappa: float = 1.0
    reward_aggregate: Literal["mean", "mean_minus_std", "min"] = "mean"
    reward_kappa: float = 1.0
    reward_source: Literal["model", "oracle"] = "model"
    cost_source: Literal["model", "oracle"] = "model"

    def __post_init__(self) -> None:
        if self.cost_aggregate not in ("mean", "mean_plus_std", "max"):
            raise ConfigError(
                "model.init_args.scoring.cost_aggregate must be mean, mean_plus_std or max, "
                f"got {self.cost_aggregate!r}"
            )
        _at_least("scoring", "cost_kappa", self.cost_kappa, 0.0)
        if self.reward_aggregate not in ("mean", "mean_minus_std", "min"):
            raise ConfigError(
                "model.init_args.scoring.reward_aggregate must be mean, mean_minus_std or min, "
                f"got {self.reward_aggregate!r}"
            )
        _at_least("scoring", "reward_kappa", self.reward_kappa, 0.0)
        for key in ("reward_source", "cost_source"):
            if getattr(self, key) not in ("model", "oracle"):
                raise ConfigError(f"model.init_args.scoring.{key} must be model or oracle, got {getattr(self, key)!r}")


Group = TypeVar("Group", Sampling, Estimation, PPOUpdate, Evaluation, Memory, Scoring)


def check_combinations(
    objective,
    sampling: Sampling,
    estimation: Estimation,
    cost_model_path: str | None,
    cost_ensemble_paths: list[str] | None,
    critics: str,
) -> None:
    """The checks that span several groups or the module's other arguments (each group checks its own values).

    ``objective`` is the :class:`~repo_lightning.objectives.Objective` (its ``uses_cost``, ``name`` and, for RePO,
    ``rectify`` are read). Raises :class:`ConfigError` naming the keys.
    """
    if objective.uses_cost and cost_model_path is None:
        raise ConfigError(f"model.init_args.cost_model_path is required for objective {objective.name!r}")
    if cost_ensemble_paths and cost_model_path is None:
        raise ConfigError(
            "model.init_args.cost_ensemble_paths needs model.init_args.cost_model_path (the first member)"
        )
    k = sampling.samples_per_prompt
    if k < 2 and (estimation.estimator in ("rloo", "grpo") or getattr(objective, "rectify", None) == "prompt"):
        raise ConfigError(
            "model.init_args.sampling.samples_per_prompt must be >= 2 for a group estimator or rectify: prompt "
            f"(they compare the k samples of a prompt), got {k}"
        )
    if critics not in ("separate", "shared"):
        raise ConfigError(f"model.init_args.critics must be separate or shared, got {critics!r}")


def as_group(cls: type[Group], value: Group | dict | None) -> Group:
    """The group from a dataclass, a plain dict (a checkpoint's hyperparameters) or ``None`` (its defaults)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} for {cls.__name__}; expected some of {sorted(known)}")
        return cls(**value)
    raise TypeError(f"expected {cls.__name__} or a mapping, got {type(value).__name__}")


def plain(value: Any) -> Any:
    """A dataclass group as a plain dict (nested dataclasses too), for ``save_hyperparameters``."""
    return asdict(value) if hasattr(value, "__dataclass_fields__") else value
