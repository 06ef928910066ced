"""The safety-compensation benchmark's orchestration (not its result): selection rule, scheduling, a tiny run."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import time
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "safety_compensation.py"
_SPEC = importlib.util.spec_from_file_location("safety_compensation", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = bench  # dataclasses look their module up there
_SPEC.loader.exec_module(bench)


def _candidate(unsafe: float, reward: float) -> dict:
    return {"val": {bench.VAL_UNSAFE: unsafe, bench.VAL_REWARD: reward}}


def test_select_candidate_lowest_unsafe_then_reward_within_tie():
    # 0.10 is lowest; 0.115 is within 0.02 of it and has the higher reward; 0.13 is outside the tie margin.
    candidates = [_candidate(0.10, 1.0), _candidate(0.115, 2.0), _candidate(0.13, 9.0), _candidate(0.5, 10.0)]
    assert bench.select_candidate(candidates, tie=0.02) == 1
    assert bench.select_candidate(candidates, tie=0.0) == 0
    # Equal scores: the earlier grid point wins.
    assert bench.select_candidate([_candidate(0.2, 1.0), _candidate(0.2, 1.0)], tie=0.02) == 0


def test_ablation_settings_change_one_knob():
    chosen = {"repo": {"settings": {"lagrange_lr": 0.3, "lagrange_init": 1.0, "lagrange_max": 5.0}}}
    assert bench.ablation_settings(chosen, "repo_rectify_prompt") == {
        "lagrange_lr": 0.3,
        "lagrange_init": 1.0,
        "lagrange_max": 5.0,
        "rectify": "prompt",
    }
    pid = bench.ablation_settings(chosen, "repo_dual_pid")
    assert pid["dual_rule"] == "pid" and pid["pid_ki"] == 0.3
    assert bench.overrides({"rectify": "prompt"}) == ["--model.init_args.rectify=prompt"]


def test_run_tasks_respects_dependencies_and_job_limit():
    order: list[str] = []
    active, peak = [0], [0]
    lock = threading.Lock()

    def work(name: str):
        def go() -> str:
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.02)
            with lock:
                active[0] -= 1
                order.append(name)
            return name

        return go

    tasks = [
        bench.Task("c", work("c"), ("a", "b")),
        bench.Task("a", work("a")),
        bench.Task("b", work("b")),
        bench.Task("d", work("d"), ("c",)),
    ]
    results = bench.run_tasks(tasks, jobs=2)
    assert results == {"a": "a", "b": "b", "c": "c", "d": "d"}
    assert order.index("c") > max(order.index("a"), order.index("b")) and order[-1] == "d"
    assert peak[0] <= 2
    with pytest.raises(RuntimeError, match="unsatisfiable"):
        bench.run_tasks([bench.Task("x", work("x"), ("missing",))], jobs=1)


@pytest.mark.slow
def test_small_benchmark_writes_results_and_plots(tmp_path: Path):
    out = tmp_path / "sc"
    bench.main(["--small", "--out", str(out), "--jobs", "2", "--ablations", "repo_rectify_prompt"])

    results = json.loads((out / "results.json").read_text())
    methods = ["sft", "ppo", "ppo_lag", "repo", "repo_rectify_prompt"]
    assert set(results["metrics"]) == set(methods)
    for name in methods:
        values = results["metrics"][name]["0"]
        for key in (
            "true_reward_mean/benign",
            "true_reward_mean/hazard",
            "true_unsafe_response_rate",
            "true_unsafe_prompt_rate/hazard_mild",
            "true_unsafe_prompt_rate/hazard_severe",
            "over_refusal_rate",
            "kl_mean",
            "unsafe_prompt_rate/hazard_mild",
        ):
            assert key in values, (name, key)
        assert results["summary"][name]["true_unsafe_prompt_rate/hazard_mild"]["std"] == 0.0
        assert values["samples_per_prompt"] == 2.0
    for name in ("ppo_lag", "repo", "repo_rectify_prompt"):
        assert "final_lambda" in results["metrics"][name]["0"]
        assert results["curves"][name]["0"]["train/lambda"]
    # Two candidates per constrained algorithm, each scored on the validation prompts; seed 0 reuses the winner.
    for algorithm in ("ppo_lag", "repo"):
        log = results["search"]["log"][algorithm]
        assert [c["index"] for c in log] == [0, 1]
        assert all(bench.VAL_UNSAFE in c["val"] and bench.VAL_REWARD in c["val"] for c in log)
        chosen = results["search"]["chosen"][algorithm]["run_name"]
        assert results["evaluations"][algorithm]["0"].endswith(f"eval/{chosen}")
    assert results["settings"]["seeds"] == [0] and results["wall_s"] > 0
    assert "fit_sft" in results["timings"]["seed0"]

    text = (out / "results.md").read_text()
    for heading in ("## Ground truth", "## As judged by the learned", "## Ablations", "## Multiplier search"):
        assert heading in text
    assert "| unsafe prompt rate: hazard_mild |" in text and "**(selected)**" in text
    for name in ("multiplier", "unsafe_prompt_share", "cost_histograms", "ablation_multiplier"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
