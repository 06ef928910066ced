"""A stage's progress as a two-number file, for the pipeline's one-line-per-stage display.

The pipeline runs each stage as a subprocess with its output in a log file, where Lightning's progress bar cannot
be read back (Rich draws nothing off a terminal). ``python -m repo_lightning`` adds this callback when
``REPO_LIGHTNING_PROGRESS_FILE`` is set (:mod:`repo_lightning.console`), and the pipeline polls that file.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L


class StageProgress(L.Callback):
    """Write ``"<done> <total>"`` batches of the running ``fit`` or ``test`` to ``path`` after every batch.

    Batches, not optimizer steps: the policy stage makes many optimizer steps per batch (manual optimization).

    Args:
        path: The progress file; replaced atomically, so a reader never sees half a line.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._done = 0

    def _write(self, trainer: L.Trainer, total: float) -> None:
        self._done += 1
        if not trainer.is_global_zero or total in (0, float("inf")):
            return
        staging = self.path.with_name(self.path.name + ".tmp")
        staging.write_text(f"{self._done} {int(total)}\n")
        os.replace(staging, self.path)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Count the batches of this ``fit`` from zero."""
        self._done = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        """One more training batch of ``trainer.estimated_stepping_batches``."""
        self._write(trainer, trainer.estimated_stepping_batches * trainer.accumulate_grad_batches)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Count the batches of this ``test`` from zero."""
        self._done = 0

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        """One more test batch."""
        self._write(trainer, sum(trainer.num_test_batches))
