"""The interface every policy objective implements (algorithm.md section 6).

An objective says what the policy stage optimises: which cost signal the cost stream carries, how the reward and
cost advantages are mixed with the multiplier, which constraint statistic drives the multiplier, and the KL
weight of the cost stream. The policy stage calls nothing else algorithm-specific, so a new algorithm is one new
class (in its own file) chosen in YAML by ``class_path``::

    model:
      init_args:
        objective:
          class_path: repo_lightning.objectives.RePO
          init_args: {rectify: sample, target_unsafe_rate: 0.02}

This class holds no implementation (composition over inheritance): the maths lives in ``repo_lightning.rl``.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor


class Objective:
    """What the policy optimises. Subclasses set ``name``, ``uses_cost`` and ``constrained`` and implement the methods.

    Attributes:
        name: Short name used in logs, reports and export metadata (``ppo``, ``ppo_lag``, ``repo``, ...).
        uses_cost: Needs a cost model (and, with the ``gae`` estimator, a cost critic).
        constrained: Has a constraint, so a multiplier and a dual update.
        normalize_advantage_mix: Whether :meth:`combine` keeps the ``1 / (1 + lam)`` factor (sets the default
            cost-stream KL weight, see :meth:`cost_kl_coef`).
    """

    name: str = ""
    uses_cost: bool = False
    constrained: bool = False
    normalize_advantage_mix: bool = False

    def cost_signal(self, costs: Tensor, samples_per_prompt: int) -> tuple[Tensor, Tensor | None]:
        """``[N]`` raw costs -> ``(cost_signal [N], unsafe [N] bool or None)``; ``unsafe`` marks the samples to mix."""
        raise NotImplementedError

    def cost_stream_kl_coef(self, kl_coef: float) -> float:
        """KL weight of the cost stream given the reward stream's ``kl_coef``."""
        raise NotImplementedError

    def combine(
        self, reward_advantages: Tensor, cost_advantages: Tensor | None, multiplier: Tensor, unsafe: Tensor | None
    ) -> Tensor:
        """``[N, T]`` advantages the actor is trained on."""
        raise NotImplementedError

    def statistic(self, costs: Tensor, samples_per_prompt: int) -> Tensor:
        """This rank's constraint statistic ``g`` (``> 0``: violated) from ``[N]`` raw costs."""
        raise NotImplementedError

    def constraint_level(self) -> dict[str, float]:
        """The constants the constraint is measured against (threshold, target, tolerance), for logs and plots."""
        return {}


def matched_cost_kl_coef(kl_coef: float, cost_kl_coef: float | None, normalize_advantage_mix: bool) -> float:
    """``beta_c`` as configured, else the value that gives every sample the same KL weight ``beta``.

    With the ``1/(1+lam)`` factor a mixed sample's KL weight is ``(beta + lam beta_c) / (1 + lam)``, which is
    ``beta`` for ``beta_c = beta`` (Safe RLHF's code); without it the weight is ``beta + lam beta_c``, which is
    ``beta`` for ``beta_c = 0``. Unmixed samples (``ppo``, RePO's safe ones) always carry ``beta``. So the default
    holds the KL budget equal across algorithms and samples.
    """
    if cost_kl_coef is not None:
        return cost_kl_coef
    return kl_coef if normalize_advantage_mix else 0.0


def describe(component: object) -> dict:
    """``{"class_path", "init_args"}`` of a component that keeps its ``__init__`` arguments as attributes."""
    cls = type(component)
    names = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    init_args = {name: getattr(component, name) for name in names if hasattr(component, name)}
    for name, value in init_args.items():
        if isinstance(value, torch.nn.Module):  # a nested component (the dual variable's rule)
            init_args[name] = describe(value)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}
