"""The stage subprocesses: the library's :class:`~repo_lightning.pipeline.Pipeline`, measured, and its run folders read.

Every stage is the pipeline's ``python -m repo_lightning`` call of a shipped config. The one thing the benchmark
adds is the peak resident memory of each stage's process, read from ``os.wait4`` on that process alone: with
several stages running at once, ``getrusage(RUSAGE_CHILDREN)`` would report the largest child so far, not this one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from repo_lightning.pipeline import Pipeline

_OLD_REPORT_DIR, _NEW_REPORT_DIR = "--model.init_args.report_dir=", "--model.init_args.evaluation.report_dir="

#: ``ru_maxrss`` is in KiB on Linux and in bytes on macOS.
_RSS_UNIT = 1.0 / 2**20 if sys.platform == "darwin" else 1.0 / 1024


class MeasuredPipeline(Pipeline):
    """A :class:`Pipeline` (always quiet) that also records each stage's peak RSS in ``peak_rss_mib``.

    Only the way a stage process is started and waited for differs from the library's; which stages run, with
    which arguments, is :class:`Pipeline`'s.
    """

    def __init__(self, root: Path, config_dir: Path, seed: int, extra: dict[str, list[str]]) -> None:
        super().__init__(root, config_dir, seed, extra, quiet=True)
        self.peak_rss_mib: dict[str, float] = {}

    def _run(self, name: str, args: list[str]) -> None:
        # Pipeline still passes the report folder under its pre-issue-9 flat key; PolicyModule now takes it in its
        # evaluation group. (A no-op once pipeline.py passes the new key.)
        args = [a.replace(_OLD_REPORT_DIR, _NEW_REPORT_DIR, 1) if a.startswith(_OLD_REPORT_DIR) else a for a in args]
        log_file = self.root / "logs" / f"{name}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "repo_lightning", *args]
        start = time.perf_counter()
        with log_file.open("w") as handle:
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
        self.timings[name] = time.perf_counter() - start
        self.peak_rss_mib[name] = usage.ru_maxrss * _RSS_UNIT
        if process.returncode != 0:
            tail = log_file.read_text()[-3000:]
            raise RuntimeError(f"stage {name} failed ({process.returncode}): {' '.join(args)}\n{tail}")


def read_scalars(run_dir: Path, tags: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """``(step, value)`` series of ``tags`` from a run's TensorBoard events.

    A run folder holds one ``version_*`` per CLI call (``fit``, then the ``test`` of the evaluation); each tag is
    read from the newest version that logged it.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    versions = sorted(run_dir.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    if not versions:
        raise FileNotFoundError(f"no TensorBoard run under {run_dir}")
    found: dict[str, list[tuple[int, float]]] = {}
    for version in versions:
        events = EventAccumulator(str(version), size_guidance={"scalars": 0})
        events.Reload()
        present = set(events.Tags()["scalars"])
        found.update({tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags if tag in present})
    return found
