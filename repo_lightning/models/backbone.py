"""Loading the networks every stage is built from: a causal LM (actor, reference, SFT) and a score model.

A score model is ``AutoModelForSequenceClassification`` with ``num_labels=1`` (reward model, cost model and the
critics). Each comes from a Hugging Face hub name, a local folder, or, for CPU runs, a small config dict
(``{"model_type": "llama", "hidden_size": 64, ...}``) whose vocabulary and special-token ids are filled in from the
tokenizer.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import torch.nn.functional as F
import yaml
from safetensors import SafetensorError
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from repo_lightning.errors import ConfigError, MissingInputError

DType = Literal["float32", "bfloat16", "float16"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: DType) -> torch.dtype:
    """Map a config string to a ``torch.dtype``, naming the allowed values on a bad one."""
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def _scalar(value):
    """A ``model_config`` value as YAML reads it, if it came as a string.

    ``model_config`` is a free-form dict, so jsonargparse passes a command-line override such as
    ``--model.init_args.model_config.num_hidden_layers=4`` through as the string ``"4"``, which a Hugging Face config
    refuses (or, worse, keeps). Strings that read as a number, a boolean or null become that; ``"1e-5"`` (a float
    that YAML 1.1 reads as a string) becomes a float; other strings (``"silu"``) stay as they are.
    """
    if not isinstance(value, str):
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if isinstance(parsed, str):
        try:
            return float(parsed) if any(c.isdigit() for c in parsed) else parsed
        except ValueError:
            return parsed
    return parsed if isinstance(parsed, int | float | bool) or parsed is None else value


def config_from_dict(model_config: dict, tokenizer: PreTrainedTokenizerBase, num_labels: int | None = None):
    """A Hugging Face config from a ``model_config`` dict, its vocabulary and special ids from ``tokenizer``."""
    settings = {key: _scalar(value) for key, value in model_config.items()}
    model_type = settings.pop("model_type", None)
    if model_type is None:
        raise ConfigError("model.init_args.model_config needs a 'model_type' key (for example 'llama')")
    settings.setdefault("vocab_size", len(tokenizer))
    settings.setdefault("pad_token_id", tokenizer.pad_token_id)
    settings.setdefault("bos_token_id", tokenizer.bos_token_id)
    settings.setdefault("eos_token_id", tokenizer.eos_token_id)
    if num_labels is not None:
        settings["num_labels"] = num_labels
    return AutoConfig.for_model(model_type, **settings)


def _check_source(model_name_or_path: str | None, model_config: dict | None) -> None:
    if (model_name_or_path is None) == (model_config is None):
        raise ConfigError(
            "model.init_args: set exactly one of model_name_or_path (hub name or local folder) and model_config (a "
            f"dict with 'model_type' to build a fresh model); got model_name_or_path={model_name_or_path!r}, "
            f"model_config={model_config!r}"
        )


def _from_pretrained(auto_cls, name_or_path: str, **kwargs):
    try:
        return auto_cls.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:  # SafetensorError: a truncated or corrupt weights file
        where = "local folder" if os.path.sep in name_or_path or name_or_path.startswith(".") else "hub name"
        raise MissingInputError(
            f"could not load a model from {name_or_path!r} ({where}): expected a folder written by "
            f"save_pretrained or a reachable Hugging Face hub repository ({err})"
        ) from err


class FusedGELUTanh(nn.Module):
    """``gelu_new`` (GPT-2's tanh-approximated GELU) as one fused kernel: ``F.gelu(x, approximate="tanh")``.

    The same function as transformers' ``NewGELUActivation``, which spells it out in seven elementwise ops (each with
    its own output tensor and backward node); the results differ only by float rounding (about 1e-7 in float32).
    On a 2-core CPU a forward + backward over ``[384, 1024]`` takes about 0.8 ms instead of 1.7 ms.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Apply the activation."""
        return F.gelu(input, approximate="tanh")


def fuse_activations(model: nn.Module) -> nn.Module:
    """Swap every ``NewGELUActivation`` submodule for :class:`FusedGELUTanh`, in place; returns the model.

    Weights, config and exports are unchanged (the config still says ``gelu_new``), so a model saved from here loads
    anywhere as before. Models with other activations (Llama's SiLU is already one kernel) are left alone.
    """
    try:
        from transformers.activations import NewGELUActivation
    except ImportError:  # pragma: no cover - every supported transformers has it
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, FusedGELUTanh())
    return model


def load_causal_lm(
    tokenizer: PreTrainedTokenizerBase,
    model_name_or_path: str | None = None,
    model_config: dict | None = None,
    dtype: DType = "float32",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    fused_activations: bool = True,
) -> PreTrainedModel:
    """Load or build a causal language model.

    Args:
        tokenizer: The tokenizer the model is used with (sizes a model built from ``model_config``).
        model_name_or_path: Hugging Face hub name or local folder.
        model_config: Config dict with ``model_type`` for a freshly initialised model.
        dtype: Parameter dtype.
        trust_remote_code: Allow model code from the hub (off unless configured).
        attn_implementation: ``eager``, ``sdpa`` or ``flash_attention_2``; ``None`` keeps the library default.
        fused_activations: Run ``gelu_new`` as one fused kernel (:func:`fuse_activations`; equal up to rounding).

    Returns:
        The model, in train mode.
    """
    _check_source(model_name_or_path, model_config)
    kwargs = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if model_name_or_path is not None:
        model = _from_pretrained(AutoModelForCausalLM, model_name_or_path, **kwargs)
    else:
        model = AutoModelForCausalLM.from_config(config_from_dict(model_config, tokenizer, None), **kwargs)
    if fused_activations:
        fuse_activations(model)
    return model.train()


def load_score_model(
    tokenizer: PreTrainedTokenizerBase,
    model_name_or_path: str | None = None,
    model_config: dict | None = None,
    dtype: DType = "float32",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    num_labels: int | None = 1,
    fused_activations: bool = True,
) -> PreTrainedModel:
    """Load or build a score model (``AutoModelForSequenceClassification``), one output per ensemble head.

    Loading from a causal-LM folder (the SFT export) keeps the backbone and initialises a fresh score head.
    ``num_labels=None`` keeps the saved model's number of heads (a cost-model ensemble scores with all of them);
    ``num_labels=1`` from a saved ensemble keeps the backbone and gives the one head the mean of the saved heads
    (a critic initialised from an ensemble cost model). Other arguments as in :func:`load_causal_lm`.
    """
    _check_source(model_name_or_path, model_config)
    kwargs = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if model_name_or_path is not None:
        saved = _from_pretrained(AutoConfig, model_name_or_path, trust_remote_code=trust_remote_code)
        is_score_model = any(a.endswith("ForSequenceClassification") for a in (saved.architectures or []))
        heads = saved.num_labels if is_score_model else (num_labels or 1)
        model = _from_pretrained(AutoModelForSequenceClassification, model_name_or_path, num_labels=heads, **kwargs)
        if num_labels is not None and heads != num_labels:
            if num_labels != 1:
                raise ValueError(
                    f"{model_name_or_path!r} has {heads} score heads; it can be loaded with all of them or as one "
                    f"(their mean), not as {num_labels}"
                )
            _collapse_heads(model)
    else:
        config = config_from_dict(model_config, tokenizer, num_labels or 1)
        model = AutoModelForSequenceClassification.from_config(config, **kwargs)
    if model.config.pad_token_id is None:
        # HF's own pooling finds the last token through pad_token_id; keep it equal to ours.
        model.config.pad_token_id = tokenizer.pad_token_id
    if fused_activations:
        fuse_activations(model)
    return model.train()


def _collapse_heads(model: PreTrainedModel) -> None:
    """Replace an ``E``-output score head by one output, the mean of the ``E`` heads."""
    head = score_head(model)
    single = nn.Linear(head.in_features, 1, bias=head.bias is not None, dtype=head.weight.dtype)
    with torch.no_grad():
        single.weight.copy_(head.weight.mean(0, keepdim=True))
        if head.bias is not None:
            single.bias.copy_(head.bias.mean(0, keepdim=True))
    model.score = single
    model.config.num_labels = 1
    model.num_labels = 1


def append_score_head(model: PreTrainedModel, keep_as: int = 0) -> None:
    """Give a one-output score model a second output: the saved head becomes output ``keep_as``, the other starts at 0.

    The shared critic (``PolicyModule(critics="shared")``): one backbone, a reward value (output 0) and a cost value
    (output 1); the backbone and one head come from one saved model. The new output reads 0 everywhere at the start
    (zero weights and bias) rather than a head trained on another backbone's features.
    """
    head = score_head(model)
    if head.out_features != 1:
        raise ValueError(f"a shared critic starts from a one-output score model, got {head.out_features} outputs")
    if keep_as not in (0, 1):
        raise ValueError(f"keep_as must be 0 or 1, got {keep_as}")
    wide = nn.Linear(head.in_features, 2, bias=head.bias is not None, dtype=head.weight.dtype)
    wide = wide.to(head.weight.device)
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[keep_as].copy_(head.weight[0])
        if head.bias is not None:
            wide.bias.zero_()
            wide.bias[keep_as].copy_(head.bias[0])
    model.score = wide
    model.config.num_labels = 2
    model.num_labels = 2


def score_head(model: PreTrainedModel) -> nn.Module:
    """Return the linear head of a sequence-classification model (``score`` on decoder-only models)."""
    head = getattr(model, "score", None)
    if head is None:
        raise TypeError(
            f"{type(model).__name__} has no 'score' head; per-token values need a decoder-only "
            "*ForSequenceClassification model (Llama, Qwen, Mistral, GPT-2, GPT-NeoX, ...)"
        )
    return head


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as ``generate`` assigns them: ``[B, L]`` -> ``[B, L]``."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Score head applied at every position: ``[B, L]`` ids -> ``[B, L]`` float32 scores (critic values).

    A model with ``E > 1`` heads (an ensemble) gives ``[B, L, E]``.

    The model runs through its own (root) ``forward`` and the head's per-position output is read with a hook: a
    model sharded with FSDP2 gathers its weights in the hooks of the modules it is called through, so calling the
    backbone and head separately would find the root's weights (embeddings, head) still sharded.
    """
    captured: list[torch.Tensor] = []
    handle = score_head(model).register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
    finally:
        handle.remove()
    scores = captured[0].float()
    return scores.squeeze(-1) if scores.shape[-1] == 1 else scores


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended token of each row: ``[B, L]`` -> ``[B]`` (works for left and right padding)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def sequence_scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar score of each sequence, read at its last attended token: ``[B, L]`` -> ``[B]`` (``[B, E]``) float32.

    This is the project's one score readout: reward/cost training, rollout scoring and evaluation all use it.
    It equals ``model(input_ids, attention_mask).logits[:, 0]`` for right-padded input whenever the tokenizer's
    pad token differs from eos, and is also correct for left-padded input (positions skip the padding). When pad
    == eos (Llama-2 and other tokenizers without a pad token), Hugging Face's pooling skips every eos as padding
    and reads the token before the final eos; this function reads the eos itself, as the model was trained.
    """
    scores = token_scores(model, input_ids, attention_mask)
    rows = torch.arange(scores.shape[0], device=scores.device)
    return scores[rows, last_token_index(attention_mask)]  # [B], or [B, E] for an ensemble


def disable_dropout(model: nn.Module) -> nn.Module:
    """Turn off every dropout of a model in place (its config, and so its export, is left as it was); returns it.

    The RL stage reads the rollout's old log-probabilities and values in one pass and the PPO update's new ones in
    another; with dropout active the two differ by noise alone (up to 0.12 nats on a GPT-2 with p = 0.1), which
    biases the ratio and the value clip. TRL and OpenRLHF switch dropout off for the same reason. Covers
    ``nn.Dropout`` modules (GPT-2's residual, embedding and attention dropout) and the float ``attention_dropout``
    that Llama-style attention passes to its kernel.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Put a model in eval mode with every parameter frozen; returns it."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model
