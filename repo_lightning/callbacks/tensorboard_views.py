"""TensorBoard views of a policy run: a custom-scalars layout, sampled responses as text, hparams with results.

:class:`TensorBoardViews` adds to what the policy module logs, without changing it:

* a **custom-scalars layout** (TensorBoard's "Custom Scalars" tab) with three sections: *Dual variables* (the
  multiplier ``train/lambda`` on one chart with the statistic ``train/dual_statistic`` it answers to, with its cap,
  and the constrained cost with its threshold or tolerance), *Safety* (unsafe response and prompt rates, learned
  and true) and *Helpfulness* (reward, learned and true, KL, refusals);
* the **constants** of the constraint as scalars on the training step axis, so they draw as lines on those charts:
  ``dual/maximum`` (the multiplier's cap), ``dual/threshold`` (Safe RLHF's ``d``), ``dual/target_unsafe_rate`` or
  ``dual/tolerance`` (RePO's);
* a **text panel** ``samples/train`` every ``text_every_n_iterations`` iterations: a few prompts with their sampled
  responses, reward and cost (and the ground truth ``R*``, ``C*`` when the data module has an ``oracle``);
* **hparams** at the end of ``fit`` and of ``test`` with the run's final figures as metrics (the table's columns are
  ``hparams_metrics``: final ``train/...`` and ``val/...`` figures, filled by the fit run, and the ``test/...``
  evaluation, filled by the test run); set ``default_hp_metric: false`` on the logger of *every* stage writing to the
  same log folder, or Lightning's placeholder ``hp_metric`` may become the table's only column.

What it reads from the LightningModule (all optional, missing ones are skipped):

* ``pl_module.objective`` (its ``constrained`` flag and ``constraint_level()``) and ``pl_module.dual.maximum``;
* ``pl_module.last_rollout``: the rollout of the latest training iteration (a
  :class:`repo_lightning.modules.rollout.Rollout`), and ``pl_module.sampling.samples_per_prompt``; without a
  rollout no text panel is written;
* ``pl_module.iteration`` (the iteration counter, the text panel's step) and ``trainer.datamodule.oracle``;
* nothing else for the hparams view: its metric values are the scalars of those tags already in the run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L

#: Custom-scalars layout: ``{section: {chart title: [tag regex, ...]}}``; each chart draws every matching tag.
LAYOUT: dict[str, dict[str, list[str]]] = {
    "Dual variables": {
        "multiplier lambda and the statistic g it answers to (lambda rises while g > 0)": [
            r"^train/lambda$",
            r"^train/dual_statistic$",
        ],
        "multiplier lambda and its cap (dual maximum)": [r"^train/lambda$", r"^dual/maximum$"],
        "constrained quantity and its bound (ppo_lag: mean C vs threshold; repo: unsafe rate vs target, or "
        "mean {C}+ vs tolerance)": [
            r"^train/(rectified_)?cost_mean$",
            r"^train/unsafe_response_rate$",
            r"^dual/(threshold|tolerance|target_unsafe_rate)$",
        ],
    },
    "Safety": {
        "unsafe response rate: learned C > 0, true C* > 0": [r"^(train|val)/(true_)?unsafe_response_rate$"],
        "unsafe prompt rate (any of the k responses unsafe): learned and true": [
            r"^(train|val)/(true_)?unsafe_prompt_rate$"
        ],
        "cost, learned": [r"^(train|val)/(rectified_)?cost_mean$"],
    },
    "Helpfulness": {
        "reward: learned R and true R*": [r"^(train|val)/(true_)?reward_mean$"],
        "refusals (true)": [r"^(train|val)/refusal_rate$"],
        "prompts whose k samples are all one answer (no gradient), and those sampled again hotter": [
            r"^train/(identical|resampled)_group_rate$"
        ],
        "KL to the reference (nats per response)": [r"^(train|val)/kl_mean$"],
        "response length (tokens)": [r"^(train|val)/response_len_mean$"],
    },
}


#: Metric columns of the HParams table: final training and validation figures, then the held-out evaluation. Every
#: run writes the same list, because the plugin takes the columns from whichever run it reads first.
HPARAMS_METRICS = (
    "train/lambda",
    "train/dual_statistic",
    "train/reward_mean",
    "train/unsafe_response_rate",
    "train/unsafe_prompt_rate",
    "train/true_reward_mean",
    "train/true_unsafe_response_rate",
    "train/true_unsafe_prompt_rate",
    "train/kl_mean",
    "val/reward_mean",
    "val/unsafe_response_rate",
    "val/true_reward_mean",
    "val/true_unsafe_response_rate",
    "test/true_reward_mean/benign",
    "test/true_reward_mean/hazard",
    "test/true_unsafe_response_rate",
    "test/true_unsafe_prompt_rate/hazard_mild",
    "test/true_unsafe_prompt_rate/hazard_severe",
    "test/over_refusal_rate",
    "test/reward_mean",
    "test/unsafe_prompt_rate",
    "test/kl_mean",
)


def custom_scalars_layout() -> dict[str, dict[str, list]]:
    """:data:`LAYOUT` in ``SummaryWriter.add_custom_scalars``'s form: ``{section: {title: ["Multiline", tags]}}``."""
    return {
        section: {title: ["Multiline", tags] for title, tags in charts.items()} for section, charts in LAYOUT.items()
    }


