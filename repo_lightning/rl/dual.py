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

import torch
from torch import Tensor

from repo_lightning.errors import ConfigError

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


def log_rule(multiplier: Tensor, statistic: Tensor, lr: float, maximum: float) -> Tensor:
    """Safe RLHF's update ``log lam <- log lam + lr * lam * g``, clamped to ``log maximum``.

    This is one SGD step on ``log lam`` for the dual loss ``-lam * g``, computed in the equivalent form
    ``lam * exp(lr * lam * g)`` so that ``g = 0`` leaves lam bit-for-bit unchanged. lam stays strictly
    positive: it is floored at the smallest normal float32 (an underflow to 0 could never recover).

    Args:
        multiplier: ``[num_costs]`` current lam (``> 0``).
        statistic: ``[num_costs]`` constraint statistic ``g``.
        lr: step size.
        maximum: upper bound of lam.

    Returns:
        ``[num_costs]`` new lam in ``(0, maximum]``.
    """
    return (multiplier * torch.exp(lr * multiplier * statistic)).clamp(min=_FLOOR, max=maximum)


def additive_rule(multiplier: Tensor, statistic: Tensor, lr: float, maximum: float) -> Tensor:
    """Projected gradient ascent ``lam <- clip(lam + lr * g, 0, maximum)``.

    Args:
        multiplier: ``[num_costs]`` current lam.
        statistic: ``[num_costs]`` constraint statistic ``g``.
        lr: step size.
        maximum: upper bound of lam.

    Returns:
        ``[num_costs]`` new lam in ``[0, maximum]``.
    """
    return (multiplier + lr * statistic).clamp(min=0.0, max=maximum)


def pid_rule(
    statistic: Tensor,
    integral: Tensor,
    previous: Tensor,
    kp: float,
    ki: float,
    kd: float,
    maximum: float,
) -> tuple[Tensor, Tensor]:
    """PID Lagrangian ``lam = clip(kp g + ki I + kd (g - g_prev), 0, maximum)`` (Stooke et al. 2020).

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
        maximum: upper bound of lam.

    Returns:
        ``(lam, new_integral)``, each ``[num_costs]``.
    """
    new_integral = (integral + statistic).clamp(min=0.0)
    multiplier = kp * statistic + ki * new_integral + kd * (statistic - previous)
    return multiplier.clamp(min=0.0, max=maximum), new_integral


class DualRule(torch.nn.Module):
    """How the multiplier answers its statistic: ``step(multiplier, statistic, previous, maximum) -> multiplier``.

    An interface with no implementation. A rule with state keeps it in buffers (saved with the dual variable);
    :meth:`bind` is called once with the number of constraints before any step.
    """

    def bind(self, num_costs: int) -> None:
        """Size the rule's state for ``num_costs`` constraints (stateless rules need nothing)."""

    def check_initial(self, initial: float) -> None:
        """Raise ``ValueError`` if the rule cannot start from ``initial``."""
        if not initial >= 0:
            raise ConfigError(f"model.init_args.dual.init_args.initial must be >= 0, got {initial}")

    def step(self, multiplier: Tensor, statistic: Tensor, previous: Tensor | None, maximum: float) -> Tensor:
        """New multiplier(s) from the current ones and the (windowed) statistic; ``previous`` is ``None`` at first."""
        raise NotImplementedError


class LogRule(DualRule):
    """Safe RLHF's ``log lam <- log lam + lr * lam * g`` (see :func:`log_rule`).

    Args:
        lr: Step size, ``> 0``.
    """

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        if not lr > 0:
            raise ConfigError(f"model.init_args.dual.init_args.rule.init_args.lr must be > 0, got {lr}")
        self.lr = lr

    def check_initial(self, initial: float) -> None:
        """The log rule multiplies lam: it must start above 0."""
        if not initial > 0:
            raise ConfigError(f"model.init_args.dual.init_args.initial must be > 0 for the log rule, got {initial}")

    def step(self, multiplier: Tensor, statistic: Tensor, previous: Tensor | None, maximum: float) -> Tensor:
        """:func:`log_rule`."""
        return log_rule(multiplier, statistic, self.lr, maximum)


class AdditiveRule(DualRule):
    """Projected gradient ascent ``lam <- clip(lam + lr * g, 0, maximum)`` (see :func:`additive_rule`).

    Args:
        lr: Step size, ``> 0``.
    """

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        if not lr > 0:
            raise ConfigError(f"model.init_args.dual.init_args.rule.init_args.lr must be > 0, got {lr}")
        self.lr = lr

    def step(self, multiplier: Tensor, statistic: Tensor, previous: Tensor | None, maximum: float) -> Tensor:
        """:func:`additive_rule`."""
        return additive_rule(multiplier, statistic, self.lr, maximum)


