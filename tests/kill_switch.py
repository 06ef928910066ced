"""A callback that SIGKILLs its own process between policy iterations, for the kill-and-resume test.

Inert unless ``REPO_LIGHTNING_TEST_KILL_AFTER`` is set: then the process dies at the start of the iteration that
follows iteration ``N`` (counted from 1), after that iteration's checkpoint was written, with no chance to clean up.
"""

from __future__ import annotations

import os
import signal

import lightning as L

KILL_ENV = "REPO_LIGHTNING_TEST_KILL_AFTER"


class KillAfterIteration(L.Callback):
    """``os.kill(getpid(), SIGKILL)`` when the module's ``iteration`` reaches ``$REPO_LIGHTNING_TEST_KILL_AFTER``."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        after = os.environ.get(KILL_ENV)
        if after is not None and int(pl_module.iteration) == int(after):
            os.kill(os.getpid(), signal.SIGKILL)