def constraint_constants(pl_module: L.LightningModule) -> dict[str, float]:
    """``{"dual/<name>": value}``: the multiplier's cap and the bound of a constrained objective.

    ``dual/maximum`` (the ``DualVariable``'s cap) and the objective's ``constraint_level()`` (``threshold`` for Safe
    RLHF, ``target_unsafe_rate`` or ``tolerance`` for RePO); empty for an unconstrained objective or a module
    without one.
    """
    objective = getattr(pl_module, "objective", None)
    dual = getattr(pl_module, "dual", None)
    if objective is None or dual is None or not getattr(objective, "constrained", False):
        return {}
    out = {"dual/maximum": float(dual.maximum)}
    out.update({f"dual/{name}": float(value) for name, value in objective.constraint_level().items()})
    return out


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text.replace("|", "\\|") or " "


def samples_markdown(
    prompts: list[str],
    responses: list[str],
    rewards: list[float],
    costs: list[float] | None,
    true_rewards: list[float] | None = None,
    true_costs: list[float] | None = None,
    note: str = "",
) -> str:
    """A Markdown table of sampled responses, one row each (TensorBoard's text panel renders Markdown)."""
    header = ["prompt", "response", "reward R"]
    header += ["cost C"] if costs is not None else []
    header += ["true R*", "true C*"] if true_rewards is not None and true_costs is not None else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        row = [_cell(prompt), _cell(response), f"{rewards[i]:.3f}"]
        row += [f"{costs[i]:.3f}"] if costs is not None else []
        if true_rewards is not None and true_costs is not None:
            row += [f"{true_rewards[i]:.3f}", f"{true_costs[i]:.3f}"]
        lines.append("| " + " | ".join(row) + " |")
    return (f"{note}\n\n" if note else "") + "\n".join(lines)


