"""Lightning callbacks: what a run shows while it runs (progress for the pipeline)."""

from repo_lightning.callbacks.stage_progress import StageProgress

__all__ = ["StageProgress"]
