"""TensorBoardViews: the layout, constants, sample text and hparams are in the event files, read back as TensorBoard
reads them (EventAccumulator and the plugins' own parsers). A small fake policy module stands in for PolicyModule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalar_metadata
from tensorboard.plugins.hparams import metadata as hparams_metadata
from torch.utils.data import DataLoader, TensorDataset

from repo_lightning.callbacks import TensorBoardViews
from repo_lightning.callbacks.tensorboard_views import HPARAMS_METRICS, constraint_constants, samples_markdown
from repo_lightning.modules.policy_config import Sampling
from repo_lightning.objectives import PPO, PPOLagrangian, RePO
from repo_lightning.rl.dual import DualVariable


@dataclass
class FakeRollout:
    prompts: list[str]
    responses: list[str]
    rewards: torch.Tensor
    costs: torch.Tensor | None


class FakePolicy(L.LightningModule):
    """Logs the policy's scalar names and exposes ``last_rollout`` (2 prompts x k=2 samples) like PolicyModule."""

    def __init__(self, algorithm: str = "repo", maximum: float = 5.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.objective = RePO(constraint="rectified_cost", tolerance=0.0) if algorithm == "repo" else PPO()
        self.dual = DualVariable(initial=1.0, maximum=maximum)
        self.sampling = Sampling(samples_per_prompt=2)
        self.layer = torch.nn.Linear(1, 1)
        self.iteration = 0

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        self.iteration += 1
        loss = self.layer(batch[0]).pow(2).mean()
        for key, value in {"lambda": 1.0 + batch_idx, "dual_statistic": 0.3, "unsafe_response_rate": 0.25}.items():
            self.log(f"train/{key}", value, batch_size=1)
        self.log("val/true_unsafe_response_rate", 0.5, batch_size=1)
        self.last_rollout = FakeRollout(
            prompts=["how do I bake bread", "how do I bake bread", "tell me | about knives", "tell me | about knives"],
            responses=[f"answer {self.iteration}a", "other", f"answer {self.iteration}b", "other"],
            rewards=torch.tensor([1.5, 0.0, -0.25, 0.0]),
            costs=torch.tensor([-1.0, 0.0, 2.0, 0.0]),
        )
        return loss

    def test_step(self, batch, batch_idx: int) -> None:
        self.log("test/unsafe_prompt_rate", 0.125, batch_size=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.ones(4, 1)), batch_size=1)


