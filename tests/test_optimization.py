"""``build_optimizer``: the fused-kernel option of the policy stage (``update.fused_optimizer``)."""

from __future__ import annotations

import functools
import logging

import pytest
import torch

from repo_lightning.modules.optimization import build_optimizer


def _groups(model: torch.nn.Module):
    return lambda: [{"params": list(model.parameters()), "lr": 1e-2}]


def test_off_builds_what_the_factory_builds():
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(torch.optim.AdamW, _groups(model))
    assert optimizer.defaults["fused"] is None and optimizer.param_groups[0]["fused"] is None


def test_on_rebuilds_adamw_fused_and_keeps_the_configured_arguments():
    model = torch.nn.Linear(3, 2)
    factory = functools.partial(torch.optim.AdamW, weight_decay=0.0, betas=(0.8, 0.9))  # as the CLI builds one
    optimizer = build_optimizer(factory, _groups(model), fused=True)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["fused"] is True
    group = optimizer.param_groups[0]
    assert group["fused"] is True and group["lr"] == 1e-2 and group["weight_decay"] == 0.0
    assert group["betas"] == (0.8, 0.9)


def test_an_explicit_fused_in_the_optimizer_config_wins():
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(functools.partial(torch.optim.AdamW, fused=False), _groups(model), fused=True)
    assert optimizer.defaults["fused"] is False


@pytest.mark.parametrize(
    ("factory", "reason"),
    [
        (torch.optim.Adadelta, "Adadelta has no fused kernel"),
        (functools.partial(torch.optim.AdamW, foreach=True), "foreach or differentiable"),
        (lambda params: torch.optim.AdamW(params), "does not take fused=True"),
    ],
)
def test_unsupported_cases_keep_the_unfused_optimizer_and_say_why(factory, reason, caplog):
    model = torch.nn.Linear(3, 2)
    with caplog.at_level(logging.WARNING, logger="repo_lightning.modules.optimization"):
        optimizer = build_optimizer(factory, _groups(model), fused=True)
    assert not optimizer.defaults.get("fused")
    assert reason in caplog.text


def test_fused_adamw_is_the_same_update_up_to_rounding():
    # Not bit for bit on CPU (torch 2.13: up to 1 ulp a step), which is why the option is off by default.
    torch.manual_seed(0)
    start = torch.nn.Linear(16, 8)
    runs = {}
    for fused in (False, True):
        model = torch.nn.Linear(16, 8)
        model.load_state_dict(start.state_dict())
        optimizer = build_optimizer(torch.optim.AdamW, _groups(model), fused=fused)
        torch.manual_seed(1)
        for _ in range(10):
            optimizer.zero_grad()
            model(torch.randn(4, 16)).pow(2).sum().backward()
            optimizer.step()
        runs[fused] = model.state_dict()
    for key in runs[False]:
        torch.testing.assert_close(runs[True][key], runs[False][key], rtol=0, atol=1e-6)


def test_parameters_on_a_device_without_fused_kernels_stay_unfused(caplog):
    model = torch.nn.Linear(3, 2, device="meta")
    with caplog.at_level(logging.WARNING, logger="repo_lightning.modules.optimization"):
        optimizer = build_optimizer(torch.optim.AdamW, _groups(model), fused=True)
    assert optimizer.defaults["fused"] is None
    assert "no fused AdamW kernel on meta" in caplog.text
