"""Rollouts: sampling responses with the KV cache and reading log-probabilities and values of the samples.

Shapes: ``N`` samples (prompts x samples per prompt), ``P`` the padded prompt width, ``T`` the padded response
width, ``L = P + T``. Prompts are left-padded and responses right-padded, so every response starts at column ``P``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import PreTrainedModel

from repo_lightning.data.records import PromptBatch
from repo_lightning.models.backbone import position_ids_from_mask, token_scores
from repo_lightning.models.scorer import aggregate_heads, aggregate_rewards, decode_responses, score_samples
from repo_lightning.modules.policy_config import Sampling, Scoring
from repo_lightning.modules.policy_models import PolicyModels
from repo_lightning.rl.losses import logprobs_from_logits


@dataclass
class Rollout:
    """One batch of sampled responses and everything PPO needs about them (all detached).

    Attributes:
        sequences: ``[N, L]`` prompt + response ids.
        attention_mask: ``[N, L]``; 1 on prompt tokens and on response tokens up to and including eos.
        response_mask: ``[N, T]`` float, 1 on response tokens (up to and including the first eos).
        prompt_length: ``P``.
        logprobs: ``[N, T]`` actor log-probabilities of the sampled tokens (``logp_old``).
        ref_logprobs: ``[N, T]`` reference log-probabilities.
        reward_values: ``[N, T]`` reward critic values ``V_R`` of the state before each response token, or ``None``
            (evaluation, or a critic-free estimator).
        cost_values: ``[N, T]`` cost critic values ``V_C``, or ``None`` without a cost critic.
        rewards: ``[N]`` reward model scores ``R(x, y)``.
        costs: ``[N]`` cost model scores ``C(x, y)`` (an ensemble's heads aggregated as configured), or ``None``.
        cost_spread: ``[N]`` std of an ensemble cost model's heads (their disagreement), or ``None``.
        reward_spread: ``[N]`` std of the aligned scores of several reward models, or ``None``.
        finished: ``[N]`` bool, whether the response ended with eos (not cut at ``max_new_tokens``).
        prompts: ``N`` raw prompts (each repeated ``k`` times, consecutively).
        responses: ``N`` decoded responses.
        meta: ``N`` per-prompt extra fields.
        resampled_groups: ``[B]`` bool, the prompts whose ``k`` identical samples were drawn again
            (``sampling.resample_identical_temperature``), or ``None`` when the option is off.
    """

    sequences: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    prompt_length: int
    logprobs: Tensor
    ref_logprobs: Tensor
    reward_values: Tensor | None
    cost_values: Tensor | None
    rewards: Tensor
    costs: Tensor | None
    finished: Tensor | None = None
    cost_spread: Tensor | None = None
    reward_spread: Tensor | None = None
    prompts: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)
    resampled_groups: Tensor | None = None

    @property
    def response_ids(self) -> Tensor:
        """``[N, T]`` sampled token ids."""
        return self.sequences[:, self.prompt_length :]

    @property
    def num_samples(self) -> int:
        """``N``."""
        return int(self.sequences.shape[0])


def response_mask_from_ids(response_ids: Tensor, eos_token_id: int) -> Tensor:
    """``[N, T]`` ids -> ``[N, T]`` long mask of the tokens up to and including the first eos."""
    is_eos = (response_ids == eos_token_id).long()
    eos_before = is_eos.cumsum(-1) - is_eos
    return (eos_before == 0).long()


@torch.no_grad()
def sample_responses(
    actor: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    eos_token_id: int,
    pad_token_id: int,
    synced_gpus: bool = False,
    with_logprobs: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Sample one response per (already repeated) prompt row with ``generate`` and its KV cache.

    Args:
        actor: The policy.
        input_ids: ``[N, P]`` left-padded prompts.
        attention_mask: ``[N, P]``.
        max_new_tokens: Response length cap.
        temperature: Sampling temperature; 0 means greedy decoding.
        top_p: Nucleus sampling mass.
        top_k: Top-k cutoff (0 disables).
        eos_token_id: Stop token.
        pad_token_id: Filler after a finished response.
        synced_gpus: Keep stepping until every rank has finished (required when the actor is sharded: each step
            is a collective all-gather of its weights).
        with_logprobs: Also return the actor's log-probabilities of the sampled tokens, read from the logits
            ``generate`` computed to sample them (``output_logits``: the model's raw logits, before temperature,
            top-k and top-p), so no second forward pass is needed. They are those of :func:`response_logprobs`
            (the untempered policy) up to float rounding between the cached incremental forward passes and one
            full forward pass. Holds ``N x T x V`` float32 logits until they are read.

    Returns:
        ``(sequences [N, P + T], attention_mask [N, P + T], response_mask [N, T], logprobs)``: ``logprobs`` is
        ``[N, T]`` float32, 0 after each response's eos, with ``with_logprobs``; otherwise ``None``.
    """
    was_training = actor.training
    actor.eval()
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}
    output = actor.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        use_cache=True,
        synced_gpus=synced_gpus,
        **(sampling if temperature > 0 else {"do_sample": False}),
        **({"return_dict_in_generate": True, "output_logits": True} if with_logprobs else {}),
    )
    actor.train(was_training)
    step_logits = None
    if with_logprobs:
        output, step_logits = output.sequences, output.logits
    prompt_length = input_ids.shape[1]
    response_ids = output[:, prompt_length:]
    if response_ids.shape[1] == 0:  # nothing generated at all
        response_ids = torch.full_like(input_ids[:, :1], eos_token_id)
        output = torch.cat([input_ids, response_ids], dim=1)
        step_logits = None  # no logits for the stand-in eos: the caller runs the forward pass
    response_mask = response_mask_from_ids(response_ids, eos_token_id)
    logprobs = None
    if step_logits is not None:
        logprobs = logprobs_from_step_logits(step_logits, response_ids)
        logprobs = torch.where(response_mask.bool(), logprobs, torch.zeros_like(logprobs))
    # Tokens past eos become pad so that every later reader sees the same clean sequence.
    sequences = torch.cat([input_ids, torch.where(response_mask.bool(), response_ids, pad_token_id)], dim=1)
    return sequences, torch.cat([attention_mask, response_mask], dim=1), response_mask, logprobs


