"""A fourth algorithm and a new dual rule, each one class, to show the policy stage's extension points.

Used by ``tests/test_extension.py`` through ``class_path: extension_components.<Name>``; nothing else in the
package knows about them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from repo_lightning.objectives import Objective
from repo_lightning.rl.dual import DualRule


class FixedPenalty(Objective):
    """Reward minus a fixed multiple of the cost on every sample: ``A = A_R - penalty * A_C``, no multiplier.

    Args:
        penalty: The fixed cost weight.
    """

    name = "fixed_penalty"
    uses_cost = True
    constrained = False

    def __init__(self, penalty: float = 2.0) -> None:
        self.penalty = penalty

    def cost_signal(self, costs: Tensor, samples_per_prompt: int) -> tuple[Tensor, Tensor | None]:
        """The raw cost; every sample is mixed."""
        return costs, None

    def cost_stream_kl_coef(self, kl_coef: float) -> float:
        """KL on the reward stream only."""
        return 0.0

    def combine(
        self, reward_advantages: Tensor, cost_advantages: Tensor | None, multiplier: Tensor, unsafe: Tensor | None
    ) -> Tensor:
        """``A_R - penalty * A_C`` (the multiplier is ignored)."""
        return reward_advantages - self.penalty * cost_advantages

    def statistic(self, costs: Tensor, samples_per_prompt: int) -> Tensor:
        """Unconstrained."""
        raise TypeError("fixed_penalty has no constraint")


class DoubleOrHalve(DualRule):
    """Doubles the multiplier while the constraint is violated and halves it otherwise (capped at the maximum)."""

    def step(self, multiplier: Tensor, statistic: Tensor, previous: Tensor | None, maximum: float) -> Tensor:
        """``2 lam`` if ``g > 0`` else ``lam / 2``."""
        return torch.where(statistic > 0, multiplier * 2, multiplier / 2).clamp(max=maximum)
