"""Optimizer and learning-rate schedule construction shared by every stage (a function, not a base class)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch

OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]

log = logging.getLogger(__name__)


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


def _fused_devices() -> set[str]:
    from torch.optim import optimizer as torch_optimizer

    supported = getattr(torch_optimizer, "_get_fused_kernels_supported_devices", lambda: ["cuda"])
    return set(supported())


def build_optimizer(
    factory: OptimizerFactory, param_groups: Callable[[], list[dict]], fused: bool = False
) -> torch.optim.Optimizer:
    """The optimizer ``factory`` builds from ``param_groups()``, with torch's fused kernel when ``fused`` asks for it.

    With ``fused=True`` the optimizer is rebuilt as ``factory(param_groups(), fused=True)`` (one kernel per step
    for all parameters: ``torch._fused_adamw_`` for AdamW) when all of these hold; otherwise it is returned as the
    factory built it, with a warning naming the reason:

    * its class takes ``fused`` (torch's Adam, AdamW, SGD, Adagrad) and the optimizer's own config leaves it unset
      (an explicit ``fused: false`` or ``true`` in the optimizer's ``init_args`` is kept as written);
    * neither ``foreach`` nor ``differentiable`` is set (torch allows neither with ``fused``);
    * every parameter is a floating tensor on a device torch has fused kernels for (CPU and CUDA among them).

    The fused step is the same update as the unfused one up to float rounding, not bit for bit (AdamW on CPU,
    torch 2.13: up to 1 ulp per step), which is why it is an option and off by default.

    Args:
        factory: The optimizer callable (a class, or the CLI's ``class_path`` + ``init_args`` partial).
        param_groups: Returns fresh parameter groups (torch writes the defaults into the dicts it is given, so each
            build needs its own).
        fused: Ask for the fused kernel.
    """
    optimizer = factory(param_groups())
    if not fused:
        return optimizer
    name, defaults = type(optimizer).__name__, optimizer.defaults
    if "fused" not in defaults:
        reason = f"{name} has no fused kernel"
    elif defaults["fused"] is not None:
        return optimizer  # fused set in the optimizer's own config: as written
    elif defaults.get("foreach") or defaults.get("differentiable"):
        reason = f"{name} is configured with foreach or differentiable"
    else:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        devices = _fused_devices()
        unsupported = sorted({str(p.device) for p in params if p.device.type not in devices})
        if unsupported:
            reason = f"torch has no fused {name} kernel on {', '.join(unsupported)}"
        elif not all(p.is_floating_point() for p in params):
            reason = "some parameters are not floating point"
        else:
            try:
                return factory(param_groups(), fused=True)
            except TypeError as error:  # a custom factory without a ``fused`` keyword
                reason = f"the optimizer factory does not take fused=True ({error})"
    log.warning("update.fused_optimizer: keeping the unfused %s: %s", name, reason)
    return optimizer