def identical_groups(response_ids: Tensor, samples_per_prompt: int) -> Tensor:
    """``[B]`` bool: the prompts whose ``k`` consecutive rows of ``response_ids [B * k, T]`` are token for token equal.

    Rows are compared whole, pads after eos included (:func:`sample_responses` writes pad there), so two samples
    count as one answer exactly when they are the same response.
    """
    groups = response_ids.view(-1, samples_per_prompt, response_ids.shape[1])
    return (groups == groups[:, :1]).flatten(1).all(1)


SampleTuple = tuple[Tensor, Tensor, Tensor, Tensor | None]


def replace_samples(samples: SampleTuple, new: SampleTuple, rows: Tensor, pad_token_id: int) -> SampleTuple:
    """:func:`sample_responses`' output ``samples`` with the rows where ``rows`` is true replaced by ``new``.

    ``new`` holds those rows only, in order. The narrower response width is padded on the right (pad id, mask 0,
    log-prob 0) to the wider one; log-probabilities are ``None`` unless both have them.
    """
    width = max(samples[0].shape[1], new[0].shape[1])
    fills = (pad_token_id, 0, 0, 0.0)

    def widen(part: SampleTuple) -> list[Tensor | None]:
        return [
            None if t is None else torch.nn.functional.pad(t, (0, width - part[0].shape[1]), value=fill)
            for t, fill in zip(part, fills, strict=True)
        ]

    out, replacement = widen(samples), widen(new)
    if out[3] is None or replacement[3] is None:
        out[3] = replacement[3] = None
    for t, r in zip(out, replacement, strict=True):
        if t is not None:
            t[rows] = r.to(t.dtype)
    return tuple(out)


