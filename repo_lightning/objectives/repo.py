"""``repo``: Rectified Policy Optimization, the critical constraint "every response safe".

Peng et al., "Enhancing Safety in RLHF via Rectified Policy Optimization", NeurIPS 2025 (arXiv 2410.19933).
The cost stream carries the rectified cost ``{C}^+``, whose gradient is zero on safe samples: safe samples keep the
pure reward advantage ``A_R``, unsafe ones get the mix ``A_R - lam A_C`` (divided by ``1 + lam`` if configured).

Departure from the paper (algorithm.md section 7): the paper's statistic ``E[{C}^+]`` with tolerance 0 is never
negative, so every dual rule ramps lam to its cap and RePO becomes a fixed penalty set by a hand-chosen
``maximum``. The default constraint here is a target share of unsafe samples (``unsafe_rate``): it can be met,
is on the same ``[0, 1]`` scale for every cost model (SafetyWorld's or a PKU-SafeRLHF cost model's), and lets the
multiplier settle where the target is just met. ``rectified_cost`` keeps the paper's statistic, with a
``tolerance`` on the cost model's scale.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from repo_lightning.errors import ConfigError
from repo_lightning.objectives.objective import Objective, matched_cost_kl_coef
from repo_lightning.rl.advantages import combine_advantages, rectified_costs
from repo_lightning.rl.dual import rectified_cost_statistic, unsafe_rate_statistic


class RePO(Objective):
    """RePO: a per-prompt safety constraint with a rectified penalty.

    Args:
        rectify: The unsafe test per ``sample`` (``C > 0``) or per ``prompt`` (``mean_k C > 0``; then every
            sample of an unsafe prompt keeps its own cost, gated by the prompt).
        constraint: ``unsafe_rate`` (share of unsafe samples, or prompts with ``rectify: prompt``, minus
            ``target_unsafe_rate``), ``unsafe_prompt_rate`` (share of prompts with *any* unsafe sample minus
            ``target_unsafe_rate``: the per-prompt rate that evaluation reports, whatever ``rectify``; with ``k``
            samples a per-sample rate ``r`` lets about ``1 - (1 - r)^k`` of prompts have an unsafe answer) or
            ``rectified_cost`` (the paper's ``mean({C}^+) - tolerance``).
        target_unsafe_rate: Unsafe share the ``unsafe_rate`` / ``unsafe_prompt_rate`` constraint tolerates, in
            ``[0, 1)``.
        tolerance: Allowed ``mean({C}^+)`` of the ``rectified_cost`` constraint, ``>= 0``.
        normalize_advantage_mix: Keep the ``1 / (1 + lam)`` factor on the mixed samples.
        cost_kl_coef: ``beta_c``; ``None`` gives every sample the KL weight ``beta``.
        mix: Which samples get the mix ``A_R - lam A_C``: ``unsafe`` (algorithm.md section 6: safe samples keep
            ``A_R``) or ``all``. With ``all``, a safe sample's cost signal is still 0 (``{C}^+``), so its cost
            advantage is only the baseline term: ``A_C = -b_C``. Gating by the sample's own safety gives safe and
            unsafe samples different baselines (``b_R`` vs ``b_R - lam b_C``), a baseline that depends on the
            sampled answer, which biases the policy gradient of ``E[R - lam {C}^+]``; ``all`` is the unbiased
            estimate of that Lagrangian's gradient. With a group baseline (``rloo``) it rewards a safe answer on a
            prompt whose other answers were unsafe by ``lam`` times their mean violation (docs/algorithm.md 10).
        safety_margin: ``m >= 0``: the policy stage reads the cost model's ``C + m`` wherever RePO uses a cost (the
            rectified signal, the unsafe test, the dual statistic), so an answer counts as unsafe once
            ``C > -m``. A conservative cost: it moves the policy's safe region away from the cost model's decision
            boundary, where a learned model errs most on the answers RL finds (docs/algorithm.md 12). ``0`` is the
            paper's ``C > 0``. Evaluation still reports the model's own ``C > 0`` judgement and the oracles'.
        penalty: What an unsafe sample pays, times lam: ``rectified`` (the paper: ``{C}^+``, so a barely unsafe
            answer pays almost nothing), ``indicator`` (``1[C > 0]``: every violation pays the same, the per-sample
            penalty of the Lagrangian of the ``unsafe_rate`` constraint, on the same ``[0, 1]`` scale for every
            cost model) or ``rectified_step`` (``{C}^+ + 1[C > 0]``: a unit step at the boundary plus the paper's
            slope beyond it). With ``rectify: prompt`` the step is the sample's own ``C > 0``, gated by the prompt.
            docs/algorithm.md section 13.
    """

    name = "repo"
    uses_cost = True
    constrained = True

    def __init__(
        self,
        rectify: Literal["sample", "prompt"] = "sample",
        constraint: Literal["unsafe_rate", "unsafe_prompt_rate", "rectified_cost"] = "unsafe_rate",
        target_unsafe_rate: float = 0.02,
        tolerance: float = 0.0,
        normalize_advantage_mix: bool = True,
        cost_kl_coef: float | None = None,
        mix: Literal["unsafe", "all"] = "unsafe",
        safety_margin: float = 0.0,
        penalty: Literal["rectified", "indicator", "rectified_step"] = "rectified",
    ) -> None:
        if rectify not in ("sample", "prompt"):
            raise ConfigError(
                f"model.init_args.objective.init_args.rectify must be 'sample' or 'prompt', got {rectify!r}"
            )
        if constraint not in ("unsafe_rate", "unsafe_prompt_rate", "rectified_cost"):
            raise ConfigError(
                "model.init_args.objective.init_args.constraint must be 'unsafe_rate', 'unsafe_prompt_rate' or "
                f"'rectified_cost', got {constraint!r}"
            )
        if not 0.0 <= target_unsafe_rate < 1.0:
            raise ConfigError(
                f"model.init_args.objective.init_args.target_unsafe_rate must be in [0, 1), got {target_unsafe_rate}"
            )
        if not tolerance >= 0.0:
            raise ConfigError(f"model.init_args.objective.init_args.tolerance must be >= 0, got {tolerance}")
        if not safety_margin >= 0.0:
            raise ConfigError(f"model.init_args.objective.init_args.safety_margin must be >= 0, got {safety_margin}")
        if penalty not in ("rectified", "indicator", "rectified_step"):
            raise ConfigError(
                "model.init_args.objective.init_args.penalty must be 'rectified', 'indicator' or 'rectified_step', "
                f"got {penalty!r}"
            )
        if mix not in ("unsafe", "all"):
            raise ConfigError(f"model.init_args.objective.init_args.mix must be 'unsafe' or 'all', got {mix!r}")
        self.mix = mix
        self.rectify = rectify
        self.constraint = constraint
        self.target_unsafe_rate = target_unsafe_rate
        self.tolerance = tolerance
        self.normalize_advantage_mix = normalize_advantage_mix
        self.cost_kl_coef = cost_kl_coef
        self.safety_margin = safety_margin
        self.penalty = penalty

    def cost_signal(self, costs: Tensor, samples_per_prompt: int) -> tuple[Tensor, Tensor | None]:
        """``({C + m}^+, C + m > 0)`` per sample, or the prompt-gated own costs (see :func:`rectified_costs`).

        With ``penalty: indicator`` the signal is the sample's own ``1[C + m > 0]`` (gated like the rectified one);
        with ``rectified_step`` that step is added to the rectified signal.
        """
        shifted = costs + self.safety_margin
        signal, unsafe = rectified_costs(shifted, samples_per_prompt, self.rectify)
        if self.penalty == "rectified":
            return signal, unsafe
        step = ((shifted > 0) & unsafe).to(signal.dtype)
        return (step if self.penalty == "indicator" else signal + step), unsafe

    def cost_stream_kl_coef(self, kl_coef: float) -> float:
        """See :func:`matched_cost_kl_coef`."""
        return matched_cost_kl_coef(kl_coef, self.cost_kl_coef, self.normalize_advantage_mix)

    def combine(
        self, reward_advantages: Tensor, cost_advantages: Tensor | None, multiplier: Tensor, unsafe: Tensor | None
    ) -> Tensor:
        """``A_R`` on safe samples and the mix on unsafe ones (``mix: unsafe``), or the mix on every sample."""
        gate = unsafe if self.mix == "unsafe" else None
        return combine_advantages(reward_advantages, cost_advantages, multiplier, gate, self.normalize_advantage_mix)

    def statistic(self, costs: Tensor, samples_per_prompt: int) -> Tensor:
        """Unsafe share minus the target, or ``mean({C}^+) - tolerance``, of ``C + safety_margin``.

        ``unsafe_prompt_rate``: the share of prompts with any sample unsafe. Otherwise per sample, or per prompt (the
        mean of its samples' costs) with ``rectify: prompt``.
        """
        costs = costs.float() + self.safety_margin
        if self.constraint == "unsafe_prompt_rate":
            unsafe = (costs.view(-1, samples_per_prompt, *costs.shape[1:]) > 0).any(dim=1).float()
            return unsafe.mean(dim=0) - self.target_unsafe_rate
        if self.rectify == "prompt":
            costs = costs.view(-1, samples_per_prompt).mean(1)
        if self.constraint == "unsafe_rate":
            return unsafe_rate_statistic(costs, self.target_unsafe_rate)
        return rectified_cost_statistic(costs, self.tolerance)

    def constraint_level(self) -> dict[str, float]:
        """The target unsafe share or the tolerance."""
        if self.constraint in ("unsafe_rate", "unsafe_prompt_rate"):
            return {"target_unsafe_rate": self.target_unsafe_rate}
        return {"tolerance": self.tolerance}
