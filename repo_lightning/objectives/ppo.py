"""``ppo``: plain PPO on the reward, no constraint (the unconstrained reference point)."""

from __future__ import annotations

from torch import Tensor

from repo_lightning.objectives.objective import Objective


class PPO(Objective):
    """Maximise the reward alone: the advantage is ``A_R``; no cost stream, no multiplier."""

    name = "ppo"
    uses_cost = False
    constrained = False

    def cost_signal(self, costs: Tensor, samples_per_prompt: int) -> tuple[Tensor, Tensor | None]:
        """Not used: ``ppo`` has no cost stream."""
        raise TypeError("ppo has no cost stream")

    def cost_stream_kl_coef(self, kl_coef: float) -> float:
        """No cost stream: 0."""
        return 0.0

    def combine(
        self, reward_advantages: Tensor, cost_advantages: Tensor | None, multiplier: Tensor, unsafe: Tensor | None
    ) -> Tensor:
        """``A_R``."""
        return reward_advantages

    def statistic(self, costs: Tensor, samples_per_prompt: int) -> Tensor:
        """Not used: ``ppo`` is unconstrained."""
        raise TypeError("ppo has no constraint statistic")
