"""The throughput benchmark's plumbing (not its numbers): FLOP count, and a tiny dry run's JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
_SPEC = importlib.util.spec_from_file_location("throughput", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = bench
_SPEC.loader.exec_module(bench)


def test_update_flops_by_hand():
    # d=2, 1 layer, V=10, prompt 1 + response 2 (L=3), 1 epoch, batch 1:
    # body = 3 * 1 * (24*4 + 4*3*2) = 360; policy = 360 + 2*2*10*2 = 440; critic = 360 + 2*2*3 = 372.
    w = {
        "n_embd": 2,
        "n_layer": 1,
        "vocab": 10,
        "prompt_len": 1,
        "response_length": 2,
        "ppo_epochs": 1,
        "batch_size": 1,
    }
    assert bench.update_flops(w, critics=1) == 3 * (440 + 372)
    assert bench.update_flops(w, critics=2) == 3 * (440 + 2 * 372)


def test_every_workload_is_valid_for_both_scripts():
    for name, w in bench.WORKLOADS.items():
        assert w["batch_size"] % w["mini_batches"] == 0, name
        assert w["prompt_len"] + w["response_length"] <= w["n_positions"], name
        assert w["n_embd"] % w["n_head"] == 0, name


@pytest.mark.slow
def test_dry_run_writes_the_json_keys(tmp_path):
    out = tmp_path / "throughput.json"
    sides = ["ppo", "repo", "repo-shared"]
    result = bench.main(["--dry-run", "--sides", *sides, "--dtypes", "fp32", "--out", str(out)])
    assert json.loads(out.read_text())["results"].keys() == result["results"].keys()
    assert set(result["results"]) == {f"tiny/fp32/{side}" for side in sides}
    for summary in result["results"].values():
        assert "error" not in summary, summary
        for key in bench.RESULT_KEYS:
            assert key in summary, key
        assert set(summary["phase_sec_median"]) == set(bench.PHASES)
        assert summary["sec_per_iter_min"] <= summary["sec_per_iter_median"] <= summary["sec_per_iter_max"]
        assert summary["update_gflops"] > 0 and summary["speed_vs_trl"] is None  # no TRL in a dry run
    assert [run["critics"] for run in result["runs"]["tiny/fp32/repo-shared"]] == ["shared"]
    assert [run["critics"] for run in result["runs"]["tiny/fp32/repo"]] == ["separate"]
    assert result["matmul_peak"]["fp32"]["gflops"] > 0
    assert {"settings", "machine", "matmul_peak", "results", "runs"} <= set(result)
