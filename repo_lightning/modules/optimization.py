"""Optimizer and learning-rate schedule construction shared by every stage (a function, not a base class)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]


def optimizer_with_warmup(
    optimizer: OptimizerFactory, params: Iterable, warmup_steps: int = 0
) -> dict | torch.optim.Optimizer:
    """Build the optimizer from its factory and, if ``warmup_steps > 0``, a linear warm-up schedule.

    Returns:
        What ``configure_optimizers`` returns.
    """
    opt = optimizer(params)
    if warmup_steps <= 0:
        return opt
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup_steps))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
