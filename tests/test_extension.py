"""Extension points of the policy stage: a new algorithm and a new dual rule are one class each (issue 9).

The classes live in ``tests/extension_components.py``; the runs go through ``main(["fit", ...])`` with nothing in
the package edited.
"""

from __future__ import annotations

import pytest
import torch
from test_policy import _constant_score_model, _fit, _policy_config, _scalars
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_fourth_algorithm_is_one_class(tmp_path, tiny_exports, tiny_world_config):
    model = {"objective": {"class_path": "extension_components.FixedPenalty", "init_args": {"penalty": 3.0}}}
    cli = _fit(_policy_config(tmp_path, tiny_exports, tiny_world_config, model=model, trainer={"max_steps": 2}))
    module = cli.model
    assert module.objective.penalty == 3.0 and module.cost_critic is not None  # uses a cost: the cost critic trains
    sft = AutoModelForCausalLM.from_pretrained(tiny_exports["sft"])
    assert any(not torch.equal(p, sft.state_dict()[n]) for n, p in module.actor.state_dict().items())
    scalars = _scalars(cli.trainer.logger.log_dir)
    assert "train/value_loss_cost" in scalars and "train/lambda" not in scalars  # unconstrained: no multiplier
    assert module.hparams.objective == {
        "class_path": "extension_components.FixedPenalty",
        "init_args": {"penalty": 3.0},
    }


def test_a_new_dual_rule_is_one_class(tmp_path, tiny_exports, tiny_world_config):
    cost = _constant_score_model(tiny_exports["tokenizer"], tmp_path / "unsafe_cost", 1.0)
    dual = {
        "class_path": "repo_lightning.rl.dual.DualVariable",
        "init_args": {"rule": {"class_path": "extension_components.DoubleOrHalve"}, "initial": 1.0, "maximum": 3.0},
    }
    model = {"dual": dual, "cost_model_path": cost}
    cli = _fit(_policy_config(tmp_path, tiny_exports, tiny_world_config, model=model, trainer={"max_steps": 3}))
    # Every sample unsafe: g = 1 - 0.02 > 0 each iteration, so lam doubles 1 -> 2 -> 4, capped at 3.
    assert _scalars(cli.trainer.logger.log_dir)["train/lambda"] == [2.0, 3.0, 3.0]