class PIDRule(DualRule):
    """PID Lagrangian (Stooke et al. 2020, see :func:`pid_rule`); the integral is a checkpointed buffer.

    The rule replaces the initial multiplier at its first applied update; the very first statistic has no
    predecessor, so it is its own ``g_prev`` (no derivative kick).

    Args:
        kp: Proportional gain, ``>= 0``.
        ki: Integral gain, ``>= 0``.
        kd: Derivative gain, ``>= 0``.
    """

    def __init__(self, kp: float = 0.0, ki: float = 1.0, kd: float = 0.0) -> None:
        super().__init__()
        for name, gain in (("kp", kp), ("ki", ki), ("kd", kd)):
            if not gain >= 0:
                raise ConfigError(f"model.init_args.dual.init_args.rule.init_args.{name} must be >= 0, got {gain}")
        self.kp, self.ki, self.kd = kp, ki, kd
        self.register_buffer("integral", torch.zeros(1, dtype=torch.float32))

    def bind(self, num_costs: int) -> None:
        """One integral per constraint."""
        self.integral = torch.zeros(num_costs, dtype=torch.float32)

    def step(self, multiplier: Tensor, statistic: Tensor, previous: Tensor | None, maximum: float) -> Tensor:
        """:func:`pid_rule`, updating the integral."""
        previous = statistic if previous is None else previous
        new, integral = pid_rule(statistic, self.integral, previous, self.kp, self.ki, self.kd, maximum)
        self.integral.copy_(integral)
        return new


class DualVariable(torch.nn.Module):
    """The Lagrange multiplier(s), the statistic window and the rule, as checkpointed state.

    Buffers (all persistent): ``lagrange_multiplier`` ``[num_costs]``, ``previous`` ``[num_costs]`` (the windowed
    statistic that drove the last update), ``history`` ``[window, num_costs]`` (a ring buffer of recent
    statistics), ``history_count`` (valid rows in it), ``num_updates`` (calls to :meth:`update`), and the rule's
    own (``rule.integral`` for PID).

    Args:
        rule: The update rule; ``None`` means ``LogRule()`` (Safe RLHF's).
        initial: Initial lam; ``> 0`` for the log rule, ``>= 0`` otherwise.
        maximum: Upper bound of lam, ``>= initial``.
        update_delay: Number of initial :meth:`update` calls that leave lam at ``initial`` (the statistics still
            enter the window) while the critics settle.
        window: The rule sees the mean of the last ``window`` statistics.
        num_costs: Number of constraints, one multiplier each.
    """

    def __init__(
        self,
        rule: DualRule | None = None,
        initial: float = 1.0,
        maximum: float = 100.0,
        update_delay: int = 0,
        window: int = 1,
        num_costs: int = 1,
    ) -> None:
        super().__init__()
        rule = LogRule() if rule is None else rule
        if not isinstance(rule, DualRule):
            raise ConfigError(
                "model.init_args.dual.init_args.rule must be a DualRule (LogRule, AdditiveRule, PIDRule, ...), "
                f"got {rule!r}"
            )
        if num_costs < 1:
            raise ConfigError(f"model.init_args.dual.init_args.num_costs must be >= 1, got {num_costs}")
        rule.check_initial(initial)
        if not maximum >= initial:
            raise ConfigError(
                f"model.init_args.dual.init_args.maximum ({maximum}) must be >= "
                f"model.init_args.dual.init_args.initial ({initial})"
            )
        if update_delay < 0:
            raise ConfigError(f"model.init_args.dual.init_args.update_delay must be >= 0, got {update_delay}")
        if window < 1:
            raise ConfigError(f"model.init_args.dual.init_args.window must be >= 1, got {window}")
        self.rule = rule
        rule.bind(num_costs)
        self.num_costs = num_costs
        self.initial = initial
        self.maximum = maximum
        self.update_delay = update_delay
        self.window = window

        self.register_buffer("lagrange_multiplier", torch.full((num_costs,), float(initial), dtype=torch.float32))
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

        if int(self.num_updates) >= self.update_delay:
            previous = None if int(self.num_updates) == 0 else self.previous.clone()
            self.lagrange_multiplier.copy_(self.rule.step(self.lagrange_multiplier, windowed, previous, self.maximum))

        self.previous.copy_(windowed)
        self.num_updates.add_(1)
        return self.value
