import math

import pytest
import torch

from repo_lightning.rl.dual import (
    AdditiveRule,
    DualRule,
    DualVariable,
    LogRule,
    PIDRule,
    additive_rule,
    expected_cost_statistic,
    log_rule,
    pid_rule,
    rectified_cost_statistic,
)

# ---------------------------------------------------------------- statistics


def test_statistics_by_hand():
    costs = torch.tensor([1.0, -1.0, 3.0])
    # Safe RLHF: mean 1 - 0.5
    assert expected_cost_statistic(costs, threshold=0.5).item() == pytest.approx(0.5)
    # RePO: (1 + 0 + 3) / 3 = 4/3, minus tolerance 0.1
    assert rectified_cost_statistic(costs).item() == pytest.approx(4 / 3)
    assert rectified_cost_statistic(costs, tolerance=0.1).item() == pytest.approx(4 / 3 - 0.1)
    # all safe: exactly 0
    assert rectified_cost_statistic(torch.tensor([-1.0, -2.0, 0.0])).item() == 0.0


def test_statistics_per_cost_column():
    costs = torch.tensor([[1.0, -2.0], [3.0, -4.0]])
    torch.testing.assert_close(expected_cost_statistic(costs), torch.tensor([2.0, -3.0]))
    torch.testing.assert_close(rectified_cost_statistic(costs), torch.tensor([2.0, 0.0]))


# ---------------------------------------------------------------- pure rules


def test_log_rule_by_hand():
    lam = torch.tensor([1.0])
    # log lam = 0 + 0.1 * 1 * (-0.5) -> e^-0.05 = 0.951229
    assert log_rule(lam, torch.tensor([-0.5]), lr=0.1, maximum=10.0).item() == pytest.approx(0.951229, abs=1e-6)
    # e^0.05 = 1.051271
    assert log_rule(lam, torch.tensor([0.5]), lr=0.1, maximum=10.0).item() == pytest.approx(1.051271, abs=1e-6)
    # clamped to max
    assert log_rule(lam, torch.tensor([0.5]), lr=0.1, maximum=1.02).item() == pytest.approx(1.02)
    # g = 0 leaves any lam bit-for-bit unchanged
    lam = torch.tensor([2.3])
    assert torch.equal(log_rule(lam, torch.tensor([0.0]), lr=0.1, maximum=10.0), lam)
    # never reaches 0
    assert log_rule(lam, torch.tensor([-1e6]), lr=1.0, maximum=10.0).item() > 0


def test_additive_rule_by_hand():
    lam = torch.tensor([1.0])
    assert additive_rule(lam, torch.tensor([-0.5]), lr=0.1, maximum=10.0).item() == pytest.approx(0.95)
    assert additive_rule(lam, torch.tensor([0.5]), lr=0.1, maximum=10.0).item() == pytest.approx(1.05)
    assert additive_rule(lam, torch.tensor([-100.0]), lr=0.1, maximum=10.0).item() == 0.0
    assert additive_rule(lam, torch.tensor([100.0]), lr=0.1, maximum=10.0).item() == 10.0


def test_pid_rule_by_hand():
    # I = 1 + 0.5 = 1.5; lam = 1 * 0.5 + 2 * 1.5 + 3 * (0.5 - 0.2) = 0.5 + 3 + 0.9 = 4.4
    lam, integral = pid_rule(
        torch.tensor([0.5]), torch.tensor([1.0]), torch.tensor([0.2]), kp=1.0, ki=2.0, kd=3.0, maximum=100.0
    )
    assert lam.item() == pytest.approx(4.4)
    assert integral.item() == pytest.approx(1.5)
    # anti-windup: I = max(0.3 - 1, 0) = 0; lam = max(-1 + 0 + 0, 0) = 0
    lam, integral = pid_rule(
        torch.tensor([-1.0]),
        torch.tensor([0.3]),
        torch.tensor([-1.0]),
        kp=1.0,
        ki=1.0,
        kd=0.0,
        maximum=100.0,
    )
    assert integral.item() == 0.0 and lam.item() == 0.0
    # max
    lam, _ = pid_rule(torch.tensor([50.0]), torch.zeros(1), torch.zeros(1), kp=1.0, ki=1.0, kd=0.0, maximum=7.0)
    assert lam.item() == 7.0


