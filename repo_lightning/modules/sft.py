"""Stage 0: supervised fine-tuning of the start model on prompt/response pairs (algorithm.md section 2)."""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable

from repo_lightning.data.records import SFTBatch
from repo_lightning.finite_guard import FiniteGuard, OnNonFinite, guard_gradients, guard_loss, model_source
from repo_lightning.models.backbone import DType, load_causal_lm
from repo_lightning.models.export import export_from_trainer
from repo_lightning.models.lora import LoRA
from repo_lightning.models.sharding import Sharding
from repo_lightning.modules.model_setup import build_stage_model
from repo_lightning.modules.optimization import optimizer_with_warmup
from repo_lightning.rl.losses import sft_loss
from repo_lightning.validation import check_checkpoint_matches, validate_stage_args


class SFTModule(L.LightningModule):
    """Causal-LM negative log-likelihood on response tokens only.

    Args:
        model_name_or_path: Hugging Face hub name or local folder of the start model.
        model_config: Or a config dict (with ``model_type``) to build a fresh model, for CPU runs.
        tokenizer_path: Tokenizer folder or hub name (linked from ``data.tokenizer`` by the CLI).
        dtype: Parameter dtype (``bfloat16`` for large models; pair it with ``trainer.precision``).
        trust_remote_code: Allow hub model code.
        attn_implementation: Attention kernel (``sdpa``, ``eager``, ``flash_attention_2``); ``None``: default.
        gradient_checkpointing: Recompute activations in the backward pass to save memory.
        lora: Train LoRA adapters (and a score head) instead of every weight; ``None`` trains all (needs peft).
        sharding: FSDP2 layout under ``ModelParallelStrategy`` (ignored by other strategies).
        optimizer: Optimizer factory, e.g. ``{class_path: torch.optim.AdamW, init_args: {lr: 1e-3}}``.
        warmup_steps: Linear learning-rate warm-up steps.
        on_nonfinite: On a NaN or infinite training loss or gradient: ``raise`` (stop, naming it) or ``skip``
            the batch (counted, logged as ``train/nonfinite_skipped``).
        export_dir: Where the model and tokenizer are written in Hugging Face layout at the end of ``fit``.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        model_config: dict | None = None,
        tokenizer_path: str | None = None,
        dtype: DType = "float32",
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        lora: LoRA | None = None,
        sharding: Sharding | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_steps: int = 0,
        on_nonfinite: OnNonFinite = "raise",
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        validate_stage_args(optimizer, warmup_steps)
        self.save_hyperparameters(ignore=["optimizer"])
        self.finite_guard = FiniteGuard(on_nonfinite, model_source(self, "model"))
        self.optimizer = optimizer
        self.model = None
        self.tokenizer = None

    def configure_model(self) -> None:
        """Build the model (called by the Trainer, once, before sharding or optimizer creation)."""
        if self.model is not None:
            return
        self.tokenizer, self.model = build_stage_model(self.hparams, self.device_mesh, load_causal_lm)

    def forward(self, batch: SFTBatch) -> torch.Tensor:
        """Logits ``[B, L, V]``."""
        return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits

    def training_step(self, batch: SFTBatch, batch_idx: int) -> torch.Tensor | None:
        """One SFT step (``None``, no update, for a skipped non-finite batch)."""
        loss = sft_loss(self(batch), batch.labels)
        if not guard_loss(self, self.finite_guard, loss):
            return None
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch.input_ids.shape[0])
        return loss

    def validation_step(self, batch: SFTBatch, batch_idx: int) -> None:
        """Held-out response NLL and perplexity."""
        loss = sft_loss(self(batch), batch.labels)
        size = batch.input_ids.shape[0]
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=size)
        self.log("val/perplexity", math.exp(min(loss.item(), 50.0)), sync_dist=True, batch_size=size)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop on (or skip) non-finite gradients before they reach the weights."""
        guard_gradients(self, self.finite_guard, self.model)

    def configure_optimizers(self):
        """Optimizer (and warm-up) from the injected factory."""
        trained = [p for p in self.model.parameters() if p.requires_grad]
        return optimizer_with_warmup(self.optimizer, trained, self.hparams.warmup_steps)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint of another stage or model size stops with one line (``ckpt_path: ...``)."""
        check_checkpoint_matches(self, checkpoint)

    def on_fit_end(self) -> None:
        """Write the fine-tuned model and tokenizer in Hugging Face layout."""
        if self.hparams.export_dir:
            export_from_trainer(self.trainer, self.model, self.tokenizer, self.hparams.export_dir, {"stage": "sft"})