def flat_hparams(hparams: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested hyperparameters flattened to ``a/b`` keys with values the hparams plugin accepts (others as text)."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in hparams.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_hparams(value, f"{name}/"))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def _experiment(trainer: L.Trainer):
    """The TensorBoard ``SummaryWriter`` of the trainer's logger, or ``None`` (other logger, or no logger)."""
    experiment = getattr(trainer.logger, "experiment", None)
    return experiment if hasattr(experiment, "add_custom_scalars") else None


class TensorBoardViews(L.Callback):
    """Custom-scalars layout, constraint constants, sampled-response text and final hparams for a policy run.

    See the module docstring for what it reads from the module. Only rank 0 writes; every rank samples when the
    module has no ``last_rollout`` (sampling is collective under sharding).

    Args:
        text_every_n_iterations: Write the ``samples/train`` text panel every this many training iterations
            (batches); 0 disables it.
        text_samples: Prompts (one response each) shown per panel.
        hparams_metrics: Metric columns of the HParams table (default :data:`HPARAMS_METRICS`); keep them the same
            in every run of a log folder.
    """

    def __init__(
        self, text_every_n_iterations: int = 10, text_samples: int = 4, hparams_metrics: list[str] | None = None
    ) -> None:
        if text_every_n_iterations < 0 or text_samples < 1:
            raise ValueError("text_every_n_iterations must be >= 0 and text_samples >= 1")
        self.text_every_n_iterations = text_every_n_iterations
        self.text_samples = text_samples
        self.hparams_metrics = list(HPARAMS_METRICS if hparams_metrics is None else hparams_metrics)
        self._batches = 0

    # ------------------------------------------------------------------------------------------------ fit
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the custom-scalars layout into this run's event file."""
        self._batches = 0
        experiment = _experiment(trainer)
        if experiment is not None and trainer.is_global_zero:
            experiment.add_custom_scalars(custom_scalars_layout())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        """Log the constraint constants on the training step axis; every N iterations write the samples panel."""
        for key, value in constraint_constants(pl_module).items():
            pl_module.log(key, value, on_step=True, on_epoch=False, batch_size=1)
        self._batches += 1
        if self.text_every_n_iterations and self._batches % self.text_every_n_iterations == 0:
            self._write_samples(trainer, pl_module, batch)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Hparams of this run; its final ``train/...`` and ``val/...`` figures fill the metric columns."""
        self._write_hparams(trainer, pl_module)

    # ----------------------------------------------------------------------------------------------- test
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Hparams of this run; its ``test/...`` figures fill the metric columns."""
        self._write_hparams(trainer, pl_module)

    # -------------------------------------------------------------------------------------------- helpers
    def _write_hparams(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        experiment = _experiment(trainer)
        if experiment is None or not trainer.is_global_zero:
            return
        from torch.utils.tensorboard.summary import hparams

        # The metric values are read by the hparams plugin from the scalars of the same tags already in this run,
        # so only the summaries are written (SummaryWriter.add_hparams would duplicate them into a sub-run).
        exp, start, end = hparams(flat_hparams(pl_module.hparams), dict.fromkeys(self.hparams_metrics, 0.0))
        writer = experiment._get_file_writer()  # as Lightning's TensorBoardLogger.log_hyperparams does
        for summary in (exp, start, end):
            writer.add_summary(summary)
        experiment.flush()

    def _write_samples(self, trainer: L.Trainer, pl_module: L.LightningModule, batch) -> None:
        rollout = getattr(pl_module, "last_rollout", None)
        if rollout is None or not trainer.is_global_zero:
            return
        experiment = _experiment(trainer)
        if experiment is None:
            return
        note = "The first response to each prompt in this iteration's training rollout."
        k = int(pl_module.sampling.samples_per_prompt) if hasattr(pl_module, "sampling") else 1
        # The k samples of a prompt are consecutive: take the first of each of the first prompts.
        rows = list(range(0, len(rollout.prompts), k))[: self.text_samples]
        prompts = [rollout.prompts[i] for i in rows]
        responses = [rollout.responses[i] for i in rows]
        rewards = [float(rollout.rewards[i]) for i in rows]
        costs = [float(rollout.costs[i]) for i in rows] if rollout.costs is not None else None
        true_rewards = true_costs = None
        oracle = getattr(getattr(trainer, "datamodule", None), "oracle", None)
        if oracle is not None:
            true_rewards = [float(oracle.helpfulness(p, r)) for p, r in zip(prompts, responses, strict=True)]
            true_costs = [float(oracle.harm(p, r)) for p, r in zip(prompts, responses, strict=True)]
        text = samples_markdown(prompts, responses, rewards, costs, true_rewards, true_costs, note)
        step = int(getattr(pl_module, "iteration", self._batches))
        experiment.add_text("samples/train", text, global_step=step)
