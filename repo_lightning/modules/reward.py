"""Stage 1: the reward (helpfulness preference) model, algorithm.md section 3."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torchmetrics.classification import BinaryAccuracy

from repo_lightning.data.records import PreferenceBatch
from repo_lightning.finite_guard import FiniteGuard, OnNonFinite, guard_gradients, guard_loss, model_source
from repo_lightning.models.backbone import DType, load_score_model
from repo_lightning.models.export import export_from_trainer
from repo_lightning.models.lora import LoRA
from repo_lightning.models.sharding import Sharding
from repo_lightning.modules.model_setup import build_stage_model
from repo_lightning.modules.optimization import optimizer_with_warmup
from repo_lightning.modules.scoring import pair_scores, pick
from repo_lightning.rl.losses import reward_model_loss
from repo_lightning.validation import check_checkpoint_matches, validate_stage_args


class RewardModule(L.LightningModule):
    """Bradley-Terry reward model ``R(x, y)`` trained on ``better_response_id``.

    Args:
        model_name_or_path: Start weights (normally the SFT export); the score head is new.
        model_config: Or a config dict (with ``model_type``) for a fresh model.
        tokenizer_path: Tokenizer folder or hub name (linked from ``data.tokenizer`` by the CLI).
        dtype: Parameter dtype.
        trust_remote_code: Allow hub model code.
        attn_implementation: Attention kernel; ``None`` keeps the default.
        gradient_checkpointing: Recompute activations in the backward pass.
        lora: Train LoRA adapters (and a score head) instead of every weight; ``None`` trains all (needs peft).
        sharding: FSDP2 layout under ``ModelParallelStrategy`` (ignored by other strategies).
        regularization: Weight of the score-magnitude penalty ``reg * (R_w^2 + R_l^2) / 2``.
        oracle_margin: In ``test`` with ground truth (SafetyWorld), the oracle accuracy counts pairs whose true
            rewards differ by at least this much.
        optimizer: Optimizer factory.
        warmup_steps: Linear warm-up steps.
        on_nonfinite: On a NaN or infinite training loss or gradient: ``raise`` (stop, naming it) or ``skip``
            the batch (counted, logged as ``train/nonfinite_skipped``).
        export_dir: Where the model is written in Hugging Face layout at the end of ``fit``
            (``AutoModelForSequenceClassification.from_pretrained(path)`` loads it with ``num_labels=1``).
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
        regularization: float = 0.0,
        oracle_margin: float = 1.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_steps: int = 0,
        on_nonfinite: OnNonFinite = "raise",
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        validate_stage_args(optimizer, warmup_steps, regularization, oracle_margin)
        self.save_hyperparameters(ignore=["optimizer"])
        self.finite_guard = FiniteGuard(on_nonfinite, model_source(self, "model"))
        self.optimizer = optimizer
        self.model = None
        self.tokenizer = None
        # Training metrics are synced on every step so each rank logs the global value (validation and test
        # metrics are synced when computed at the epoch end).
        self.accuracy = nn.ModuleDict(
            {s: BinaryAccuracy(dist_sync_on_step=s == "train_") for s in ("train_", "val_", "test_")}
        )
        self.oracle_accuracy = BinaryAccuracy()

    def configure_model(self) -> None:
        """Build the score model once, before sharding and optimizer creation."""
        if self.model is not None:
            return
        self.tokenizer, self.model = build_stage_model(self.hparams, self.device_mesh, load_score_model)

    def forward(self, batch: PreferenceBatch) -> torch.Tensor:
        """Rewards of both responses of each pair, ``[B, 2]``."""
        return pair_scores(self.model, batch)

    def _step(self, batch: PreferenceBatch, split: str) -> tuple[torch.Tensor | None, torch.Tensor]:
        scores = self(batch)
        better, worse = pick(scores, batch.better_response_id)
        loss, stats = reward_model_loss(better, worse, self.hparams.regularization)
        if split == "train" and not guard_loss(self, self.finite_guard, loss):
            return None, scores
        metric = self.accuracy[f"{split}_"]
        metric((better > worse).long(), torch.ones_like(better, dtype=torch.long))
        size = batch.num_pairs
        self.log(f"{split}/loss", loss, prog_bar=True, sync_dist=True, batch_size=size)
        self.log(f"{split}/accuracy", metric, prog_bar=True, batch_size=size)
        self.log(f"{split}/reward_mean", scores.mean(), sync_dist=True, batch_size=size)
        self.log(f"{split}/margin", stats["margin"], sync_dist=True, batch_size=size)
        return loss, scores

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> torch.Tensor | None:
        """One reward-model step (``None``, no update, for a skipped non-finite batch)."""
        return self._step(batch, "train")[0]

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        """Held-out preference accuracy."""
        self._step(batch, "val")

    def test_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        """Test accuracy; with ground truth also agreement with the oracle ordering on clear pairs."""
        _, scores = self._step(batch, "test")
        if batch.true_rewards is None:
            return
        gap = batch.true_rewards[:, 0] - batch.true_rewards[:, 1]
        clear = gap.abs() >= self.hparams.oracle_margin
        if clear.any():
            agree = ((scores[:, 0] - scores[:, 1]) * gap)[clear] > 0
            self.oracle_accuracy(agree.long(), torch.ones_like(agree, dtype=torch.long))
            self.log("test/oracle_accuracy", self.oracle_accuracy, batch_size=int(clear.sum()))

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
        """Write the reward model and tokenizer in Hugging Face layout."""
        if self.hparams.export_dir:
            export_from_trainer(self.trainer, self.model, self.tokenizer, self.hparams.export_dir, {"stage": "reward"})
