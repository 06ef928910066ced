"""The command line: ``python -m repo_lightning {fit,validate,test} --config configs/....yaml``.

One LightningCLI chooses the stage's LightningModule from the config's ``model.class_path`` (``SFTModule``,
``RewardModule``, ``CostModule``, ``PolicyModule``) and always uses the one :class:`RLHFDataModule`. The tokenizer is
set once, in ``data.tokenizer``, and linked into the module.

Errors a user can fix (a wrong key or value, a missing or malformed file, a model with NaN weights: the
:mod:`repo_lightning.errors` classes, the parser's errors and Lightning's ``MisconfigurationException``) print one
line, ``error: <message>``, and exit with code 2; anything else keeps its traceback. ``--debug`` or
``REPO_LIGHTNING_DEBUG=1`` shows the traceback of every error. Inputs are checked (model folders, ``--ckpt_path``,
every data row) before the logger writes a run folder, and a run that still fails on bad input removes the folders
it created, unless they hold a checkpoint. ``docs/errors.md`` lists what is checked.

Other libraries' known noise (Lightning's tips, known deprecation warnings, Hugging Face progress bars) is filtered
here, at the entry point (:func:`repo_lightning.console.silence_known_noise`); ``REPO_LIGHTNING_VERBOSE=1`` shows it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import re
import shutil
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from transformers import AutoConfig

from repo_lightning.callbacks.stage_progress import StageProgress
from repo_lightning.console import PROGRESS_ENV, silence_known_noise
from repo_lightning.data.datamodule import RLHFDataModule
from repo_lightning.errors import ConfigError, MissingInputError, UserInputError
from repo_lightning.finite_guard import NonFiniteWeightCheck
from repo_lightning.models.backbone import config_from_dict
from repo_lightning.modules import CostModule, PolicyModule, RewardModule, SFTModule
from repo_lightning.validation import (
    check_checkpoint_file,
    check_export_dir,
    check_export_stage,
    check_model_path,
    check_non_negative,
    check_position_limit,
    check_seed,
    check_writable_dir,
)

DEBUG_ENV = "REPO_LIGHTNING_DEBUG"
#: Module arguments that name a model folder or hub repository.
MODEL_PATH_KEYS = ("model_name_or_path", "actor_path", "reward_model_path", "cost_model_path")
#: The stage each module exports as (``repo_lightning.json``'s ``stage``), for the export-onto-another-stage check.
STAGES = {SFTModule: "sft", RewardModule: "reward", CostModule: "cost", PolicyModule: "policy"}
#: The errors printed as one line (exit code 2).
USER_ERRORS = (UserInputError, argparse.ArgumentError, MisconfigurationException)


class RLHFCLI(LightningCLI):
    """LightningCLI with the project's argument links, input checks and clean-up of folders left by a failed run."""

    def __init__(self, *args, **kwargs) -> None:
        """As ``LightningCLI``; on a user error, folders this run created and left without a checkpoint are removed."""
        self._new_dirs: list[Path] = []
        try:
            super().__init__(*args, **kwargs)
        except Exception as error:
            if user_error(error) is not None:
                self._remove_new_dirs()
            raise

    def add_arguments_to_parser(self, parser) -> None:
        """Link the data's resolved tokenizer into the module (set once, never repeated in YAML)."""
        parser.link_arguments("data.tokenizer_path", "model.init_args.tokenizer_path", apply_on="instantiate")

    def _set_seed(self) -> None:
        """As LightningCLI, with an out-of-range ``seed_everything`` a one-line error (was numpy's traceback)."""
        seed = self._get(self.config, "seed_everything")
        if not isinstance(seed, bool) and isinstance(seed, int):
            check_seed("seed_everything", seed)
        super()._set_seed()

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would overwrite the config with the hyperparameters stored in --ckpt_path, silently undoing
        # evaluation settings given on the command line (evaluation.report_dir, ...). Here the config
        # and command line define the module; the checkpoint restores weights and training state only.
        return

    def _stage_config(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def _check_inputs(self, stage: str) -> None:
        """Model folders, the checkpoint and every data row, before the logger writes anything."""
        hparams = self.model.hparams
        # Lightning skips clipping for a value <= 0: a negative one would train unclipped, silently
        check_non_negative("trainer.gradient_clip_val", self.trainer.gradient_clip_val)
        for key in MODEL_PATH_KEYS:
            check_model_path(f"model.init_args.{key}", hparams.get(key))
        for key in ("reward_ensemble_paths", "cost_ensemble_paths"):
            for index, path in enumerate(hparams.get(key) or []):
                check_model_path(f"model.init_args.{key}[{index}]", path)
        ckpt_path = self._stage_config().get("ckpt_path")
        if ckpt_path is not None and ckpt_path not in ("last", "best", "hpc", "registry") and "://" not in ckpt_path:
            if not Path(ckpt_path).exists():  # a file, or a folder for a sharded (distributed) checkpoint
                raise MissingInputError(f"ckpt_path: no checkpoint at {ckpt_path!r}")
            check_checkpoint_file("ckpt_path", ckpt_path)
        if stage == "fit":
            inputs = {f"model.init_args.{key}": hparams.get(key) for key in MODEL_PATH_KEYS}
            check_export_dir("model.init_args.export_dir", hparams.get("export_dir"), inputs)
            check_export_stage("model.init_args.export_dir", hparams.get("export_dir"), STAGES.get(type(self.model)))
        report_dir = (hparams.get("evaluation") or {}).get("report_dir")
        if stage == "test" and report_dir and Path(report_dir).exists() and not Path(report_dir).is_dir():
            raise ConfigError(
                f"model.init_args.evaluation.report_dir: {report_dir!r} is a file; expected a folder for the report"
            )
        self._check_output_dirs(stage)
        self.datamodule.prepare_data()
        self.datamodule.setup(stage)
        self._check_positions()
        self._note_new_dirs()

    def _check_output_dirs(self, stage: str) -> None:
        """Every folder the run writes must be makeable, before it starts (not at the export after training)."""
        trainer, hparams = self.trainer, self.model.hparams
        if not trainer.loggers:  # else the loggers' folders (and the checkpoints' under them) are written instead
            check_writable_dir("trainer.default_root_dir", trainer.default_root_dir)
        for logger in trainer.loggers:
            check_writable_dir("trainer.logger.init_args.save_dir", logger.save_dir)
        for callback in trainer.callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                check_writable_dir("trainer.callbacks: ModelCheckpoint's init_args.dirpath", callback.dirpath)
        if stage == "fit":
            check_writable_dir("model.init_args.export_dir", hparams.get("export_dir"))
        if stage == "test":
            check_writable_dir(
                "model.init_args.evaluation.report_dir", (hparams.get("evaluation") or {}).get("report_dir")
            )

    def _check_positions(self) -> None:
        """The longest input must fit the trained model's position embeddings (GPT-2, OPT: a learned one each)."""
        hparams, data = self.model.hparams, self.datamodule
        if hparams.get("actor_path"):  # the policy: the prompt plus the sampled response
            key, source = "model.init_args.actor_path", hparams["actor_path"]
            new_tokens = (hparams.get("sampling") or {}).get("max_new_tokens", 0)
            length_key = "data.max_prompt_length + model.init_args.sampling.max_new_tokens"
            length = data.max_prompt_length + new_tokens
            shown = f"{data.max_prompt_length} + {new_tokens} = {length}"
        else:
            key, source = "model.init_args.model_name_or_path", hparams.get("model_name_or_path")
            length_key, length, shown = "data.max_length", data.max_length, str(data.max_length)
        try:
            if source is not None:
                config = AutoConfig.from_pretrained(source, trust_remote_code=hparams.get("trust_remote_code", False))
            elif hparams.get("model_config") is not None:
                key, config = "model.init_args.model_config", config_from_dict(hparams["model_config"], data.tokenizer)
            else:
                return
        except (OSError, ValueError):  # left to the loader, whose error names the folder
            return
        check_position_limit(length_key, length, shown, key, config)

    def before_fit(self) -> None:
        """Check inputs before ``fit``."""
        self._check_inputs("fit")

    def before_validate(self) -> None:
        """Check inputs before ``validate``."""
        self._check_inputs("validate")

    def before_test(self) -> None:
        """Check inputs before ``test``."""
        self._check_inputs("test")

    def _note_new_dirs(self) -> None:
        """Remember the run and checkpoint folders this run will create (the top-most of each that is new)."""
        trainer = self.trainer
        if not trainer.is_global_zero:  # rank 0 writes the run folder; other ranks must not fix a logger version early
            return
        candidates = [trainer.log_dir] if trainer.log_dir else []
        candidates += [cb.dirpath for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
        for candidate in candidates:
            path = Path(candidate).absolute()
            if path.exists():
                continue
            while not path.parent.exists() and path.parent != path:
                path = path.parent
            self._new_dirs.append(path)

    def _remove_new_dirs(self) -> None:
        for path in self._new_dirs:
            if path.is_dir() and not any(path.rglob("*.ckpt")):
                shutil.rmtree(path, ignore_errors=True)


def user_error(error: BaseException) -> BaseException | None:
    """The user error ``error`` is or was raised from (the parser wraps errors of the classes it builds), else ``None``.

    Args:
        error: The exception that stopped the run.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, USER_ERRORS):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def one_line(error: BaseException) -> str:
    """The message of a user error on one line; the parser's nested messages are reduced to key and reason."""
    message = str(error)
    if isinstance(error, argparse.ArgumentError):
        message = _parser_message(message)
    return " ".join(message.split())


_PARSER_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "Expected a <class 'NoneType'>",
)


def _parser_message(message: str) -> str:
    """``model.init_args.warmup_steps: Expected a <class 'int'>. Got value: abc`` from jsonargparse's nested report."""
    keys: list[str] = []
    details: list[str] = []
    for raw in message.splitlines():
        line = raw.strip().removeprefix("- ").strip()
        if not line or line.startswith(_PARSER_NOISE):
            continue
        if match := re.match(r'Parser key "([^"]+)":\s*(.*)', line):
            keys.append(match[1])
            if match[2]:
                details.append(match[2])
        elif match := re.match(r"Problem with given class_path '([^']+)':\s*(.*)", line):
            if not _is_dataclass_path(match[1]):  # a settings group (estimation, update, ...) has no init_args
                keys.append("init_args")
            if match[2]:
                details.append(match[2])
        else:
            details.append(line)
    text = " ".join(details)
    text = re.sub(r"^unrecognized arguments: (fit|validate|test|predict) ", "unrecognized arguments: ", text)
    if text.startswith("unrecognized arguments"):
        text += " (see --help for the accepted keys)"
    return f"{'.'.join(keys)}: {text}" if keys else text


def _is_dataclass_path(class_path: str) -> bool:
    """Whether ``class_path`` (``repo_lightning.modules.policy_config.Estimation``) names a dataclass."""
    module, _, name = class_path.rpartition(".")
    try:
        return dataclasses.is_dataclass(getattr(importlib.import_module(module), name, None))
    except ImportError:
        return False


def main(args: list[str] | None = None, run: bool = True) -> RLHFCLI:
    """Run the CLI (``args=None`` reads ``sys.argv``); returns the CLI object for tests and scripts.

    Raises:
        SystemExit: code 2 after printing ``error: <message>`` for a user error (see the module docstring).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if args is None:  # LightningCLI reads sys.argv itself (and warns when it is also given args)
        debug |= "--debug" in sys.argv[1:]
        sys.argv = [arg for arg in sys.argv if arg != "--debug"]
    else:
        debug |= "--debug" in args
        args = [arg for arg in args if arg != "--debug"]
    silence_known_noise()
    # Set by the pipeline, which shows one progress line per stage; added here so no config has to name it.
    progress = os.environ.get(PROGRESS_ENV)
    callbacks = [NonFiniteWeightCheck(), *([StageProgress(progress)] if progress else [])]
    try:
        return RLHFCLI(
            L.LightningModule,
            RLHFDataModule,
            subclass_mode_model=True,
            args=args,
            run=run,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            trainer_defaults={"callbacks": callbacks},
            parser_kwargs={"exit_on_error": False},
        )
    except Exception as error:
        known = user_error(error)
        if known is None or debug:
            raise
        print(f"error: {one_line(known)}", file=sys.stderr)
        raise SystemExit(2) from None
