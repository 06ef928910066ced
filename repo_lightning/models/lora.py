"""LoRA adapters (Hu et al. 2021) on trained models, and merging them back into plain weights for export.

The adapters are injected with ``peft.inject_adapter_in_model`` (an optional dependency: ``pip install
repo_lightning[lora]``), which leaves the model a plain Hugging Face model whose adapted linear layers hold
``base_layer``, ``lora_A.default`` and ``lora_B.default``. Only the adapters train, plus the score head of a score
model (it starts fresh or from a reward model and has no pretrained counterpart to adapt). Exports merge
``W = W_0 + (alpha / r) B A`` (Hu et al. eq. 3), so the next stage loads a plain model without peft.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_ADAPTER = "default"


@dataclass(frozen=True)
class LoRA:
    """LoRA settings of the trained models of a stage.

    Attributes:
        rank: ``r``, the rank of each update ``B A``.
        alpha: Scale numerator; the update is multiplied by ``alpha / rank``.
        dropout: Dropout on the adapter's input.
        target_modules: Names of the linear layers to adapt (e.g. ``[q_proj, v_proj]``); ``None`` adapts every
            linear layer of the transformer blocks.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] | None = None

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")


def as_lora(value: LoRA | dict | None) -> LoRA | None:
    """A :class:`LoRA` from the module argument, which is a dict when the hyperparameters come from a config."""
    return LoRA(**value) if isinstance(value, dict) else value


def _head_names(model: nn.Module) -> list[str]:
    heads = {id(m) for m in (model.get_output_embeddings(), getattr(model, "score", None)) if m is not None}
    return [name for name, m in model.named_modules() if id(m) in heads]


def apply_lora(model: nn.Module, lora: LoRA | dict) -> nn.Module:
    """Inject LoRA adapters into ``model`` (in place) and freeze everything but them and a score head.

    Args:
        model: A Hugging Face causal LM or score model.
        lora: The adapter settings.

    Returns:
        ``model``.
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as err:
        raise ImportError("model.lora needs peft: pip install 'repo_lightning[lora]'") from err
    lora = as_lora(lora)
    heads = _head_names(model)
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules) if lora.target_modules is not None else "all-linear",
        exclude_modules=heads or None,
    )
    inject_adapter_in_model(config, model, adapter_name=_ADAPTER)
    score = getattr(model, "score", None)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".lora_" in name)
    if score is not None:
        score.requires_grad_(True)
    return model


def lora_scalings(model: nn.Module) -> dict[str, float]:
    """``{module name: alpha / r}`` of every adapted layer of ``model`` (empty without adapters)."""
    return {
        name: float(module.scaling[_ADAPTER])
        for name, module in model.named_modules()
        if isinstance(getattr(module, "scaling", None), dict) and _ADAPTER in module.scaling
    }


def merge_lora_state_dict(state_dict: dict[str, torch.Tensor], scalings: dict[str, float]) -> dict[str, torch.Tensor]:
    """Fold adapters into their base weights and drop the adapter keys: plain Hugging Face names.

    For each adapted layer ``m``: ``m.weight = m.base_layer.weight + s * m.lora_B.default.weight @
    m.lora_A.default.weight`` with ``s = scalings[m]``; ``m.base_layer.bias`` becomes ``m.bias``.

    Args:
        state_dict: Full (unsharded) weights of a model with adapters.
        scalings: ``alpha / r`` of each adapted layer, from :func:`lora_scalings`.

    Returns:
        A new state dict without adapter keys.
    """
    merged: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if ".lora_" in key:
            continue
        if ".base_layer." not in key:
            merged[key] = value
            continue
        layer, _, leaf = key.partition(".base_layer.")
        if leaf == "weight" and layer in scalings:
            a = state_dict[f"{layer}.lora_A.{_ADAPTER}.weight"].float()
            b = state_dict[f"{layer}.lora_B.{_ADAPTER}.weight"].float()
            value = (value.float() + scalings[layer] * (b @ a)).to(value.dtype)
        merged[f"{layer}.{leaf}"] = value
    return merged
