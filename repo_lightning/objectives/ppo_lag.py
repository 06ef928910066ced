"""``ppo_lag``: Safe RLHF's PPO-Lagrangian, the expected-cost constraint ``E[C] <= threshold``.

Dai et al., "Safe RLHF", ICLR 2024 (arXiv 2310.12773): Eq. 10-12; every sample gets the mix
``(A_R - lam A_C) / (1 + lam)`` (or ``A_R - lam A_C`` without the factor) and the multiplier follows
``g = mean(C) - threshold``, which may be negative, so lam can fall.
"""

from __future__ import annotations

from torch import Tensor

from repo_lightning.objectives.objective import Objective, matched_cost_kl_coef
from repo_lightning.rl.advantages import combine_advantages
from repo_lightning.rl.dual import expected_cost_statistic


class PPOLagrangian(Objective):
    """Safe RLHF: the average cost of the batch under a threshold.

    Args:
        threshold: The cost budget ``d`` of ``E[C] <= d``.
        normalize_advantage_mix: Keep the ``1 / (1 + lam)`` factor of the mix.
        cost_kl_coef: ``beta_c``, the cost stream's KL weight; ``None`` gives every sample the KL weight ``beta``
            (``beta`` with the factor, as Safe RLHF's code, else 0).
    """

    name = "ppo_lag"
    uses_cost = True
    constrained = True

    def __init__(
        self, threshold: float = 0.0, normalize_advantage_mix: bool = True, cost_kl_coef: float | None = None
    ) -> None:
        self.threshold = threshold
        self.normalize_advantage_mix = normalize_advantage_mix
        self.cost_kl_coef = cost_kl_coef

    def cost_signal(self, costs: Tensor, samples_per_prompt: int) -> tuple[Tensor, Tensor | None]:
        """The raw cost ``C``; every sample is mixed (``unsafe = None``)."""
        return costs, None

    def cost_stream_kl_coef(self, kl_coef: float) -> float:
        """See :func:`matched_cost_kl_coef`."""
        return matched_cost_kl_coef(kl_coef, self.cost_kl_coef, self.normalize_advantage_mix)

    def combine(
        self, reward_advantages: Tensor, cost_advantages: Tensor | None, multiplier: Tensor, unsafe: Tensor | None
    ) -> Tensor:
        """``(A_R - lam A_C) / (1 + lam)`` on every sample."""
        return combine_advantages(reward_advantages, cost_advantages, multiplier, None, self.normalize_advantage_mix)

    def statistic(self, costs: Tensor, samples_per_prompt: int) -> Tensor:
        """``mean(C) - threshold``."""
        return expected_cost_statistic(costs.float(), self.threshold)

    def constraint_level(self) -> dict[str, float]:
        """``{"threshold": d}``."""
        return {"threshold": self.threshold}