def logprobs_from_step_logits(step_logits: tuple[Tensor, ...], tokens: Tensor) -> Tensor:
    """``T`` per-step ``[N, V]`` logits (``generate``'s ``output.logits``) and ``[N, T]`` tokens -> ``[N, T]``.

    The definition of :func:`~repo_lightning.rl.losses.logprobs_from_logits` (``log_softmax`` in float32, then
    ``gather``), one step at a time, so the ``[N, T, V]`` logits are never stacked into one more copy.
    """
    steps = [
        torch.log_softmax(logits.float(), dim=-1).gather(-1, step_tokens.unsqueeze(-1)).squeeze(-1)
        for logits, step_tokens in zip(step_logits, tokens.unbind(1), strict=True)
    ]
    return torch.stack(steps, dim=1)


def response_logits(model: PreTrainedModel, sequences: Tensor, attention_mask: Tensor, prompt_length: int) -> Tensor:
    """Logits that predict each response token: ``[N, L]`` -> ``[N, T, V]`` (only those positions are computed)."""
    response_width = sequences.shape[1] - prompt_length
    logits = model(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        logits_to_keep=response_width + 1,
    ).logits
    return logits[:, :-1]


def response_logprobs(model: PreTrainedModel, sequences: Tensor, attention_mask: Tensor, prompt_length: int) -> Tensor:
    """Log-probabilities of the response tokens: ``[N, L]`` -> ``[N, T]`` float32."""
    logits = response_logits(model, sequences, attention_mask, prompt_length)
    return logprobs_from_logits(logits, sequences[:, prompt_length:])


def response_values(critic: PreTrainedModel, sequences: Tensor, attention_mask: Tensor, prompt_length: int) -> Tensor:
    """Critic values of the state before each response token: ``[N, L]`` -> ``[N, T]`` float32."""
    values = token_scores(critic, sequences, attention_mask)
    return values[:, prompt_length - 1 : -1]


def critic_values(
    models: PolicyModels, sequences: Tensor, attention_mask: Tensor, prompt_length: int
) -> tuple[Tensor | None, Tensor | None]:
    """``(V_R, V_C)``, each ``[N, T]`` float32 or ``None``: the reward and cost critics' values of the response states.

    Separate critics run one forward each; a shared critic (``models.shared_critic``) runs once and its two
    outputs are the two streams' values.
    """
    if models.reward_critic is None:
        return None, None
    values = response_values(models.reward_critic, sequences, attention_mask, prompt_length)
    if models.shared_critic:
        return values[..., 0], values[..., 1]
    cost_values = None
    if models.cost_critic is not None:
        cost_values = response_values(models.cost_critic, sequences, attention_mask, prompt_length)
    return values, cost_values


def oracle_scores(score, prompts: list[str], responses: list[str], device: torch.device) -> Tensor:
    """``[N]`` float32 ground-truth scores ``score(prompt, response)`` (an oracle's ``helpfulness`` or ``harm``)."""
    values = [float(score(prompt, response)) for prompt, response in zip(prompts, responses, strict=True)]
    return torch.tensor(values, dtype=torch.float32, device=device)


