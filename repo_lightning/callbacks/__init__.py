"""Lightning callbacks: what a run shows while it runs (TensorBoard views, progress for the pipeline)."""

from repo_lightning.callbacks.stage_progress import StageProgress
from repo_lightning.callbacks.tensorboard_views import TensorBoardViews

__all__ = ["StageProgress", "TensorBoardViews"]
