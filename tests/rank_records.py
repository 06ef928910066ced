"""A test-only callback that writes what each rank saw and logged, so tests can compare ranks after the run.

Used by ``tests/test_distributed.py`` through ``trainer.callbacks`` (``class_path: rank_records.RankRecords``) in
configs run as subprocesses with ``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


class RankRecords(Callback):
    """After every training batch: the step, a hash of the rank's batch, the ``train/`` metrics and the multiplier.

    At the end of ``fit`` each rank writes ``<out_dir>/rank<global_rank>.json``.

    Args:
        out_dir: Folder of the per-rank files.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        """Record this rank's view of the step."""
        record = {
            "global_step": trainer.global_step,
            "batch": hashlib.md5(batch.input_ids.cpu().numpy().tobytes()).hexdigest(),
            "metrics": {
                key: float(value)
                for key, value in trainer.callback_metrics.items()
                if key.startswith("train/") and isinstance(value, torch.Tensor) and value.numel() == 1
            },
        }
        dual = getattr(pl_module, "dual", None)
        if dual is not None:
            record["lambda"] = float(dual.value[0])
            record["iteration"] = int(pl_module.iteration)
        self.steps.append(record)

    def on_fit_end(self, trainer, pl_module) -> None:
        """Write the records of this rank."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out = {
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "steps": self.steps,
            "lambda_history": [list(item) for item in getattr(pl_module, "lambda_history", [])],
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(out, indent=1))
