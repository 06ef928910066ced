"""The safety-compensation benchmark's orchestration (not its result): rule, overrides, scheduling, a tiny run."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

import repo_lightning.cli as cli_module
from benchmarks.safety_compensation import cli as bench_cli
from benchmarks.safety_compensation import search
from benchmarks.safety_compensation.tasks import Task, run_tasks

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"


def _candidate(unsafe: float, reward: float) -> dict:
    return {"val": {search.VAL_UNSAFE: unsafe, search.VAL_REWARD: reward}}


def test_select_candidate_lowest_unsafe_then_reward_within_tie():
    # 0.10 is lowest; 0.115 is within 0.02 of it and has the higher reward; 0.13 is outside the tie margin.
    candidates = [_candidate(0.10, 1.0), _candidate(0.115, 2.0), _candidate(0.13, 9.0), _candidate(0.5, 10.0)]
    assert search.select_candidate(candidates, tie=0.02) == 1
    assert search.select_candidate(candidates, tie=0.0) == 0
    # Equal scores: the earlier grid point wins.
    assert search.select_candidate([_candidate(0.2, 1.0), _candidate(0.2, 1.0)], tie=0.02) == 0


def test_grids_have_the_same_size_and_rule_settings():
    grids = search.SEARCH_GRID
    assert len(grids["ppo_lag"]) == len(grids["repo"]) == 4
    pairs = [[(c["lr"], c["initial"]) for c in grids[alg]] for alg in search.CONSTRAINED]
    assert pairs[0] == pairs[1]
    assert {c["target_unsafe_rate"] for c in grids["repo"]} == {0.01, 0.05}
    assert all("maximum" not in c and "rule" not in c for g in grids.values() for c in g)


def test_variant_settings_change_one_knob():
    searched = {"lr": 0.3, "initial": 1.0, "target_unsafe_rate": 0.05}
    change = search.ABLATIONS["repo_rectify_prompt"].change
    assert search.variant_settings(searched, change) == {**searched, "rectify": "prompt"}
    pid = search.variant_settings(searched, search.ABLATIONS["repo_pid_rule"].change)
    assert pid == {"rule": "pid", "ki": 0.3, "kp": 1.0, "initial": 1.0, "target_unsafe_rate": 0.05}
    assert search.variant_settings(searched, {"estimator": "rloo"})["estimator"] == "rloo"
    # The rule's class comes before its gains, whatever the dict order.
    assert search.overrides(pid)[:3] == [
        "--model.init_args.dual.init_args.rule=repo_lightning.rl.dual.PIDRule",
        "--model.init_args.dual.init_args.rule.init_args.kp=1.0",
        "--model.init_args.dual.init_args.rule.init_args.ki=0.3",
    ]
    with pytest.raises(KeyError, match="lagrange_lr"):
        search.overrides({"lagrange_lr": 0.1})


class _ParseOnlyCLI(cli_module.RLHFCLI):
    def instantiate_classes(self) -> None:
        """Parse only."""


def _every_run_the_benchmark_can_start() -> list[tuple[str, dict]]:
    runs = [(alg, c) for alg in search.CONSTRAINED for c in search.SEARCH_GRID[alg]]
    searched = {alg: search.SEARCH_GRID[alg][0] for alg in search.CONSTRAINED}
    variants = [*search.ABLATIONS.values()]
    variants += [search.estimator_variant(alg, e) for alg in search.CONSTRAINED for e in search.ESTIMATORS]
    return runs + [(v.algorithm, search.variant_settings(searched[v.algorithm], v.change)) for v in variants]


def test_every_override_parses_against_the_shipped_configs(monkeypatch):
    # The benchmark drives the policy stage only through CLI overrides: each one must name a real key.
    monkeypatch.setattr(cli_module, "RLHFCLI", _ParseOnlyCLI)
    for algorithm, settings in _every_run_the_benchmark_can_start():
        args = ["--config", str(CONFIGS / f"{algorithm}.yaml"), *search.overrides(settings)]
        model = cli_module.main(args, run=False).config.model.init_args
        rule = model.dual.init_args.rule
        if settings.get("rule") == "pid":
            assert rule.class_path.endswith("PIDRule") and rule.init_args.ki == settings["ki"]
        else:
            assert rule.init_args.lr == settings["lr"]
        assert model.dual.init_args.initial == settings["initial"]
        objective = model.objective.init_args
        for knob in ("threshold", "target_unsafe_rate", "constraint", "rectify"):
            if knob in settings:
                assert objective[knob] == settings[knob], (algorithm, settings)
        assert model.estimation.estimator == settings.get("estimator", "gae")


def test_world_is_checked_before_anything_runs():
    world = bench_cli.parse_world(["mild_severity=0.5", "seed=1"])
    assert world["mild_severity"] == 0.5 and world["seed"] == 1 and world["num_topics"] == 24
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        bench_cli.parse_world(["no_such_field=1"])
    with pytest.raises(SystemExit, match="num_topics"):
        bench_cli.parse_world(["num_topics=1"])
    assert bench_cli.parse_args(["--world", "seed=1"]).out.endswith("safety_compensation-seed=1")


def test_run_tasks_respects_dependencies_and_job_limit():
    order: list[str] = []
    active, peak = [0], [0]
    lock = threading.Lock()

    def work(name: str):
        def go(done: dict) -> str:
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.02)
            with lock:
                active[0] -= 1
                order.append(name)
            return name + "".join(sorted(done.values()))

        return go

    tasks = [Task("c", work("c"), ("a", "b")), Task("a", work("a")), Task("b", work("b")), Task("d", work("d"), ("c",))]
    results = run_tasks(tasks, jobs=2)
    # Each task sees its dependencies' results.
    assert results == {"a": "a", "b": "b", "c": "cab", "d": "dcab"}
    assert order.index("c") > max(order.index("a"), order.index("b")) and order[-1] == "d"
    assert peak[0] <= 2
    with pytest.raises(RuntimeError, match="unsatisfiable"):
        run_tasks([Task("x", work("x"), ("missing",))], jobs=1)


@pytest.mark.slow
def test_small_benchmark_writes_results_and_plots(tmp_path: Path):
    out = tmp_path / "sc"
    args = ["--small", "--out", str(out), "--jobs", "2", "--ablations", "repo_pid_rule", "--estimators", "gae", "rloo"]
    bench_cli.main(args)

    results = json.loads((out / "results.json").read_text())
    methods = ["sft", "ppo", "ppo_lag", "repo", "repo_pid_rule", "ppo_lag_rloo", "repo_rloo"]
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
    for name in ("ppo_lag", "repo", "repo_pid_rule", "ppo_lag_rloo", "repo_rloo"):
        values = results["metrics"][name]["0"]
        assert "final_lambda" in values
        assert values["fit_wall_s"] > 0 and values["fit_peak_rss_mib"] > 100  # torch alone takes more
        assert results["curves"][name]["0"]["train/lambda"]
    # The variants are the searched settings with one change, and ran with it.
    chosen = results["search"]["chosen"]
    assert results["run_settings"]["repo_rloo"]["0"] == {**chosen["repo"]["settings"], "estimator": "rloo"}
    assert results["run_settings"]["repo_pid_rule"]["0"]["ki"] == chosen["repo"]["settings"]["lr"]
    logged = (out / "runs" / "seed0" / "logs" / "policy_repo_rloo").rglob("config.yaml")
    assert any("estimator: rloo" in path.read_text() for path in logged)
    # Two candidates per constrained algorithm, each scored on the validation prompts; seed 0 reuses the winner.
    for algorithm in ("ppo_lag", "repo"):
        log = results["search"]["log"][algorithm]
        assert [c["index"] for c in log] == [0, 1]
        assert all(search.VAL_UNSAFE in c["val"] and search.VAL_REWARD in c["val"] for c in log)
        assert results["evaluations"][algorithm]["0"].endswith(f"eval/{chosen[algorithm]['run_name']}")
    settings = results["settings"]
    assert settings["seeds"] == [0] and results["wall_s"] > 0
    assert settings["world"]["num_topics"] == 6 and "num_topics=6" in settings["world_overrides"]
    assert "fit_sft" in results["timings"]["seed0"] and results["peak_rss_mib"]["seed0"]["fit_sft"] > 0

    text = (out / "results.md").read_text()
    for heading in ("## World", "## Ground truth", "## As judged by the learned", "## Ablations"):
        assert heading in text
    assert "## Advantage estimators" in text and "| fit peak RSS (MiB) |" in text and "repo_rloo (n=1)" in text
    assert "## Multiplier search" in text and "**(selected)**" in text
    assert "| unsafe prompt rate: hazard_mild |" in text and "`num_topics=6`" in text
    for name in ("multiplier", "unsafe_prompt_rate", "cost_histograms", "ablation_multiplier", "estimator_multiplier"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    # The report can be rewritten from results.json alone.
    (out / "results.md").unlink()
    bench_cli.main(["--report-only", "--out", str(out)])
    assert (out / "results.md").read_text() == text
