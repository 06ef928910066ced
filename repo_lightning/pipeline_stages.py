"""How one pipeline stage is run and recorded.

A stage is a ``python -m repo_lightning`` subprocess with its output and wall time; ``--resume`` compares a
finished stage's record; later stages read a run's newest checkpoint. Which stages run is
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
