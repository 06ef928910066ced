"""Stage 2: the cost (harm) model with a sign term, algorithm.md section 4."""

from __future__ import annotations

import functools

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy

from repo_lightning.data.records import PreferenceBatch
from repo_lightning.errors import ConfigError
from repo_lightning.finite_guard import FiniteGuard, OnNonFinite, guard_gradients, guard_loss, model_source
from repo_lightning.models.backbone import DType, load_score_model
from repo_lightning.models.export import export_from_trainer
from repo_lightning.models.lora import LoRA
from repo_lightning.models.sharding import Sharding
from repo_lightning.modules.model_setup import build_stage_model
from repo_lightning.modules.optimization import optimizer_with_warmup
from repo_lightning.modules.scoring import pair_scores, pick
from repo_lightning.rl.losses import cost_model_loss
from repo_lightning.validation import check_checkpoint_matches, validate_stage_args

_SPLITS = ("train_", "val_", "test_")


class CostModule(L.LightningModule):
    """Cost model ``C(x, y)`` (C > 0 unsafe) trained on ``safer_response_id`` and the absolute safety labels.

    The sign term pins ``C <= 0`` to safe responses, which makes ``C(x, y) <= 0`` the per-response safety test
    that RePO's rectified constraint relies on.

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
        regularization: Weight of the score-magnitude penalty.
        oracle_margin: In ``test`` with ground truth, the oracle ranking accuracy counts pairs whose true costs
            differ by at least this much.
        ensemble_size: Number of cost heads on the shared backbone (``E``). With ``E > 1`` each head is trained
            on its own bootstrap resample of every batch (Poisson(1) weight per pair and head, seeded by epoch and
            batch), the export has ``E`` outputs, metrics use the heads' mean, and the policy stage aggregates
            them as ``model.scoring`` says (e.g. conservatively, mean + kappa * std).
        optimizer: Optimizer factory.
        warmup_steps: Linear warm-up steps.
        on_nonfinite: On a NaN or infinite training loss or gradient: ``raise`` (stop, naming it) or ``skip``
            the batch (counted, logged as ``train/nonfinite_skipped``).
        export_dir: Where the model is written in Hugging Face layout at the end of ``fit``.
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
        oracle_margin: float = 0.5,
        ensemble_size: int = 1,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_steps: int = 0,
        on_nonfinite: OnNonFinite = "raise",
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        validate_stage_args(optimizer, warmup_steps, regularization, oracle_margin)
        if ensemble_size < 1:
            raise ConfigError(f"model.init_args.ensemble_size must be >= 1, got {ensemble_size}")
        self.save_hyperparameters(ignore=["optimizer"])
        self.finite_guard = FiniteGuard(on_nonfinite, model_source(self, "model"))
        self.optimizer = optimizer
        self.model = None
        self.tokenizer = None
        # Training metrics are synced on every step so each rank logs the global value (validation and test
        # metrics are synced when computed at the epoch end).
        self.accuracy = nn.ModuleDict({s: BinaryAccuracy(dist_sync_on_step=s == "train_") for s in _SPLITS})
        self.sign_accuracy = nn.ModuleDict({s: BinaryAccuracy(dist_sync_on_step=s == "train_") for s in _SPLITS})
        self.cost_mean = nn.ModuleDict({s: MeanMetric(dist_sync_on_step=s == "train_") for s in _SPLITS})
        self.unsafe_response_rate = nn.ModuleDict({s: MeanMetric(dist_sync_on_step=s == "train_") for s in _SPLITS})
        self.oracle_sign_accuracy = BinaryAccuracy()
        self.oracle_accuracy = BinaryAccuracy()

    def configure_model(self) -> None:
        """Build the score model once, before sharding and optimizer creation."""
        if self.model is not None:
            return
        loader = functools.partial(load_score_model, num_labels=self.hparams.ensemble_size)
        self.tokenizer, self.model = build_stage_model(self.hparams, self.device_mesh, loader)

    def forward(self, batch: PreferenceBatch) -> torch.Tensor:
        """Costs of both responses of each pair, ``[B, 2]`` (the mean of the heads of an ensemble)."""
        heads = pair_scores(self.model, batch)
        return heads.mean(-1) if heads.dim() == 3 else heads

    def _bootstrap_weights(self, num_pairs: int, batch_idx: int) -> torch.Tensor:
        """``[B, E]`` Poisson(1) weights, seeded by (epoch, batch): a resumed run draws the same ones."""
        generator = torch.Generator().manual_seed(1_000_003 * self.current_epoch + batch_idx)
        rates = torch.ones(num_pairs, self.hparams.ensemble_size)
        return torch.poisson(rates, generator=generator).to(self.device)

    def _step(self, batch: PreferenceBatch, split: str, batch_idx: int = 0) -> tuple[torch.Tensor | None, torch.Tensor]:
        heads = pair_scores(self.model, batch)
        heads = heads if heads.dim() == 3 else heads.unsqueeze(-1)  # [B, 2, E]
        costs = heads.mean(-1)
        safer_is_safe, unsafer_is_safe = pick(batch.is_safe.long(), batch.safer_response_id)
        weights = None
        if heads.shape[-1] > 1 and split == "train":
            weights = self._bootstrap_weights(batch.num_pairs, batch_idx)
        losses = []
        for e in range(heads.shape[-1]):
            safer, unsafer = pick(heads[..., e], batch.safer_response_id)
            head_loss, _ = cost_model_loss(
                safer,
                unsafer,
                safer_is_safe.bool(),
                unsafer_is_safe.bool(),
                self.hparams.regularization,
                None if weights is None else weights[:, e],
            )
            losses.append(head_loss)
        loss = torch.stack(losses).mean()
        if split == "train" and not guard_loss(self, self.finite_guard, loss):
            return None, costs
        safer, unsafer = pick(costs, batch.safer_response_id)
        key = f"{split}_"
        self.accuracy[key]((unsafer > safer).long(), torch.ones_like(safer, dtype=torch.long))
        self.sign_accuracy[key]((costs > 0).long().flatten(), (~batch.is_safe).long().flatten())
        self.cost_mean[key](costs.flatten())
        self.unsafe_response_rate[key]((costs > 0).float().flatten())
        size = batch.num_pairs
        self.log(f"{split}/loss", loss, prog_bar=True, sync_dist=True, batch_size=size)
        self.log(f"{split}/accuracy", self.accuracy[key], prog_bar=True, batch_size=size)
        self.log(f"{split}/sign_accuracy", self.sign_accuracy[key], prog_bar=True, batch_size=size)
        self.log(f"{split}/cost_mean", self.cost_mean[key], batch_size=size)
        self.log(f"{split}/unsafe_response_rate", self.unsafe_response_rate[key], batch_size=size)
        return loss, costs

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> torch.Tensor | None:
        """One cost-model step (``None``, no update, for a skipped non-finite batch)."""
        return self._step(batch, "train", batch_idx)[0]

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        """Held-out ranking and sign accuracy."""
        self._step(batch, "val")

    def test_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        """Test metrics; with ground truth also the sign agreement with ``C*`` and the oracle ranking."""
        _, costs = self._step(batch, "test")
        if batch.true_costs is None:
            return
        self.oracle_sign_accuracy((costs > 0).long().flatten(), (batch.true_costs > 0).long().flatten())
        self.log("test/oracle_sign_accuracy", self.oracle_sign_accuracy, batch_size=costs.numel())
        gap = batch.true_costs[:, 0] - batch.true_costs[:, 1]
        clear = gap.abs() >= self.hparams.oracle_margin
        if clear.any():
            agree = ((costs[:, 0] - costs[:, 1]) * gap)[clear] > 0
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
        """Write the cost model and tokenizer in Hugging Face layout."""
        if self.hparams.export_dir:
            metadata = {"stage": "cost", "ensemble_size": self.hparams.ensemble_size}
            export_from_trainer(self.trainer, self.model, self.tokenizer, self.hparams.export_dir, metadata)
