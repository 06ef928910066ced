"""What is trained: the multiplier search grid, its selection rule, and the variants built on the searched settings.

Settings are short knob names (``lr``, ``initial``, ``threshold``, ...) that :func:`overrides` turns into the
policy stage's CLI overrides (``--model.init_args.dual.init_args.rule.init_args.lr=0.5``), so the search log and
the tables read as settings while every run stays an ordinary ``python -m repo_lightning`` call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CONSTRAINED = ("ppo_lag", "repo")
ESTIMATORS = ("gae", "rloo", "grpo", "reinforce_pp")

#: Knob name -> CLI path under ``--model.init_args.``, in the order the overrides are passed: a rule's class comes
#: before its ``init_args``, so switching the rule and setting its gains is one valid command line.
KNOBS: dict[str, str] = {
    "rule": "dual.init_args.rule",
    "lr": "dual.init_args.rule.init_args.lr",
    "kp": "dual.init_args.rule.init_args.kp",
    "ki": "dual.init_args.rule.init_args.ki",
    "initial": "dual.init_args.initial",
    "maximum": "dual.init_args.maximum",
    "threshold": "objective.init_args.threshold",
    "constraint": "objective.init_args.constraint",
    "target_unsafe_rate": "objective.init_args.target_unsafe_rate",
    "rectify": "objective.init_args.rectify",
    "estimator": "estimation.estimator",
}

#: ``rule`` values -> the dual rule's class.
RULES: dict[str, str] = {
    "log": "repo_lightning.rl.dual.LogRule",
    "additive": "repo_lightning.rl.dual.AdditiveRule",
    "pid": "repo_lightning.rl.dual.PIDRule",
}

#: Candidate settings per algorithm, in the order they are tried (``--search-candidates N`` keeps the first N).
#: Each grid is the same half fraction of a 2x2x2 design: rule ``lr`` in {0.1, 0.5} x ``initial`` in {1, 3} x a
#: third knob whose level is set by the other two, so each level of each knob is tried twice. Both algorithms use
#: the configs' rule (Safe RLHF's log rule) and get the same (lr, initial) pairs. The third knob is each
#: constraint's level: Safe RLHF's threshold ``d`` (0, the paper's, or -2, which on the learned cost scale of a few
#: units asks for a clearly negative mean cost) and RePO's tolerated unsafe share ``target_unsafe_rate`` (0.01 or
#: 0.05). The multiplier's ``maximum`` is the configs' for both, not searched: with RePO's ``unsafe_rate``
#: constraint the multiplier can fall and settle below it.
SEARCH_GRID: dict[str, list[dict[str, float]]] = {
    "ppo_lag": [
        {"lr": 0.1, "initial": 1.0, "threshold": 0.0},
        {"lr": 0.5, "initial": 3.0, "threshold": 0.0},
        {"lr": 0.5, "initial": 1.0, "threshold": -2.0},
        {"lr": 0.1, "initial": 3.0, "threshold": -2.0},
    ],
    "repo": [
        {"lr": 0.1, "initial": 1.0, "target_unsafe_rate": 0.05},
        {"lr": 0.5, "initial": 3.0, "target_unsafe_rate": 0.05},
        {"lr": 0.5, "initial": 1.0, "target_unsafe_rate": 0.01},
        {"lr": 0.1, "initial": 3.0, "target_unsafe_rate": 0.01},
    ],
}

#: The validation scalars the selection rule reads (logged by the policy at the end of fit).
VAL_UNSAFE, VAL_REWARD = "val/true_unsafe_prompt_rate", "val/true_reward_mean"
VAL_TAGS = (VAL_UNSAFE, VAL_REWARD, "val/true_unsafe_response_rate", "val/unsafe_prompt_rate")


@dataclass(frozen=True)
class Variant:
    """A policy trained with an algorithm's searched settings and one change.

    Attributes:
        name: Run name (``repo``, ``repo_pid_rule``, ``ppo_lag_rloo``, ...), unique per seed.
        algorithm: The config it starts from, ``<config-dir>/<algorithm>.yaml``.
        label: What changed, for the tables.
        change: Knobs set on top of the searched settings (empty: the searched policy itself).
    """

    name: str
    algorithm: str
    label: str
    change: dict[str, object] = field(default_factory=dict)


#: RePO with the searched settings and one knob changed (not searched themselves).
ABLATIONS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("repo_rectify_prompt", "repo", "rectify: prompt", {"rectify": "prompt"}),
        Variant("repo_additive_rule", "repo", "AdditiveRule (same lr)", {"rule": "additive"}),
        Variant("repo_pid_rule", "repo", "PIDRule (ki = lr, kp = 1)", {"rule": "pid"}),
        Variant(
            "repo_rectified_cost",
            "repo",
            "constraint: rectified_cost (the paper's, capped at maximum)",
            {"constraint": "rectified_cost"},
        ),
    )
}


def estimator_variant(algorithm: str, estimator: str) -> Variant:
    """``algorithm`` with its searched settings and the advantage estimator ``estimator``."""
    return Variant(f"{algorithm}_{estimator}", algorithm, f"estimator: {estimator}", {"estimator": estimator})


def variant_settings(searched: dict[str, object], change: dict[str, object]) -> dict[str, object]:
    """The searched settings with ``change`` applied.

    The PID rule has no step size: its integral gain ``ki`` takes the searched ``lr`` and its proportional gain
    ``kp`` is 1 (not searched).
    """
    settings = {**searched, **change}
    if settings.get("rule") == "pid" and "lr" in settings:
        settings["ki"] = settings.pop("lr")
        settings.setdefault("kp", 1.0)
    return settings


def overrides(settings: dict[str, object]) -> list[str]:
    """CLI overrides of ``settings``: ``{"lr": 0.5}`` -> ``["--model.init_args.dual.init_args.rule.init_args.lr=0.5"]``.

    Raises:
        KeyError: For a knob :data:`KNOBS` does not know.
    """
    unknown = sorted(set(settings) - set(KNOBS))
    if unknown:
        raise KeyError(f"unknown knob(s) {unknown}; known: {list(KNOBS)}")
    args = []
    for knob in KNOBS:
        if knob in settings:
            value = RULES[settings[knob]] if knob == "rule" else settings[knob]
            args.append(f"--model.init_args.{KNOBS[knob]}={value}")
    return args


def select_candidate(candidates: list[dict], tie: float) -> int:
    """Index of the winner: lowest val true unsafe-prompt rate, ties within ``tie`` by higher val true reward.

    Among exact ties the earlier grid point wins.
    """
    best = min(c["val"][VAL_UNSAFE] for c in candidates)
    pool = [i for i, c in enumerate(candidates) if c["val"][VAL_UNSAFE] <= best + tie]
    return max(pool, key=lambda i: (candidates[i]["val"][VAL_REWARD], -i))
