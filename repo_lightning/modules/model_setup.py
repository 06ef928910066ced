"""Building a stage's trained model from its module's hyperparameters (a function the modules compose).

Every trained network goes through the same steps: load (hub name, folder or config dict), LoRA adapters if
configured, activation checkpointing if configured, then FSDP2 sharding under ``ModelParallelStrategy``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from repo_lightning.models.lora import apply_lora
from repo_lightning.models.sharding import enable_gradient_checkpointing, shard_models
from repo_lightning.text.tokenizers import load_tokenizer
from repo_lightning.validation import check_vocabulary


def prepare_trained_model(device_mesh, model: PreTrainedModel, hp: Mapping) -> PreTrainedModel:
    """LoRA and activation checkpointing as ``hp`` says, then sharding (``ModelParallelStrategy`` only).

    Args:
        device_mesh: The LightningModule's ``device_mesh`` (``None`` unless ``ModelParallelStrategy``).
        model: The freshly loaded model.
        hp: Holds ``lora``, ``gradient_checkpointing`` and ``sharding``.
    """
    if hp["lora"] is not None:
        apply_lora(model, hp["lora"])
    if hp["gradient_checkpointing"]:
        enable_gradient_checkpointing(model)
    shard_models(device_mesh, [model], sharding=hp["sharding"])
    return model


def build_stage_model(
    hp: Mapping, device_mesh, loader: Callable[..., PreTrainedModel]
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Tokenizer and prepared model of an SFT, reward or cost module.

    Args:
        hp: The module's hyperparameters: model source, dtype, LoRA, checkpointing and sharding.
        device_mesh: The module's ``device_mesh`` (``None`` unless ``ModelParallelStrategy``).
        loader: :func:`~repo_lightning.models.backbone.load_causal_lm` or ``load_score_model``.
    """
    if hp["tokenizer_path"] is None:
        raise ValueError("model.tokenizer_path is not set (the CLI links it from data.tokenizer)")
    tokenizer = load_tokenizer(hp["tokenizer_path"], hp["trust_remote_code"])
    model = loader(
        tokenizer,
        hp["model_name_or_path"],
        hp["model_config"],
        hp["dtype"],
        hp["trust_remote_code"],
        hp["attn_implementation"],
    )
    check_vocabulary(
        "model.init_args.model_name_or_path", hp["model_name_or_path"], model, tokenizer, hp["tokenizer_path"]
    )
    return tokenizer, prepare_trained_model(device_mesh, model, hp)
