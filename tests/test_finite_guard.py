"""The non-finite guard: messages that name the quantity and the model, skip mode, exports that refuse NaN."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_MODEL, TINY_WORLD
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from repo_lightning.cli import main
from repo_lightning.errors import NonFiniteError
from repo_lightning.finite_guard import FiniteGuard, check_finite, first_nonfinite_weight
from repo_lightning.models.export import export_pretrained

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_check_finite_names_the_quantity_the_share_and_the_source():
    check_finite("rewards", torch.ones(3), "reward model")
    with pytest.raises(NonFiniteError, match=r"^non-finite rewards \(2 of 4 values NaN\) from reward model \(x\)$"):
        check_finite("rewards", torch.tensor([1.0, math.nan, 2.0, math.nan]), "reward model (x)")
    with pytest.raises(NonFiniteError, match=r"\(1 of 2 values inf\)"):
        check_finite("loss", torch.tensor([1.0, math.inf]), "actor")
    check_finite("iteration", torch.tensor(3), "policy")  # integer tensors are always finite


def test_guard_skips_and_counts_or_raises():
    guard = FiniteGuard("skip", "the actor")
    assert guard.check("loss", torch.tensor(1.0))
    assert not guard.check("loss", torch.tensor(math.nan)) and guard.skipped == 1

    model = torch.nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    model.weight.grad[0, 0] = math.inf
    assert not guard.check_gradients(model, prefix="actor.") and guard.skipped == 2
    assert model.weight.grad is None and model.bias.grad is None  # the optimizer step changes nothing

    model(torch.ones(1, 2)).sum().backward()
    model.bias.grad.fill_(math.nan)
    with pytest.raises(NonFiniteError, match=r"non-finite gradient of actor.bias \(1 of 1 values NaN\) from the actor"):
        FiniteGuard("raise", "the actor").check_gradients(model, prefix="actor.")
    with pytest.raises(ValueError, match="on_nonfinite must be 'raise' or 'skip'"):
        FiniteGuard("ignore")


def test_export_refuses_nonfinite_weights_and_writes_nothing(tmp_path, tiny_exports):
    model = AutoModelForCausalLM.from_pretrained(tiny_exports["sft"])
    tokenizer_source = tiny_exports["tokenizer"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = math.nan
    assert first_nonfinite_weight(model) == "lm_head.weight (1 of 1024 values NaN)".replace(
        "1024", str(model.lm_head.weight.numel())
    )
    target = tmp_path / "exports" / "sft"
    with pytest.raises(NonFiniteError, match=f"refusing to export to '{target}': non-finite weight lm_head.weight"):
        export_pretrained(model, tokenizer, target, metadata={"stage": "sft"})
    assert not (tmp_path / "exports").exists()


def _sft_config(root: Path, lr: float, on_nonfinite: str) -> str:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 1,
            "limit_train_batches": 4,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(root / "run"),
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(root / "logs"), "name": "sft", "version": 0},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(root / "ckpt"), "every_n_train_steps": 1, "save_last": True},
                }
            ],
        },
        "model": {
            "class_path": "repo_lightning.modules.SFTModule",
            "init_args": {
                "model_config": dict(TINY_MODEL),
                # SGD without momentum: the first step's update is lr * gradient, which overflows float32.
                "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": lr}},
                "on_nonfinite": on_nonfinite,
                "export_dir": str(root / "exports" / "sft"),
            },
        },
        "data": {
            "mode": "sft",
            "world": dict(TINY_WORLD),
            "batch_size": 4,
            "max_prompt_length": 32,
            "max_length": 48,
            "cache_dir": str(root / "cache"),
        },
    }
    path = root / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_diverging_sft_stops_naming_the_first_nonfinite_value_and_checkpoints_nothing_nonfinite(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", _sft_config(tmp_path, 1e38, "raise")])
    assert exit_info.value.code == 2
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "non-finite" in line[0] and "model (built from model.init_args.model_config)" in line[0]
    assert not (tmp_path / "exports").exists()
    for checkpoint in (tmp_path / "ckpt").glob("*.ckpt"):
        state = torch.load(checkpoint, weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), checkpoint


def test_skip_mode_counts_and_logs_skipped_batches(tmp_path):
    cli = main(["fit", "--config", _sft_config(tmp_path, 1e38, "skip")])
    assert cli.model.finite_guard.skipped >= 1
    assert first_nonfinite_weight(cli.model.model) is None
    events = EventAccumulator(str(tmp_path / "logs" / "sft" / "version_0"))
    events.Reload()
    assert float(cli.trainer.callback_metrics["train/nonfinite_skipped"]) == cli.model.finite_guard.skipped
    # A skipped batch makes no optimizer step, so several skips share a step; TensorBoard has at least one of them.
    assert max(s.value for s in events.Scalars("train/nonfinite_skipped")) >= 1


def test_fast_check_is_exact_when_finite_and_falls_back_to_naming_the_tensor():
    from repo_lightning.finite_guard import all_finite, first_nonfinite_gradient

    finite = [torch.ones(3), torch.ones(2, dtype=torch.bfloat16), torch.tensor([1, 2]), torch.zeros(0)]
    assert all_finite(finite)
    for bad in (math.nan, math.inf, -math.inf):
        assert not all_finite([*finite, torch.tensor([0.0, bad])])
    # Finite values whose sum overflows: the fast check says "maybe", the exact path clears them.
    huge = torch.full((4,), 3e38)
    assert not all_finite([huge])
    model = torch.nn.Linear(4, 1)
    model.weight.grad = huge.view(1, 4).clone()
    model.bias.grad = torch.zeros(1)
    assert first_nonfinite_gradient(model.named_parameters()) is None
    with torch.no_grad():
        model.weight.copy_(huge.view(1, 4))
    assert first_nonfinite_weight(model) is None
    # ... and still names the first truly non-finite one behind an overflowing sum.
    model.bias.grad = torch.tensor([math.nan])
    assert first_nonfinite_gradient(model.named_parameters()) == "gradient of bias (1 of 1 values NaN)"
    with torch.no_grad():
        model.bias.fill_(math.inf)
    assert first_nonfinite_weight(model) == "bias (1 of 1 values inf)"
