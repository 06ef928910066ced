"""The command line: ``python -m repo_lightning {fit,validate,test} --config configs/....yaml``.

One LightningCLI chooses the stage's LightningModule from the config's ``model.class_path`` (``SFTModule``,
``RewardModule``, ``CostModule``, ``PolicyModule``) and always uses the one :class:`RLHFDataModule`. The tokenizer is
set once, in ``data.tokenizer``, and linked into the module.

Other libraries' known noise (Lightning's tips, known deprecation warnings, Hugging Face progress bars) is filtered
here, at the entry point (:func:`repo_lightning.console.silence_known_noise`); ``REPO_LIGHTNING_VERBOSE=1`` shows it.
"""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.cli import LightningCLI

from repo_lightning.callbacks.stage_progress import StageProgress
from repo_lightning.console import PROGRESS_ENV, silence_known_noise
from repo_lightning.data.datamodule import RLHFDataModule


class RLHFCLI(LightningCLI):
    """LightningCLI with the project's argument links."""

    def add_arguments_to_parser(self, parser) -> None:
        """Link the data's resolved tokenizer into the module (set once, never repeated in YAML)."""
        parser.link_arguments("data.tokenizer_path", "model.init_args.tokenizer_path", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would overwrite the config with the hyperparameters stored in --ckpt_path, silently undoing
        # evaluation settings given on the command line (report_dir, eval_samples_per_prompt, ...). Here the config
        # and command line define the module; the checkpoint restores weights and training state only.
        return


def main(args: list[str] | None = None, run: bool = True) -> RLHFCLI:
    """Run the CLI (``args=None`` reads ``sys.argv``); returns the CLI object for tests and scripts."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    silence_known_noise()
    # Set by the pipeline, which shows one progress line per stage; added here so no config has to name it.
    progress = os.environ.get(PROGRESS_ENV)
    return RLHFCLI(
        L.LightningModule,
        RLHFDataModule,
        subclass_mode_model=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        trainer_defaults={"callbacks": [StageProgress(progress)]} if progress else None,
    )