@torch.no_grad()
def collect_rollout(
    models: PolicyModels,
    batch: PromptBatch,
    sampling: Sampling,
    samples_per_prompt: int,
    temperature: float,
    with_values: bool = True,
    scoring_batch_size: int | None = None,
    synced_gpus: bool = False,
    scoring: Scoring | None = None,
    oracle=None,
    resample_temperature: float | None = None,
) -> Rollout:
    """Sample ``k`` responses per prompt and record log-probs, values and scores (algorithm.md 5.1).

    Args:
        models: The actor, reference, scorers and critics.
        batch: ``B`` prompts.
        sampling: Length cap, nucleus / top-k settings, and where the old log-probs come from
            (``logprobs_from_generation``: the sampling logits, else one more forward pass of the actor).
        samples_per_prompt: ``k``; the rollout holds ``N = B * k`` samples, the ``k`` of a prompt consecutive.
        temperature: Sampling temperature (training, validation and evaluation differ).
        with_values: Also read the critics' values (training needs them, evaluation does not).
        scoring_batch_size: Rows per forward pass of the frozen scorers (``None``: all at once).
        synced_gpus: The actor is sharded: every rank keeps stepping ``generate`` until all have finished.
        scoring: Where rewards and costs come from (``reward_source`` / ``cost_source``: the frozen models or the
            oracle); ``None``: the models.
        oracle: The data's ground truth (``helpfulness(prompt, response)``, ``harm(prompt, response)``); needed
            only for an ``oracle`` source.
        resample_temperature: Sample the prompts whose ``k`` samples are all one answer again, once, at this
            temperature (``sampling.resample_identical_temperature``, training only); ``None``: no resampling.
    """
    scoring = scoring or Scoring()
    tok = models.tokenizer
    input_ids = batch.input_ids.repeat_interleave(samples_per_prompt, 0)
    attention_mask = batch.attention_mask.repeat_interleave(samples_per_prompt, 0)

    def sample(rows: Tensor | None, at: float) -> SampleTuple:
        ids, mask = (input_ids, attention_mask) if rows is None else (input_ids[rows], attention_mask[rows])
        return sample_responses(
            models.actor,
            ids,
            mask,
            sampling.max_new_tokens,
            at,
            sampling.top_p,
            sampling.top_k,
            tok.eos_token_id,
            tok.pad_token_id,
            synced_gpus=synced_gpus,
            with_logprobs=sampling.logprobs_from_generation,
        )

    samples = sample(None, temperature)
    prompt_length = input_ids.shape[1]
    resampled = None
    if resample_temperature is not None and samples_per_prompt >= 2:
        resampled = identical_groups(samples[0][:, prompt_length:], samples_per_prompt)
        if resampled.any():
            rows = resampled.repeat_interleave(samples_per_prompt)
            samples = replace_samples(samples, sample(rows, resample_temperature), rows, tok.pad_token_id)
    sequences, full_mask, response_mask, logprobs = samples
    prompts = [p for p in batch.prompts for _ in range(samples_per_prompt)]
    meta = [m for m in (batch.meta or [{}] * len(batch.prompts)) for _ in range(samples_per_prompt)]
    responses = decode_responses(tok, sequences[:, prompt_length:], response_mask)
    if logprobs is None:  # one more no-grad forward pass of the actor (sampling.logprobs_from_generation: off)
        logprobs = response_logprobs(models.actor, sequences, full_mask, prompt_length)
    ref_logprobs = response_logprobs(models.ref_model, sequences, full_mask, prompt_length)

    def scored(scorer):
        return score_samples(scorer, sequences, full_mask, prompts, responses, scoring_batch_size)

    reward_spread = None
    if scoring.reward_source == "oracle":
        rewards = oracle_scores(oracle.helpfulness, prompts, responses, sequences.device)
    else:
        rewards = aggregate_heads(scored(models.reward_scorer), "mean")
        if models.reward_members:
            members = [rewards, *(aggregate_heads(scored(m), "mean") for m in models.reward_members)]
            rewards, reward_spread = aggregate_rewards(
                torch.stack(members, 1), scoring.reward_aggregate, scoring.reward_kappa
            )
    costs = cost_spread = None
    if models.cost_scorer is not None and scoring.cost_source == "oracle":
        costs = oracle_scores(oracle.harm, prompts, responses, sequences.device)
    elif models.cost_scorer is not None:
        costs = scored(models.cost_scorer)
        if models.cost_members:  # every head of every model, on the models' own (sign-labelled) scale
            parts = [costs, *(scored(m) for m in models.cost_members)]
            costs = torch.cat([part if part.dim() == 2 else part[:, None] for part in parts], 1)
        if costs.dim() == 2:
            cost_spread = costs.std(1)
            costs = aggregate_heads(costs, models.cost_scorer.aggregate, models.cost_scorer.kappa)
    reward_values = cost_values = None
    if with_values:
        reward_values, cost_values = critic_values(models, sequences, full_mask, prompt_length)
    return Rollout(
        sequences,
        full_mask,
        response_mask.float(),
        prompt_length,
        logprobs,
        ref_logprobs,
        reward_values,
        cost_values,
        rewards,
        costs,
        finished=(sequences[:, prompt_length:] == tok.eos_token_id).any(1),
        cost_spread=cost_spread,
        reward_spread=reward_spread,
        prompts=prompts,
        responses=responses,
        meta=meta,
        resampled_groups=resampled,
    )
