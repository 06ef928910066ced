"""The networks of the policy stage: loading them and holding them together as one typed record.

Actor (trained), frozen reference (a copy of the start policy), frozen reward and cost models (each behind a
:class:`~repo_lightning.models.scorer.Scorer`), and, with the ``gae`` estimator, a reward and a cost critic
(trained), or one shared critic with a reward and a cost value head. Dropout is switched off in the trained models
(see :func:`disable_dropout`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from repo_lightning.errors import ConfigError, MissingInputError
from repo_lightning.models.backbone import (
    append_score_head,
    disable_dropout,
    freeze,
    load_causal_lm,
    load_score_model,
)
from repo_lightning.models.scorer import Scorer, same_tokenizer
from repo_lightning.modules.model_setup import prepare_trained_model
from repo_lightning.modules.policy_config import Memory, Scoring
from repo_lightning.text.tokenizers import load_tokenizer
from repo_lightning.validation import check_model_kind, check_vocabulary

#: Attribute names of the frozen models on the LightningModule (left out of checkpoints).
FROZEN = ("ref_model", "reward_model", "cost_model", "reward_members", "cost_members")


@dataclass
class PolicyModels:
    """The policy stage's networks (``None`` where the configuration needs none).

    Attributes:
        tokenizer: The policy's tokenizer.
        actor: The trained policy.
        ref_model: Frozen reference policy.
        reward_scorer: Frozen reward model with its tokenizer and template.
        cost_scorer: Frozen cost model, or ``None`` (``ppo`` without a cost model).
        reward_critic: Trained reward critic, or ``None`` (critic-free estimators); with ``shared_critic`` the one
            critic of both streams (output 0: reward value, output 1: cost value).
        cost_critic: Trained cost critic, or ``None`` (also with ``shared_critic``).
        reward_members: Further frozen reward models scored beside ``reward_scorer`` (an ensemble).
        cost_members: Further frozen cost models scored beside ``cost_scorer``.
    """

    tokenizer: PreTrainedTokenizerBase
    actor: PreTrainedModel
    ref_model: PreTrainedModel
    reward_scorer: Scorer
    cost_scorer: Scorer | None
    reward_critic: PreTrainedModel | None
    cost_critic: PreTrainedModel | None
    reward_members: list[Scorer] = field(default_factory=list)
    cost_members: list[Scorer] = field(default_factory=list)
    shared_critic: bool = False

    @property
    def critics(self) -> list[PreTrainedModel]:
        """The critics that exist."""
        return [m for m in (self.reward_critic, self.cost_critic) if m is not None]


@dataclass
class PolicySources:
    """Where the policy stage's models come from and how their inputs are formed.

    Attributes:
        actor_path: Start policy; the reference is a frozen copy.
        reward_model_path: Reward model export.
        cost_model_path: Cost model export, or ``None``.
        tokenizer_path: The policy's tokenizer.
        reward_template: Template the reward model expects (used when it re-tokenises).
        cost_template: Template the cost model expects.
        policy_template: The data's template (decides whether a scorer can read the rollout ids as they are).
        critic_init: ``score_model`` or ``actor``.
        trust_remote_code: Allow hub model code.
        reward_ensemble_paths: Further reward model exports (an ensemble with ``reward_model_path``).
        cost_ensemble_paths: Further cost model exports (an ensemble with ``cost_model_path``).
        critics: ``separate`` (a reward and a cost critic) or ``shared`` (one backbone, two value heads).
    """

    actor_path: str
    reward_model_path: str
    cost_model_path: str | None
    tokenizer_path: str
    reward_template: str
    cost_template: str
    policy_template: str
    critic_init: str
    trust_remote_code: bool = False
    reward_ensemble_paths: tuple[str, ...] = ()
    cost_ensemble_paths: tuple[str, ...] = ()
    critics: str = "separate"


def load_policy_models(
    sources: PolicySources,
    memory: Memory,
    scoring: Scoring,
    with_cost: bool,
    with_critics: bool,
    device_mesh=None,
    shard_frozen: Callable[[nn.Module], None] | None = None,
) -> PolicyModels:
    """Load every model once; under ``ModelParallelStrategy`` each is sharded as soon as it is loaded.

    Args:
        sources: Paths, templates and the critics' start.
        memory: dtype, kernel, LoRA, checkpointing and sharding settings.
        scoring: How an ensemble's heads or models are aggregated.
        with_cost: Load the cost model (and, with critics, the cost critic).
        with_critics: Load the critics (the ``gae`` estimator).
        device_mesh: The LightningModule's ``device_mesh`` (``None`` unless ``ModelParallelStrategy``).
        shard_frozen: Shards (or offloads, or replicates) one frozen model; ``None`` leaves it as loaded.
    """
    common = {
        "dtype": memory.dtype,
        "trust_remote_code": sources.trust_remote_code,
        "attn_implementation": memory.attn_implementation,
    }
    setup = {"lora": memory.lora, "gradient_checkpointing": memory.gradient_checkpointing, "sharding": memory.sharding}
    tokenizer = load_tokenizer(sources.tokenizer_path, sources.trust_remote_code)

    def trained(model: PreTrainedModel) -> PreTrainedModel:
        return disable_dropout(prepare_trained_model(device_mesh, model, setup))  # after LoRA: its dropout too

    def frozen(model: PreTrainedModel) -> PreTrainedModel:
        freeze(model)
        if shard_frozen is not None:
            shard_frozen(model)
        return model

    def scorer(key: str, path: str, template: str, aggregate: str = "mean") -> Scorer:
        try:  # a score model reads its input with the tokenizer saved beside it, which may differ from the policy's
            score_tokenizer = load_tokenizer(path, sources.trust_remote_code)
        except MissingInputError as err:
            raise MissingInputError(
                f"model.init_args.{key}: no tokenizer in {path!r}, which a reward or cost model is scored with; save "
                f"the tokenizer it was trained with into that folder ({err.__cause__ or err})"
            ) from err
        model = load_score_model(score_tokenizer, path, **common, num_labels=None)  # every head
        check_model_kind(f"model.init_args.{key}", path, model, "score")
        frozen(model)
        reuse = same_tokenizer(score_tokenizer, tokenizer) and template == sources.policy_template
        return Scorer(model, score_tokenizer, template, reuse, aggregate=aggregate, kappa=scoring.cost_kappa)

    def critic(path: str, score: Scorer, shared_head: int | None = None) -> PreTrainedModel:
        if sources.critic_init == "actor":
            model = load_score_model(tokenizer, sources.actor_path, **common)
        elif not same_tokenizer(score.tokenizer, tokenizer):
            raise ConfigError(
                f"model.init_args.critic_init: score_model starts the critics from {path!r}, whose tokenizer is not "
                f"the policy's ({sources.tokenizer_path!r}); set model.init_args.critic_init: actor"
            )
        else:
            model = load_score_model(tokenizer, path, **common)
        if shared_head is not None:
            append_score_head(model, shared_head)  # before LoRA, so the adapters' head is the two-output one
        return trained(model)

    actor = load_causal_lm(tokenizer, sources.actor_path, **common)
    check_vocabulary("model.init_args.actor_path", sources.actor_path, actor, tokenizer, sources.tokenizer_path)
    check_model_kind("model.init_args.actor_path", sources.actor_path, actor, "causal_lm")
    actor = trained(actor)
    ref_model = frozen(load_causal_lm(tokenizer, sources.actor_path, **common))
    reward_scorer = scorer("reward_model_path", sources.reward_model_path, sources.reward_template)
    cost_scorer = None
    if sources.cost_model_path is not None:
        cost_scorer = scorer("cost_model_path", sources.cost_model_path, sources.cost_template, scoring.cost_aggregate)
    reward_members = [
        scorer(f"reward_ensemble_paths[{i}]", path, sources.reward_template)
        for i, path in enumerate(sources.reward_ensemble_paths)
    ]
    cost_members = []
    if cost_scorer is not None:
        cost_members = [
            scorer(f"cost_ensemble_paths[{i}]", path, sources.cost_template, scoring.cost_aggregate)
            for i, path in enumerate(sources.cost_ensemble_paths)
        ]
    reward_critic = cost_critic = None
    shared = with_critics and with_cost and sources.critics == "shared"
    if shared:  # from the cost model: the cost value, which the multiplier scales, starts trained
        reward_critic = critic(sources.cost_model_path, cost_scorer, shared_head=1)
    elif with_critics:
        reward_critic = critic(sources.reward_model_path, reward_scorer)
        if with_cost:
            cost_critic = critic(sources.cost_model_path, cost_scorer)
    return PolicyModels(
        tokenizer,
        actor,
        ref_model,
        reward_scorer,
        cost_scorer,
        reward_critic,
        cost_critic,
        reward_members,
        cost_members,
        shared_critic=shared,
    )


def drop_frozen_models(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """``state_dict`` post-hook: frozen models reload from their paths, so checkpoints never hold them.

    Dropping them from the module's own ``state_dict`` (not only from a saved checkpoint) keeps them out of sharded
    (distributed) checkpoints too, whose loader asks the module which keys to read.
    """
    frozen = tuple(f"{prefix}{name}." for name in FROZEN)
    for key in [k for k in state_dict if k.startswith(frozen)]:
        del state_dict[key]
