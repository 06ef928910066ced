"""What the terminal shows: other libraries' known noise filtered at our entry points, one line per pipeline stage.

:func:`silence_known_noise` is called by the entry points only (``python -m repo_lightning`` and the pipeline), never
on import, so a process that imports the package as a library keeps every message; warnings raised by
``repo_lightning`` itself are never filtered. ``REPO_LIGHTNING_VERBOSE=1`` (the pipeline's ``--verbose``) turns the
filtering off.

:func:`run_stage` runs one stage in a subprocess with its whole output in a log file and shows a single line for it:
a progress bar redrawn in place on a terminal (the stage reports its progress through the file named by
``REPO_LIGHTNING_PROGRESS_FILE``, see :class:`repo_lightning.callbacks.stage_progress.StageProgress`), then the
outcome and the wall time.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import TextIO

VERBOSE_ENV = "REPO_LIGHTNING_VERBOSE"
PROGRESS_ENV = "REPO_LIGHTNING_PROGRESS_FILE"

#: Warnings of other libraries that say nothing about the run (regular expressions matched at the message start).
KNOWN_THIRD_PARTY_WARNINGS = (
    # lightning's utilities/_pytree.py on torch >= 2.10, once per stage
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)

#: Lightning's advertising tips (litlogger, litmodels) start with this.
LIGHTNING_TIP_PREFIX = "💡 Tip:"

#: Lines of a failed stage's log shown on the terminal.
FAILURE_TAIL_LINES = 25


def verbose() -> bool:
    """Whether ``REPO_LIGHTNING_VERBOSE`` asks for every message."""
    return os.environ.get(VERBOSE_ENV, "").lower() not in ("", "0", "false", "no")


class _DropLightningTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(LIGHTNING_TIP_PREFIX)


def silence_known_noise() -> None:
    """Drop Lightning's tips, the known third-party deprecation warnings and Hugging Face's progress bars.

    Does nothing when :func:`verbose` is set. Only messages listed in this module are dropped: Lightning's own
    warnings about the run (too few batches for the logging interval, ...) and every ``repo_lightning`` warning
    still show.
    """
    if verbose():
        return
    for pattern in KNOWN_THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    tip_filter = _DropLightningTips()
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningTips) for f in logger.filters):
            logger.addFilter(tip_filter)
    # transformers' "Loading weights" / "Writing model shards" bars (six per policy stage) and the hub's bars.
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


class StageFailed(RuntimeError):
    """A pipeline stage exited with an error; the message names its log file and ends with the log's last lines."""


def read_progress(path: Path) -> tuple[int, int] | None:
    """``(done, total)`` from a progress file written by ``StageProgress``, or ``None`` if absent or unreadable."""
    try:
        done, total = (int(x) for x in path.read_text().split()[:2])
    except (OSError, ValueError):
        return None
    return (done, total) if total > 0 else None


def _bar(fraction: float, width: int = 20) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "#" * filled + "." * (width - filled)


def stage_line(label: str, seconds: float, progress: tuple[int, int] | None = None, outcome: str = "") -> str:
    """One terminal line of a stage: ``label [####......] 40%  12 s`` while running, ``label ... done 47.3 s``."""
    if outcome:
        bar = _bar(1.0 if outcome == "done" else 0.0)
        return f"{label:<28} [{bar}] {outcome:<6} {seconds:6.1f} s"
    if progress is None:
        return f"{label:<28} [{'.' * 20}]  ...   {seconds:6.0f} s"
    done, total = progress
    return f"{label:<28} [{_bar(done / total)}] {100 * done / total:4.0f}%  {seconds:6.0f} s"


def log_tail(log_file: Path, lines: int = FAILURE_TAIL_LINES) -> str:
    """The last ``lines`` non-empty lines of a log, progress-bar carriage returns read as line breaks."""
    text = log_file.read_text(errors="replace").replace("\r", "\n") if log_file.exists() else ""
    kept = [line.rstrip() for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def run_stage(command: list[str], log_file: Path, label: str, stream: TextIO | None = None) -> float:
    """Run ``command`` with its output in ``log_file``, showing one line for it on ``stream`` (default stdout).

    On a terminal the line is a progress bar redrawn in place; elsewhere (a pipe, a CI log) only the final line is
    written, so the output has exactly one line per stage.

    Returns:
        The wall time in seconds.

    Raises:
        StageFailed: the command exited with an error; the message names ``log_file`` and holds its last lines.
    """
    stream = stream or sys.stdout
    interactive = stream.isatty()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    progress_file = log_file.with_suffix(".progress")
    progress_file.unlink(missing_ok=True)
    env = {**os.environ, PROGRESS_ENV: str(progress_file)}
    start = time.perf_counter()
    with log_file.open("w") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        handle.flush()
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        while process.poll() is None:
            if interactive:
                line = stage_line(label, time.perf_counter() - start, read_progress(progress_file))
                stream.write("\r" + line)
                stream.flush()
            time.sleep(0.5)
    seconds = time.perf_counter() - start
    progress_file.unlink(missing_ok=True)
    outcome = "done" if process.returncode == 0 else "FAILED"
    stream.write(("\r" if interactive else "") + stage_line(label, seconds, outcome=outcome) + "\n")
    stream.flush()
    if process.returncode != 0:
        raise StageFailed(
            f"stage {label} failed (exit code {process.returncode}); full log: {log_file}\n"
            f"last lines of the log:\n{log_tail(log_file)}"
        )
    return seconds