# ---------------------------------------------------------------- DualVariable


def _dual(
    rule="log", init=1.0, lr=0.1, max_value=100.0, update_delay_steps=0, window=1, kp=0.0, ki=1.0, kd=0.0, num_costs=1
):
    """A DualVariable from the flat settings these hand-worked tests were written with."""
    components = {"log": lambda: LogRule(lr), "additive": lambda: AdditiveRule(lr), "pid": lambda: PIDRule(kp, ki, kd)}
    return DualVariable(components[rule](), init, max_value, update_delay_steps, window, num_costs)


@pytest.mark.parametrize("rule", ["log", "additive"])
def test_safe_rlhf_multiplier_falls_below_threshold_and_rises_above(rule):
    dual = _dual(rule=rule, init=1.0, lr=0.1)
    below = expected_cost_statistic(torch.tensor([-1.0, -2.0]), threshold=0.0)  # -1.5
    assert dual.update(below).item() < 1.0
    dual = _dual(rule=rule, init=1.0, lr=0.1)
    above = expected_cost_statistic(torch.tensor([1.0, 2.0]), threshold=0.0)  # 1.5
    assert dual.update(above).item() > 1.0


@pytest.mark.parametrize("rule", ["log", "additive"])
def test_repo_multiplier_unchanged_when_all_safe_and_rises_with_violations(rule):
    dual = _dual(rule=rule, init=1.7, lr=0.1)
    statistic = rectified_cost_statistic(torch.tensor([-1.0, -2.0, -0.5]))
    for _ in range(3):
        assert torch.equal(dual.update(statistic), torch.tensor([1.7]))
    violating = rectified_cost_statistic(torch.tensor([1.0, -1.0]))  # 0.5
    assert dual.update(violating).item() > 1.7


@pytest.mark.parametrize("rule", ["log", "additive", "pid"])
def test_max_value_holds_for_every_rule(rule):
    dual = _dual(rule=rule, init=1.0, lr=1.0, max_value=5.0)
    for _ in range(5):
        value = dual.update(torch.tensor([1e4]))
        assert value.item() <= 5.0
    assert value.item() == 5.0


def test_update_delay_holds_init_then_moves():
    dual = _dual(rule="additive", init=1.0, lr=0.5, update_delay_steps=2)
    # two held updates, counter advances
    assert dual.update(torch.tensor([1.0])).item() == 1.0
    assert dual.update(torch.tensor([1.0])).item() == 1.0
    assert dual.num_updates.item() == 2
    # third moves: 1 + 0.5 * 1
    assert dual.update(torch.tensor([1.0])).item() == pytest.approx(1.5)


def test_window_averages_statistics():
    dual = _dual(rule="additive", init=0.0, lr=1.0, window=2)
    # window [1]      -> mean 1 -> lam 0 + 1 = 1
    assert dual.update(torch.tensor([1.0])).item() == pytest.approx(1.0)
    # window [1, 3]   -> mean 2 -> lam 1 + 2 = 3
    assert dual.update(torch.tensor([3.0])).item() == pytest.approx(3.0)
    # window [3, 5]   -> mean 4 -> lam 3 + 4 = 7 (the 1 has left)
    assert dual.update(torch.tensor([5.0])).item() == pytest.approx(7.0)
    assert dual.previous.item() == pytest.approx(4.0)


def test_pid_dual_variable_by_hand():
    dual = _dual(rule="pid", init=0.0, kp=0.5, ki=0.1, kd=1.0, max_value=100.0)
    # g=2:  I = 2; no predecessor so derivative 0; lam = 1 + 0.2 = 1.2
    assert dual.update(torch.tensor([2.0])).item() == pytest.approx(1.2)
    # g=1:  I = 3; lam = 0.5 + 0.3 + 1 * (1 - 2) = -0.2 -> 0
    assert dual.update(torch.tensor([1.0])).item() == 0.0
    # g=-5: I = max(3 - 5, 0) = 0; lam = -2.5 + 0 - 6 -> 0
    assert dual.update(torch.tensor([-5.0])).item() == 0.0
    assert dual.rule.integral.item() == 0.0
    # g=1:  I = 1; lam = 0.5 + 0.1 + 1 * (1 - -5) = 6.6
    assert dual.update(torch.tensor([1.0])).item() == pytest.approx(6.6)


