"""Writing trained models in the Hugging Face layout, atomically.

The model and tokenizer are written to a temporary sibling folder which then replaces the target in one rename, so
an interrupted export never leaves a half-written model where the next stage will look for one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def export_pretrained(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    export_dir: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
    metadata: dict | None = None,
) -> Path:
    """Save ``model`` and ``tokenizer`` with ``save_pretrained`` into ``export_dir``, replacing it atomically.

    Args:
        model: The Hugging Face model to save.
        tokenizer: Its tokenizer.
        export_dir: Target folder; its parent is created.
        state_dict: Full (consolidated) weights to save instead of ``model.state_dict()``, for sharded models.
        metadata: Extra JSON written to ``repo_lightning.json`` beside the weights (stage, metrics, ...).

    Returns:
        The export folder.
    """
    export_dir = Path(export_dir)
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{export_dir.name}-", dir=export_dir.parent))
    try:
        model.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if metadata is not None:
            (staging / "repo_lightning.json").write_text(json.dumps(metadata, indent=2, sort_keys=True))
        if export_dir.exists():
            backup = export_dir.with_name(f".{export_dir.name}-old")
            shutil.rmtree(backup, ignore_errors=True)
            export_dir.rename(backup)
            staging.rename(export_dir)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            staging.rename(export_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return export_dir


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Full, unsharded weights of ``model`` on the CPU.

    For a model sharded with FSDP2 (``fully_shard``: parameters are DTensors) this is a collective: every rank
    must call it. Returns ``None`` for an unsharded model, where ``save_pretrained`` reads the weights itself.
    """
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_from_trainer(
    trainer,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    export_dir: str | Path,
    metadata: dict,
) -> Path | None:
    """Export once per job: every rank gathers the full weights (a collective when sharded), rank 0 writes.

    Args:
        trainer: The running ``lightning.Trainer`` (for the rank and the barrier).
        model: The trained Hugging Face model (possibly sharded).
        tokenizer: Its tokenizer.
        export_dir: Target folder.
        metadata: Written to ``repo_lightning.json``.

    Returns:
        The export folder on rank 0, ``None`` elsewhere.
    """
    state = full_state_dict(model)
    written = None
    if trainer.is_global_zero:
        written = export_pretrained(model, tokenizer, export_dir, state_dict=state, metadata=metadata)
    trainer.strategy.barrier("repo_lightning_export")
    return written