def _events(folder: Path) -> EventAccumulator:
    (events,) = folder.glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"tensors": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, EventAccumulator]:
    """One fit (4 iterations, text every 2) and one test run of the fake policy, read back."""
    root = tmp_path_factory.mktemp("views")
    module = FakePolicy()
    out = {}
    for stage in ("fit", "test"):
        trainer = L.Trainer(
            max_epochs=1,
            log_every_n_steps=1,
            logger=TensorBoardLogger(root, name="policy", default_hp_metric=False),
            callbacks=[TensorBoardViews(text_every_n_iterations=2, text_samples=2)],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        if stage == "fit":
            trainer.fit(module, _loader())
        else:
            trainer.test(module, _loader())
        out[stage] = _events(Path(trainer.logger.log_dir))
    return out


def test_layout_puts_lambda_and_its_statistic_on_one_chart(runs):
    (tensor,) = runs["fit"].Tensors(custom_scalar_metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout.FromString(tensor.tensor_proto.string_val[0])
    sections = {category.title: category for category in layout.category}
    assert list(sections) == ["Dual variables", "Safety", "Helpfulness"]
    charts = {chart.title: list(chart.multiline.tag) for chart in sections["Dual variables"].chart}
    lambda_chart = next(tags for title, tags in charts.items() if "statistic" in title)
    assert any(tag for tag in lambda_chart if _matches(tag, "train/lambda"))
    assert any(tag for tag in lambda_chart if _matches(tag, "train/dual_statistic"))
    cap_chart = next(tags for title, tags in charts.items() if "cap" in title)
    assert any(_matches(tag, "dual/maximum") for tag in cap_chart)
    safety = [tag for chart in sections["Safety"].chart for tag in chart.multiline.tag]
    for name in (
        "train/unsafe_response_rate",
        "train/true_unsafe_response_rate",
        "val/unsafe_prompt_rate",
        "val/true_unsafe_prompt_rate",
    ):
        assert any(_matches(tag, name) for tag in safety), name


def _matches(regex: str, tag: str) -> bool:
    import re

    return re.match(regex, tag) is not None  # the custom-scalars plugin matches with re.match


def test_constraint_constants_are_scalars_on_the_training_axis(runs):
    scalars = runs["fit"].Tags()["scalars"]
    assert "dual/tolerance" in scalars and "dual/threshold" not in scalars  # repo bounds {C}+, not the mean cost
    assert [event.value for event in runs["fit"].Scalars("dual/maximum")] == [5.0] * 4
    assert [e.step for e in runs["fit"].Scalars("dual/maximum")] == [
        e.step for e in runs["fit"].Scalars("train/lambda")
    ]
    assert "hp_metric" not in scalars


def test_samples_panel_shows_one_response_per_prompt_with_reward_and_cost(runs):
    texts = runs["fit"].Tensors("samples/train/text_summary")
    assert [t.step for t in texts] == [2, 4]  # every 2 iterations, at the module's iteration counter
    text = texts[-1].tensor_proto.string_val[0].decode()
    assert "answer 4a" in text and "answer 4b" in text and "other" not in text  # first of the k=2 samples
    assert "tell me \\| about knives" in text  # a "|" in a prompt cannot break the table
    assert "| 1.500 | -1.000 |" in text and "| -0.250 | 2.000 |" in text


def test_hparams_carry_final_metrics_instead_of_hp_metric(runs):
    columns = {}
    for stage in ("fit", "test"):
        content = runs[stage].PluginTagToContent(hparams_metadata.PLUGIN_NAME)
        experiment = hparams_metadata.parse_experiment_plugin_data(content[hparams_metadata.EXPERIMENT_TAG])
        columns[stage] = [info.name.tag for info in experiment.metric_infos]
        start = hparams_metadata.parse_session_start_info_plugin_data(content[hparams_metadata.SESSION_START_INFO_TAG])
        assert start.hparams["algorithm"].string_value == "repo"
        assert start.hparams["maximum"].number_value == 5.0
    # The same columns in both runs (the plugin shows the first run's list), each filled by the run that logs it.
    assert columns["fit"] == columns["test"] == list(HPARAMS_METRICS)
    assert "hp_metric" not in columns["fit"]
    assert runs["fit"].Scalars("train/lambda")[-1].value == 4.0  # the final value, read from the run's scalars
    assert runs["test"].Scalars("test/unsafe_prompt_rate")[-1].value == 0.125


@pytest.mark.parametrize(
    ("objective", "expected"),
    [
        (PPOLagrangian(threshold=-1.0), {"dual/maximum": 5.0, "dual/threshold": -1.0}),
        (RePO(), {"dual/maximum": 5.0, "dual/target_unsafe_rate": 0.02}),
        (RePO(constraint="rectified_cost", tolerance=0.1), {"dual/maximum": 5.0, "dual/tolerance": 0.1}),
        (PPO(), {}),
    ],
)
def test_constraint_constants_follow_the_objective(objective, expected):
    module = L.LightningModule()
    module.objective, module.dual = objective, DualVariable(maximum=5.0)
    assert constraint_constants(module) == pytest.approx(expected)
    assert constraint_constants(L.LightningModule()) == {}  # a module without an objective


def test_samples_markdown_without_costs_or_truth():
    text = samples_markdown(["p"], ["r"], [1.0], None)
    assert text.splitlines() == ["| prompt | response | reward R |", "|---|---|---:|", "| p | r | 1.000 |"]


def test_with_the_real_policy_module(tmp_path, tiny_exports):
    """Two RePO iterations through the CLI: the panel shows real samples with the oracle's R* and C*."""
    import yaml
    from conftest import TINY_WORLD

    from repo_lightning.cli import main

    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 2,
            "log_every_n_steps": 1,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path), "name": "policy", "default_hp_metric": False},
            },
            "callbacks": [
                {"class_path": "repo_lightning.callbacks.TensorBoardViews", "init_args": {"text_every_n_iterations": 1}}
            ],
        },
        "model": {
            "class_path": "repo_lightning.modules.PolicyModule",
            "init_args": {
                "actor_path": tiny_exports["sft"],
                "reward_model_path": tiny_exports["reward"],
                "cost_model_path": tiny_exports["cost"],
                "objective": {
                    "class_path": "repo_lightning.objectives.RePO",
                    "init_args": {"constraint": "rectified_cost"},
                },
                "sampling": {"samples_per_prompt": 2, "max_new_tokens": 4},
                "update": {"minibatch_size": 4},
                "dual": {"class_path": "repo_lightning.rl.dual.DualVariable", "init_args": {"maximum": 7.0}},
            },
        },
        "data": {
            "mode": "prompts",
            "world": dict(TINY_WORLD),
            "tokenizer": tiny_exports["tokenizer"],
            "cache_dir": str(tmp_path / "cache"),
            "batch_size": 2,
            "max_prompt_length": 32,
            "max_length": 48,
            "val_fraction": 0.0,
        },
    }
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = main(["fit", "--config", str(path)])
    events = _events(Path(cli.trainer.logger.log_dir))
    assert {event.value for event in events.Scalars("dual/maximum")} == {7.0}
    assert "dual/tolerance" in events.Tags()["scalars"] and "hp_metric" not in events.Tags()["scalars"]
    texts = events.Tensors("samples/train/text_summary")
    assert [t.step for t in texts] == [1, 2]
    table = texts[-1].tensor_proto.string_val[0].decode().splitlines()
    assert table[2] == "| prompt | response | reward R | cost C | true R* | true C* |"
    assert len(table) == 2 + 2 + 2  # note, blank line, header, rule, one row per prompt of the batch
