"""Dual variables (Lagrange multipliers) for the safety constraint (algorithm.md section 7).

The statistics and update rules are pure functions of tensors; :class:`DualVariable` is a small ``nn.Module``
that holds the multiplier and the rule's state as persistent buffers, so they are saved in and restored from
checkpoints. It does no communication: the caller all-reduces the statistic across ranks before
:meth:`DualVariable.update`, so every rank applies the same update and holds the same multiplier.

References:
    - Safe RLHF: Dai et al., ICLR 2024 (arXiv 2310.12773), Eq. 10-12: the expected-cost constraint
      ``E[C] <= d`` and the log-space multiplier update of their code (``log_lambda``).
    - RePO: Peng et al., NeurIPS 2025 (arXiv 2410.19933): the rectified constraint ``E[{C}^+] <= 0``.
    - PID: Stooke, Achiam and Abbeel, "Responsive Safety in Reinforcement Learning by PID Lagrangian Methods",
      ICML 2020 (arXiv 2007.03964), Algorithm 2.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

# Floor of the log rule's lam: at 0 the multiplicative step lam * exp(...) could never move it again.
_FLOOR = torch.finfo(torch.float32).tiny


def expected_cost_statistic(costs: Tensor, threshold: float = 0.0) -> Tensor:
    """Safe RLHF's constraint statistic ``g = mean(C) - d``; may be negative, so lam can fall.

    Args:
        costs: ``[N]`` (or ``[N, num_costs]``) raw costs ``C(x, y)`` of the rollout batch.
        threshold: the cost budget ``d``.

    Returns:
        ``[]`` (or ``[num_costs]``): the mean over dim 0 minus ``threshold``.
    """
    return costs.float().mean(dim=0) - threshold


def rectified_cost_statistic(costs: Tensor, tolerance: float = 0.0) -> Tensor:
    """RePO's constraint statistic ``g = mean({C}^+) - tolerance``; never negative when ``tolerance`` is 0.

    Args:
        costs: ``[N]`` (or ``[N, num_costs]``) raw costs ``C(x, y)`` per response for ``rectify="sample"``, or
            the per-prompt means ``mean_k C(x, y_k)`` (one row per prompt) for ``rectify="prompt"``. Pass raw
            values: the rectification ``{.}^+`` happens here.
        tolerance: allowed mean violation.

    Returns:
        ``[]`` (or ``[num_costs]``): the mean over dim 0 of ``relu(costs)`` minus ``tolerance``.
    """
    return torch.relu(costs.float()).mean(dim=0) - tolerance


def unsafe_rate_statistic(costs: Tensor, target: float) -> Tensor:
    """Share of unsafe samples minus a target: ``g = mean([C > 0]) - target``.

    A constraint on RePO's per-sample safety test that can be met (for ``target > 0``) and is on the same scale
    for every cost model (a share in ``[0, 1]``), so the multiplier can settle instead of ramping to its cap.

    Args:
        costs: ``[N]`` (or ``[N, num_costs]``) raw costs per response, or per-prompt means.
        target: the tolerated unsafe share.

    Returns:
        ``[]`` (or ``[num_costs]``).
    """
    return (costs.float() > 0).float().mean(dim=0) - target


def log_rule(multiplier: Tensor, statistic: Tensor, lr: float, max_value: float) -> Tensor:
    """Safe RLHF's update ``log lam <- log lam + lr * lam * g``, clamped to ``log max_value``.

    This is one SGD step on ``log lam`` for the dual loss ``-lam * g``, computed in the equivalent form
    ``lam * exp(lr * lam * g)`` so that ``g = 0`` leaves lam bit-for-bit unchanged. lam stays strictly
    positive: it is floored at the smallest normal float32 (an underflow to 0 could never recover).

    Args:
        multiplier: ``[num_costs]`` current lam (``> 0``).
        statistic: ``[num_costs]`` constraint statistic ``g``.
        lr: step size.
        max_value: upper bound ``lam_max``.

    Returns:
        ``[num_costs]`` new lam in ``(0, max_value]``.
    """
    return (multiplier * torch.exp(lr * multiplier * statistic)).clamp(min=_FLOOR, max=max_value)


def additive_rule(multiplier: Tensor, statistic: Tensor, lr: float, max_value: float) -> Tensor:
    """Projected gradient ascent ``lam <- clip(lam + lr * g, 0, max_value)``.

    Args:
        multiplier: ``[num_costs]`` current lam.
        statistic: ``[num_costs]`` constraint statistic ``g``.
        lr: step size.
        max_value: upper bound ``lam_max``.

    Returns:
        ``[num_costs]`` new lam in ``[0, max_value]``.
    """
    return (multiplier + lr * statistic).clamp(min=0.0, max=max_value)


def pid_rule(
    statistic: Tensor,
    integral: Tensor,
    previous: Tensor,
    kp: float,
    ki: float,
    kd: float,
    max_value: float,
) -> tuple[Tensor, Tensor]:
    """PID Lagrangian ``lam = clip(kp g + ki I + kd (g - g_prev), 0, max_value)`` (Stooke et al. 2020).

    ``I <- max(I + g, 0)`` is updated first and used in the same step. Clamping the integral at 0 is the
    paper's anti-windup: a long run of satisfied constraints cannot bank a negative integral that would keep
    lam at 0 long after violations resume. Unlike Algorithm 2 of the paper, the derivative term is not
    rectified (algorithm.md section 7 writes ``g - g_prev``); with the default ``kd = 0`` the two agree.

    Args:
        statistic: ``[num_costs]`` constraint statistic ``g``.
        integral: ``[num_costs]`` accumulated ``I`` before this step.
        previous: ``[num_costs]`` ``g`` of the previous step.
        kp: proportional gain.
        ki: integral gain.
        kd: derivative gain.
        max_value: upper bound ``lam_max``.

    Returns:
        ``(lam, new_integral)``, each ``[num_costs]``.
    """
    new_integral = (integral + statistic).clamp(min=0.0)
    multiplier = kp * statistic + ki * new_integral + kd * (statistic - previous)
    return multiplier.clamp(min=0.0, max=max_value), new_integral


class DualVariable(torch.nn.Module):
    """The Lagrange multiplier(s) and their update rule's state, as checkpointed buffers.

    Buffers (all persistent): ``lagrange_multiplier`` ``[num_costs]``, ``integral`` ``[num_costs]`` (PID),
    ``previous`` ``[num_costs]`` (the windowed statistic that drove the last update; log it as
    ``dual_statistic``), ``history`` ``[window, num_costs]`` (a ring buffer of recent statistics),
    ``history_count`` (valid rows in it) and ``num_updates`` (calls to :meth:`update`).
    """

    def __init__(
        self,
        num_costs: int = 1,
        rule: Literal["log", "additive", "pid"] = "log",
        init: float = 1.0,
        lr: float = 0.1,
        max_value: float = 100.0,
        update_delay_steps: int = 0,
        window: int = 1,
        kp: float = 0.0,
        ki: float = 1.0,
        kd: float = 0.0,
    ) -> None:
        """Create the multiplier(s) at ``init``.

        Args:
            num_costs: number of constraints, one multiplier each.
            rule: ``"log"`` (Safe RLHF: ``log lam += lr * lam * g``), ``"additive"`` (``lam += lr * g``,
                projected to ``[0, max_value]``) or ``"pid"`` (Stooke et al. 2020; uses ``kp``, ``ki``,
                ``kd``).
            init: initial lam; ``> 0`` for the log rule, ``>= 0`` otherwise. The PID rule replaces it at its
                first applied update.
            lr: step size of the log and additive rules.
            max_value: upper bound ``lam_max``, ``>= init``.
            update_delay_steps: number of initial :meth:`update` calls that leave lam at ``init`` (the
                statistics still enter the window) while the critics settle.
            window: the rule sees the mean of the last ``window`` statistics.
            kp: PID proportional gain.
            ki: PID integral gain.
            kd: PID derivative gain.

        Raises:
            ValueError: if an argument is out of range; the message names it.
        """
        super().__init__()
        if num_costs < 1:
            raise ValueError(f"num_costs must be >= 1, got {num_costs}")
        if rule not in ("log", "additive", "pid"):
            raise ValueError(f"rule must be one of 'log', 'additive', 'pid', got {rule!r}")
        if rule == "log" and not init > 0:
            raise ValueError(f"init must be > 0 for the log rule, got {init}")
        if not init >= 0:
            raise ValueError(f"init must be >= 0, got {init}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not max_value >= init:
            raise ValueError(f"max_value must be >= init ({init}), got {max_value}")
        if update_delay_steps < 0:
            raise ValueError(f"update_delay_steps must be >= 0, got {update_delay_steps}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        for name, gain in (("kp", kp), ("ki", ki), ("kd", kd)):
            if not gain >= 0:
                raise ValueError(f"{name} must be >= 0, got {gain}")

        self.num_costs = num_costs
        self.rule = rule
        self.init = init
        self.lr = lr
        self.max_value = max_value
        self.update_delay_steps = update_delay_steps
        self.window = window
        self.kp, self.ki, self.kd = kp, ki, kd

        self.register_buffer("lagrange_multiplier", torch.full((num_costs,), float(init), dtype=torch.float32))
        self.register_buffer("integral", torch.zeros(num_costs, dtype=torch.float32))
        self.register_buffer("previous", torch.zeros(num_costs, dtype=torch.float32))
        self.register_buffer("history", torch.zeros(window, num_costs, dtype=torch.float32))
        self.register_buffer("history_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @property
    def value(self) -> Tensor:
        """Current multiplier(s), ``[num_costs]`` (a detached copy)."""
        return self.lagrange_multiplier.detach().clone()

    @torch.no_grad()
    def update(self, statistic: Tensor) -> Tensor:
        """Push a statistic into the window and, past the delay, apply the rule to the window mean.

        Args:
            statistic: ``[num_costs]`` (or a scalar when ``num_costs == 1``) constraint statistic ``g`` of
                this step, already averaged across ranks by the caller.

        Returns:
            ``[num_costs]`` the new multiplier(s).

        Raises:
            ValueError: if ``statistic`` does not hold ``num_costs`` values.
        """
        if statistic.numel() != self.num_costs:
            raise ValueError(f"statistic must hold num_costs={self.num_costs} values, got {tuple(statistic.shape)}")
        statistic = statistic.detach().reshape(self.num_costs).to(self.history)

        slot = int(self.num_updates) % self.window
        self.history[slot] = statistic
        self.history_count.clamp_(max=self.window - 1).add_(1)
        windowed = self.history[: int(self.history_count)].mean(dim=0)

        if int(self.num_updates) >= self.update_delay_steps:
            multiplier = self.lagrange_multiplier
            if self.rule == "log":
                new = log_rule(multiplier, windowed, self.lr, self.max_value)
            elif self.rule == "additive":
                new = additive_rule(multiplier, windowed, self.lr, self.max_value)
            else:
                # The very first statistic has no predecessor: take g_prev = g (no derivative kick).
                previous = windowed if int(self.num_updates) == 0 else self.previous
                new, integral = pid_rule(windowed, self.integral, previous, self.kp, self.ki, self.kd, self.max_value)
                self.integral.copy_(integral)
            self.lagrange_multiplier.copy_(new)

        self.previous.copy_(windowed)
        self.num_updates.add_(1)
        return self.value
