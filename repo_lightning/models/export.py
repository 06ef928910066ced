"""Writing trained models in the Hugging Face layout, atomically, with a model card.

The model, tokenizer and model card (``README.md``, :mod:`repo_lightning.models.model_card`) are written to a
temporary sibling folder which then replaces the target in one rename, so an interrupted export never leaves a
half-written model where the next stage will look for one.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from repo_lightning.errors import ConfigError, NonFiniteError
from repo_lightning.finite_guard import count_nonfinite, describe
from repo_lightning.models.lora import lora_scalings, merge_lora_state_dict
from repo_lightning.models.model_card import CARD_FILE, render_model_card
from repo_lightning.validation import export_dir_refusal

log = logging.getLogger(__name__)

#: Final logged ``train/...`` figures put on the card (every ``val/...`` figure is).
CARD_TRAIN_METRICS = ("train/loss", "train/accuracy", "train/lambda", "train/dual_statistic")


def export_pretrained(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    export_dir: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
    metadata: dict | None = None,
    card: str | None = None,
) -> Path:
    """Save ``model`` and ``tokenizer`` with ``save_pretrained`` into ``export_dir``, replacing it atomically.

    Args:
        model: The Hugging Face model to save.
        tokenizer: Its tokenizer.
        export_dir: Target folder; its parent is created.
        state_dict: Full (consolidated) weights to save instead of ``model.state_dict()``, for sharded models.
        metadata: Extra JSON written to ``repo_lightning.json`` beside the weights (stage, metrics, ...).
        card: Model card text written to ``README.md`` (see :func:`card_from_trainer`).

    Returns:
        The export folder.

    Raises:
        NonFiniteError: if a weight is NaN or infinite; nothing is written then.
        ConfigError: if ``export_dir`` is a file, or a folder that holds anything but a model export (it would be
            replaced); nothing is written then.
    """
    refuse_nonfinite_weights(state_dict if state_dict is not None else model.state_dict(), export_dir)
    export_dir = Path(export_dir)
    refusal = export_dir_refusal(export_dir)
    if refusal:
        raise ConfigError(f"refusing to export: {refusal}")
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{export_dir.name}-", dir=export_dir.parent))
    try:
        model.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if metadata is not None:
            (staging / "repo_lightning.json").write_text(json.dumps(metadata, indent=2, sort_keys=True))
        if card is not None:
            (staging / CARD_FILE).write_text(card)
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


def refuse_nonfinite_weights(state_dict: dict[str, torch.Tensor], export_dir: str | Path) -> None:
    """Raise, naming the first NaN or infinite tensor, rather than export a model the next stage cannot use."""
    for name, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor) and count_nonfinite(tensor):
            raise NonFiniteError(
                f"refusing to export to {str(export_dir)!r}: non-finite weight {describe(name, tensor)}"
            )


def _cli_command() -> str | None:
    """The command line of this process if it is ``python -m repo_lightning`` (or ``repo-lightning``)."""
    script = Path(sys.argv[0])
    if (script.name == "__main__.py" and script.parent.name == "repo_lightning") or script.name == "repo-lightning":
        return shlex.join(["python", "-m", "repo_lightning", *sys.argv[1:]])
    return None


def _cli_config(trainer) -> str | None:
    """The resolved config of a LightningCLI run (what it saves as ``config.yaml``), or ``None`` outside the CLI."""
    from lightning.pytorch.cli import SaveConfigCallback

    for callback in trainer.callbacks:
        if isinstance(callback, SaveConfigCallback):
            try:
                return callback.parser.dump(callback.config, skip_none=False)
            except Exception as error:  # a card without its config beats a failed export
                warnings.warn(f"model card written without the run's config: {error}", stacklevel=2)
    return None


def card_from_trainer(trainer, metadata: dict) -> str:
    """The model card of an export at the end of ``fit``: ``metadata`` plus what the run knows.

    Adds ``base_model`` (the module's ``actor_path`` or ``model_name_or_path``; else its ``model_config``), ``data``
    (the data module's ``dataset``, ``split``, ``subset``, ``mode``), ``metrics`` (every ``val/...`` figure and
    :data:`CARD_TRAIN_METRICS` from ``trainer.callback_metrics``), ``command`` and the resolved config.
    """
    hparams = dict(getattr(trainer.lightning_module, "hparams", {}))
    card = dict(metadata)
    base_model = hparams.get("actor_path") or hparams.get("model_name_or_path")
    if base_model is not None:
        card.setdefault("base_model", str(base_model))
    elif isinstance(hparams.get("model_config"), dict):
        card.setdefault("model_config", hparams["model_config"])
    datamodule = getattr(trainer, "datamodule", None)
    data = {key: getattr(datamodule, key, None) for key in ("dataset", "split", "subset", "mode")}
    data = {key: value for key, value in data.items() if value is not None}
    if data.get("dataset") == "safetyworld":  # generated, not read: split and subset do not apply
        data = {key: value for key, value in data.items() if key not in ("split", "subset")}
    if data:
        card.setdefault("data", data)
    metrics = {
        key: float(value)
        for key, value in sorted(trainer.callback_metrics.items())
        if (key.startswith("val/") or key in CARD_TRAIN_METRICS) and value.numel() == 1
    }
    if metrics:
        card.setdefault("metrics", metrics)
    command = _cli_command()
    if command is not None:
        card.setdefault("command", command)
    return render_model_card(card, _cli_config(trainer))


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


def fsdp1_full_state_dict(trainer, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Full weights of ``model`` under Lightning's ``FSDPStrategy`` (FSDP1), which wraps the whole LightningModule.

    FSDP1 gathers a full state dict only from its root, so the LightningModule's is gathered (a collective; rank 0
    receives the tensors, on the CPU) and ``model``'s entries are cut out of it. Returns ``None`` under any other
    strategy.
    """
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    root = getattr(trainer.strategy, "model", None)
    if not isinstance(root, FSDP):
        return None
    prefix = next(f"{name}." for name, child in trainer.lightning_module.named_children() if child is model)
    config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, config):
        state = root.state_dict()
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def export_from_trainer(
    trainer,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    export_dir: str | Path,
    metadata: dict,
) -> Path | None:
    """Export once per job: every rank gathers the full weights (a collective when sharded), rank 0 writes.

    Sharded models are consolidated: FSDP2 (``ModelParallelStrategy``) through :func:`full_state_dict`, FSDP1
    (Lightning's ``FSDPStrategy``) through :func:`fsdp1_full_state_dict`.

    LoRA adapters are merged into the weights, so the export is a plain model.

    Args:
        trainer: The running ``lightning.Trainer`` (for the rank and the barrier).
        model: The trained Hugging Face model (possibly sharded).
        tokenizer: Its tokenizer.
        export_dir: Target folder.
        metadata: Written to ``repo_lightning.json`` and, with what the run knows, to the model card ``README.md``
            (:func:`card_from_trainer`).

    Returns:
        The export folder on rank 0, ``None`` elsewhere.
    """
    if trainer.fast_dev_run:  # a smoke test of a few batches must not replace the stage's real export
        if trainer.is_global_zero:
            log.warning("fast_dev_run: the model is not exported to %s", export_dir)
        return None
    state = fsdp1_full_state_dict(trainer, model)
    if state is None:
        state = full_state_dict(model)
    written = None
    if trainer.is_global_zero:
        card = card_from_trainer(trainer, metadata)
        scalings = lora_scalings(model)
        if scalings:
            state = merge_lora_state_dict(state if state is not None else model.state_dict(), scalings)
        written = export_pretrained(model, tokenizer, export_dir, state_dict=state, metadata=metadata, card=card)
    trainer.strategy.barrier("repo_lightning_export")
    return written
