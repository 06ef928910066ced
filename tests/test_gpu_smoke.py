"""The GPU smoke benchmark's CPU path: ``benchmarks/gpu_smoke.py --tiny`` runs both stages under FSDP2 and reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_smoke_tiny_runs_on_cpu_and_prints_its_measurements(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_smoke.py"), "--tiny", "--out", str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-6000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["device"] == "cpu" and result["dtype"] == "bfloat16"
    assert result["strategy"].startswith("ModelParallelStrategy")
    for key in ("generation_tokens_per_s", "train_tokens_per_s"):
        assert result["policy"][key] > 0
    assert result["reward"]["train_tokens_per_s"] > 0
    assert result["policy"]["peak_memory_gib"] is None  # reported on CUDA only