def test_several_costs():
    dual = _dual(num_costs=2, rule="additive", init=1.0, lr=1.0)
    torch.testing.assert_close(dual.update(torch.tensor([0.5, -2.0])), torch.tensor([1.5, 0.0]))
    assert dual.value.shape == (2,)
    with pytest.raises(ValueError, match="num_costs"):
        dual.update(torch.tensor([1.0]))


@pytest.mark.parametrize("rule", ["log", "additive", "pid"])
def test_state_dict_round_trip(rule):
    kwargs = dict(rule=rule, init=0.5, lr=0.3, max_value=9.0, update_delay_steps=1, window=3, kd=0.5)
    dual = _dual(**kwargs)
    for g in (0.4, -0.2, 1.3, 0.7):
        dual.update(torch.tensor([g]))
    state = dual.state_dict()
    assert {"lagrange_multiplier", "previous", "history", "history_count", "num_updates"} <= set(state)
    assert ("rule.integral" in state) == (rule == "pid")

    restored = _dual(**kwargs)
    restored.load_state_dict(state)
    assert torch.equal(restored.value, dual.value)
    assert torch.equal(restored.update(torch.tensor([0.9])), dual.update(torch.tensor([0.9])))
    for name, buffer in dual.named_buffers():
        assert torch.equal(buffer, restored.get_buffer(name)), name


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: DualVariable(LogRule(), initial=0.0), "model.init_args.dual.init_args.initial"),
        (lambda: DualVariable(AdditiveRule(), initial=-1.0), "model.init_args.dual.init_args.initial"),
        (lambda: DualVariable(initial=5.0, maximum=1.0), "model.init_args.dual.init_args.maximum"),
        (lambda: DualVariable(window=0), "model.init_args.dual.init_args.window"),
        (lambda: DualVariable(update_delay=-1), "model.init_args.dual.init_args.update_delay"),
        (lambda: LogRule(lr=0.0), "model.init_args.dual.init_args.rule.init_args.lr"),
        (lambda: AdditiveRule(lr=-1.0), "model.init_args.dual.init_args.rule.init_args.lr"),
        (lambda: DualVariable(num_costs=0), "model.init_args.dual.init_args.num_costs"),
        (lambda: PIDRule(ki=-1.0), "model.init_args.dual.init_args.rule.init_args.ki"),
    ],
)
def test_invalid_arguments_name_the_argument(build, name):
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        build()


def test_a_new_rule_is_one_class():
    class HalveWhenMet(DualRule):
        """Doubles lam on a violation and halves it otherwise (a test fixture)."""

        def step(self, multiplier, statistic, previous, maximum):
            return torch.where(statistic > 0, multiplier * 2, multiplier / 2).clamp(max=maximum)

    dual = DualVariable(HalveWhenMet(), initial=1.0, maximum=3.0)
    assert dual.update(torch.tensor([0.5])).item() == 2.0
    assert dual.update(torch.tensor([0.5])).item() == 3.0
    assert dual.update(torch.tensor([-0.5])).item() == 1.5
    with pytest.raises(ValueError, match="DualRule"):
        DualVariable(rule="log")  # type: ignore[arg-type]


def test_value_is_a_detached_copy():
    dual = DualVariable()
    value = dual.value
    value.add_(1.0)
    assert dual.value.item() == 1.0
    assert math.isclose(dual.lagrange_multiplier.item(), 1.0)


def test_unsafe_rate_statistic_is_a_share_minus_the_target():
    from repo_lightning.rl.dual import unsafe_rate_statistic

    costs = torch.tensor([-1.0, 0.0, 0.3, 2.0])  # C = 0 is safe: 2 of 4 unsafe
    assert abs(float(unsafe_rate_statistic(costs, 0.1)) - 0.4) < 1e-7
    # met with slack: negative, so the log rule lowers lam (lam * exp(lr * lam * g) with g = -0.1 < 0)
    g = unsafe_rate_statistic(torch.tensor([-1.0, -2.0]), 0.1)
    assert abs(float(g) + 0.1) < 1e-7
    dual = DualVariable(LogRule(lr=0.5), initial=2.0, maximum=10.0)
    dual.update(g.reshape(1))
    assert abs(float(dual.value[0]) - 2.0 * math.exp(0.5 * 2.0 * -0.1)) < 1e-6
