"""How one pipeline stage is run and recorded.

A stage is a ``python -m repo_lightning`` subprocess with its output and wall time; ``--resume`` compares a
finished stage's record; later stages read a run's newest checkpoint; ``--stage-arg`` adds the user's arguments to a
stage's command line. Which stages run is
:mod:`repo_lightning.pipeline`'s business.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

from repo_lightning.console import StageFailed, run_stage
from repo_lightning.safetyworld.config import world_from_overrides

#: How a stage is run: ``python -m repo_lightning <subcommand> ...`` in this interpreter.
STAGE_COMMAND = [sys.executable, "-m", "repo_lightning"]


def run_cli(args: list[str], log_file: Path | None = None, label: str | None = None) -> float:
    """Run ``python -m repo_lightning ARGS`` in a subprocess.

    With ``log_file`` the output goes to that file and the terminal gets one line for the stage (progress bar, then
    outcome and wall time, :func:`repo_lightning.console.run_stage`); without it the output is shown as it comes.

    Returns:
        The wall time in seconds.

    Raises:
        StageFailed: the stage exited with an error (with ``log_file``: the message names it and ends with its tail).
    """
    command = [*STAGE_COMMAND, *args]
    if log_file is not None:
        return run_stage(command, log_file, label or args[0])
    start = time.perf_counter()
    print("$", " ".join(command), flush=True)
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise StageFailed(f"stage failed (exit code {result.returncode}): {' '.join(args)}")
    return time.perf_counter() - start


def stage_record(args: list[str]) -> str:
    """What identifies a finished stage for ``--resume``: its arguments and the SHA-256 of each ``--config`` file."""
    configs = {}
    for index, arg in enumerate(args):
        path = args[index + 1] if arg == "--config" and index + 1 < len(args) else None
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        if path is not None and Path(path).is_file():
            configs[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return json.dumps({"args": args, "configs": configs}, indent=1) + "\n"


def latest_checkpoint(folder: Path) -> Path:
    """Newest ``*.ckpt`` under ``folder``."""
    found = sorted(folder.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no checkpoint under {folder}")
    return found[-1]


#: Stages whose command lines ``--stage-arg STAGE=ARG`` can extend (``sft`` includes the warm start's fine-tune).
STAGE_ARG_STAGES = ("sft", "reward", "cost", "policy")


def parse_stage_args(items: list[str]) -> dict[str, list[str]]:
    """``--stage-arg`` values (``STAGE=--key=value``) as extra CLI arguments per stage, in the order given.

    A ``--data.world.KEY=VALUE`` among them is checked as a SafetyWorld field here, before any stage runs.

    Raises:
        ValueError: An item without a known stage before its first ``=``, whose argument is not ``--key=value``, or
            whose world field is unknown or gives an inconsistent world (:func:`world_from_overrides`).
    """
    found: dict[str, list[str]] = {}
    for item in items:
        stage, _, arg = item.partition("=")
        if stage not in STAGE_ARG_STAGES:
            raise ValueError(f"{item!r}: expected STAGE=--key=value with STAGE one of {', '.join(STAGE_ARG_STAGES)}")
        if not arg.startswith("--") or "=" not in arg or arg.startswith("--="):
            raise ValueError(
                f"{item!r}: expected STAGE=--key=value, one argument of the stage's command line "
                "(e.g. reward=--trainer.max_epochs=2)"
            )
        found.setdefault(stage, []).append(arg)
    for args in found.values():
        world_from_overrides([a.removeprefix("--data.world.") for a in args if a.startswith("--data.world.")])
    return found
