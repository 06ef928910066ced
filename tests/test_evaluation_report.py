import json
from dataclasses import replace

import pytest

from repo_lightning.evaluation import PromptResult, format_table, read_results, summarize, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _results(with_extras: bool = True) -> list[PromptResult]:
    """Three prompts, k = 2. Numbers chosen so every metric can be worked by hand (see the tests)."""
    rows = [
        # benign: both responses safe (learned and true); both refusals -> over-refused.
        dict(
            rewards=[1.0, 3.0],
            costs=[-0.5, -0.1],
            kl=[0.2, 0.4],
            lengths=[4, 6],
            kind="benign",
            true_rewards=[2.0, 4.0],
            true_costs=[-0.1, -0.1],
            refusals=[True, True],
        ),
        # hazard_mild: ONE of two responses unsafe (C = 0.5) -> the prompt is unsafe.
        dict(
            rewards=[2.0, 0.0],
            costs=[0.5, -1.0],
            kl=[1.0, 0.0],
            lengths=[10, 2],
            kind="hazard_mild",
            true_rewards=[5.0, 0.0],
            true_costs=[1.0, -1.0],
            refusals=[False, True],
        ),
        # hazard_severe: learned model calls both safe, but the truth says the second is unsafe (C* = 2.8).
        dict(
            rewards=[0.0, 1.0],
            costs=[-1.0, -0.4],
            kl=[0.1, 0.3],
            lengths=[3, 5],
            kind="hazard_severe",
            true_rewards=[0.0, 1.0],
            true_costs=[-1.0, 2.8],
            refusals=[True, False],
        ),
    ]
    results = []
    for i, row in enumerate(rows):
        if not with_extras:
            for key in ("kind", "true_rewards", "true_costs", "refusals"):
                row.pop(key)
        results.append(PromptResult(index=i, prompt=f"how do i do {i} ?", responses=[f"a{i}", f"b{i}"], **row))
    return results


def test_summarize_learned_view_by_hand():
    s = summarize(_results(with_extras=False))
    # rewards 1, 3, 2, 0, 0, 1 -> 7 / 6
    assert s["reward_mean"] == pytest.approx(7 / 6)
    # costs -0.5 - 0.1 + 0.5 - 1.0 - 1.0 - 0.4 = -2.5 -> -2.5 / 6
    assert s["cost_mean"] == pytest.approx(-2.5 / 6)
    # only one response of six has C > 0
    assert s["unsafe_response_rate"] == pytest.approx(1 / 6)
    # ... but it makes its prompt unsafe: 1 of 3 prompts
    assert s["unsafe_prompt_rate"] == pytest.approx(1 / 3)
    # sorted costs [-1, -1, -0.5, -0.4, -0.1, 0.5], linear interpolation at positions 0.5, 2.5, 4.5
    assert s["cost_q10"] == pytest.approx(-1.0)
    assert s["cost_q50"] == pytest.approx(-0.45)
    assert s["cost_q90"] == pytest.approx(0.2)
    # kl 0.2 + 0.4 + 1.0 + 0 + 0.1 + 0.3 = 2.0; lengths sum 30
    assert s["kl_mean"] == pytest.approx(2.0 / 6)
    assert s["response_len_mean"] == pytest.approx(5.0)
    assert s["num_prompts"] == 3
    assert s["samples_per_prompt"] == 2
    # no kinds, truth or refusals given -> none of their keys
    assert not any("/" in key or key.startswith("true_") or "refusal" in key for key in s)


def test_any_unsafe_of_k_by_hand_and_over_every_subset():
    from itertools import combinations

    from repo_lightning.evaluation.metrics import any_unsafe_of_k

    one_of_four = [0.3, -1.0, -1.0, -1.0]
    assert any_unsafe_of_k(one_of_four, 1) == pytest.approx(0.25)
    assert any_unsafe_of_k(one_of_four, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3, 2) / C(4, 2)
    assert any_unsafe_of_k(one_of_four, 4) == 1.0 == any_unsafe_of_k(one_of_four)  # k = n: "any"
    assert any_unsafe_of_k([-1.0] * 8, 3) == 0.0
    assert any_unsafe_of_k([1.0] * 6 + [-1.0] * 2, 3) == 1.0  # every 3 of these 8 hold an unsafe one
    assert any_unsafe_of_k([0.0, -0.2], 1) == 0.0  # C = 0 is safe
    # the estimate is the share of all k-subsets of the n samples with an unsafe response (so it is unbiased for
    # "any of k unsafe" whenever the n samples are i.i.d.)
    costs = [0.5, -1.0, 2.0, -0.1, -1.0, -1.0, -0.3]
    for k in range(1, len(costs) + 1):
        subsets = list(combinations(costs, k))
        share = sum(any(c > 0 for c in subset) for subset in subsets) / len(subsets)
        assert any_unsafe_of_k(costs, k) == pytest.approx(share), k


def test_summarize_unsafe_at_k_estimates_any_of_k_from_more_samples():
    results = _results()
    for r in results:  # four samples a prompt: repeat each prompt's two
        for name in ("responses", "rewards", "costs", "kl", "lengths", "true_rewards", "true_costs", "refusals"):
            setattr(r, name, list(getattr(r, name)) * 2)
    assert summarize(results, unsafe_at_k=4) == {**summarize(results), "unsafe_at_k": 4.0}  # k = n: unchanged
    s = summarize(results, unsafe_at_k=1)
    assert s["unsafe_prompt_rate"] == pytest.approx(s["unsafe_response_rate"])  # k = 1: the response rate
    # the hazard_mild prompt has 2 unsafe of 4 (learned costs): 1 - C(2, 2) / C(4, 2) = 5/6 at k = 2
    assert summarize(results, unsafe_at_k=2)["unsafe_prompt_rate/hazard_mild"] == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="unsafe_at_k = 5 needs 1 <= k <= the samples of every prompt"):
        summarize(results, unsafe_at_k=5)


def test_report_names_k_and_the_samples_it_was_estimated_from(tmp_path):
    results = _results()
    write_report(results, tmp_path / "any", title="x")
    write_report(results, tmp_path / "at1", title="x", unsafe_at_k=1)
    assert "Unsafe prompt rate (any of k unsafe)" in (tmp_path / "any" / "report.md").read_text()
    report = (tmp_path / "at1" / "report.md").read_text()
    assert "Unsafe prompt rate (any of 1 unsafe; estimated from 2 samples a prompt)" in report


def test_summarize_kinds_truth_and_refusals():
    s = summarize(_results())
    # per kind, learned models: only the hazard_mild prompt is unsafe
    assert s["reward_mean/benign"] == pytest.approx(2.0)
    assert s["unsafe_prompt_rate/benign"] == 0.0
    assert s["unsafe_prompt_rate/hazard_mild"] == 1.0
    assert s["unsafe_prompt_rate/hazard_severe"] == 0.0
    assert s["unsafe_prompt_rate/hazard"] == pytest.approx(0.5)  # 1 of the 2 hazard prompts
    assert s["unsafe_response_rate/hazard_mild"] == pytest.approx(0.5)
    assert s["unsafe_response_rate/hazard"] == pytest.approx(0.25)  # 1 of 4 hazard responses
    # ground truth: rewards 2, 4, 5, 0, 0, 1 -> 2; unsafe responses C* = 1.0 and 2.8 -> 2 of 6
    assert s["true_reward_mean"] == pytest.approx(2.0)
    assert s["true_unsafe_response_rate"] == pytest.approx(2 / 6)
    assert s["true_unsafe_prompt_rate"] == pytest.approx(2 / 3)
    assert s["true_unsafe_prompt_rate/hazard_mild"] == 1.0
    assert s["true_unsafe_prompt_rate/hazard_severe"] == 1.0
    assert s["true_unsafe_prompt_rate/hazard"] == 1.0
    assert s["true_unsafe_prompt_rate/benign"] == 0.0
    assert {"true_cost_q10", "true_cost_q50", "true_cost_q90", "true_cost_mean"} <= set(s)
    # refusals: 4 of 6 overall; both benign responses are refusals -> over-refusal 1.0
    assert s["refusal_rate"] == pytest.approx(4 / 6)
    assert s["over_refusal_rate"] == 1.0
    assert s["refusal_rate/hazard_severe"] == pytest.approx(0.5)


def test_truth_keys_follow_the_given_fields():
    only_rewards = [replace(r, true_costs=None) for r in _results()]
    s = summarize(only_rewards)
    assert "true_reward_mean" in s
    assert not any(key.startswith("true_") and "reward" not in key for key in s)
    # refusals without kinds: refusal_rate but no over-refusal (benign is unknown)
    no_kinds = [replace(r, kind=None) for r in _results()]
    s = summarize(no_kinds)
    assert "refusal_rate" in s and "over_refusal_rate" not in s
    assert not any("/" in key for key in s)


@pytest.mark.parametrize("field", ["rewards", "costs", "kl", "lengths", "true_costs", "refusals"])
def test_ragged_input_names_prompt_and_field(field):
    results = _results()
    bad = results[1]
    setattr(bad, field, getattr(bad, field)[:1])
    bad.index = 7
    with pytest.raises(ValueError, match=rf"prompt index 7: field '{field}'"):
        summarize(results)


def test_invalid_inputs():
    with pytest.raises(ValueError, match="at least one"):
        summarize([])
    results = _results()
    results[2].true_rewards = None
    with pytest.raises(ValueError, match=r"prompt index 2: field 'true_rewards'"):
        summarize(results)
    results = _results()
    results[0] = replace(
        results[0],
        responses=[],
        rewards=[],
        costs=[],
        kl=[],
        lengths=[],
        true_rewards=[],
        true_costs=[],
        refusals=[],
    )
    with pytest.raises(ValueError, match=r"prompt index 0: field 'responses' is empty"):
        summarize(results)


def test_json_round_trip_and_missing_optional_fields():
    for result in _results():
        assert PromptResult.from_json(json.loads(json.dumps(result.to_json()))) == result
    minimal = {k: v for k, v in _results(with_extras=False)[0].to_json().items() if v is not None}
    assert PromptResult.from_json(minimal).kind is None
    with pytest.raises(ValueError, match="missing"):
        PromptResult.from_json({"index": 0})


def test_write_report_writes_every_file(tmp_path):
    results = _results()
    out = tmp_path / "eval" / "repo"
    summary = write_report(
        results,
        out,
        title="RePO on SafetyWorld",
        multiplier_history=[(0, 1.0), (10, 1.5), (20, 0.7)],
        extra={"model": "runs/repo/policy", "algorithm": "repo"},
    )
    assert summary == summarize(results)
    names = {p.name for p in out.iterdir()}
    assert names == {
        "per_prompt.jsonl",
        "metrics.json",
        "report.md",
        "cost_histogram.png",
        "reward_vs_cost.png",
        "multiplier.png",
    }
    assert read_results(out / "per_prompt.jsonl") == results
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(summary)
    for png in ("cost_histogram.png", "reward_vs_cost.png", "multiplier.png"):
        assert (out / png).read_bytes().startswith(PNG_MAGIC)

    report = (out / "report.md").read_text()
    assert report.startswith("# RePO on SafetyWorld")
    assert "- **model**: runs/repo/policy" in report and "- **algorithm**: repo" in report
    assert "| Metric | Learned models | Ground truth |" in report
    # learned 1/3 vs true 2/3: the gap between the learned cost model and the truth is visible
    assert "| Unsafe prompt rate (any of k unsafe) | 0.333 | 0.667 |" in report
    assert "| Helpfulness (mean reward) | 1.167 | 2.000 |" in report
    assert "| Unsafe prompt rate: hazard_mild | 1.000 | 1.000 |" in report
    assert "| Over-refusal rate (benign prompts) | 1.000 | - |" in report
    assert "| Cost quantiles q10 / q50 / q90 | -1.000 / -0.450 / 0.200 |" in report
    assert "| Mean KL to reference (nats) | 0.333 | - |" in report
    for row in ("Unsafe response rate", "Mean response length", "Unsafe prompt rate: hazard ("):
        assert row in report
    assert "multiplier.png" in report and "cost_histogram.png" in report


def test_write_report_without_truth_or_multiplier(tmp_path):
    write_report(_results(with_extras=False), tmp_path, title="SFT", multiplier_history=[])
    assert not (tmp_path / "multiplier.png").exists()
    assert (tmp_path / "cost_histogram.png").read_bytes().startswith(PNG_MAGIC)
    assert (tmp_path / "reward_vs_cost.png").read_bytes().startswith(PNG_MAGIC)
    report = (tmp_path / "report.md").read_text()
    assert "Ground truth" not in report
    assert "| Unsafe prompt rate (any of k unsafe) | 0.333 |" in report
    assert "Over-refusal" not in report and "multiplier.png" not in report


def test_write_report_validates_before_writing(tmp_path):
    with pytest.raises(ValueError):
        write_report([], tmp_path / "nothing", title="x")
    assert not (tmp_path / "nothing").exists()


def test_format_table_one_column_per_summary():
    sft = summarize(_results(with_extras=False))
    repo = {"reward_mean": 2.0, "unsafe_prompt_rate": 0.0}
    table = format_table({"sft": sft, "repo": repo}, keys=["reward_mean", "unsafe_prompt_rate", "kl_mean"])
    lines = table.strip().splitlines()
    assert lines[0] == "| metric | sft | repo |"
    assert len(lines) == 2 + 3
    assert all(line.count("|") == 4 for line in lines)
    assert "| reward_mean | 1.167 | 2.000 |" in lines
    assert "| kl_mean | 0.333 | - |" in lines
    # default keys: every key of any summary, once
    assert len(format_table({"sft": sft, "repo": repo}).strip().splitlines()) == 2 + len(sft)
    with pytest.raises(ValueError):
        format_table({})


def test_missed_unsafe_rate_counts_truly_unsafe_answers_the_cost_model_calls_safe():
    from repo_lightning.evaluation import PromptResult, summarize

    def result(index, kind, costs, true_costs):
        n = len(costs)
        return PromptResult(
            index=index,
            prompt="p",
            responses=["r"] * n,
            rewards=[0.0] * n,
            costs=costs,
            kl=[0.0] * n,
            lengths=[1] * n,
            kind=kind,
            true_rewards=[0.0] * n,
            true_costs=true_costs,
            refusals=[False] * n,
        )

    # Truly unsafe: (0.5 | C=-1), (0.1 | C=2), (1.0 | C=0) -> learned calls 2 of 3 safe (C <= 0); benign has none.
    results = [
        result(0, "hazard_mild", [-1.0, 2.0], [0.5, 0.1]),
        result(1, "hazard_severe", [0.0, -3.0], [1.0, -0.2]),
        result(2, "benign", [1.0, -1.0], [-0.1, -0.1]),
    ]
    summary = summarize(results)
    assert summary["missed_unsafe_rate"] == pytest.approx(2 / 3)
    assert summary["missed_unsafe_rate/hazard_mild"] == pytest.approx(1 / 2)
    assert summary["missed_unsafe_rate/hazard_severe"] == pytest.approx(1.0)
    assert "missed_unsafe_rate/benign" not in summary


def test_multiplier_plot_draws_the_cap_and_the_constraint_level():
    from repo_lightning.evaluation.plots import multiplier_figure

    history = [(1, 1.0), (2, 3.0), (3, 20.0), (4, 12.0)]
    statistic = [(1, 0.30), (2, 0.10), (3, -0.01), (4, -0.02)]  # unsafe share minus the target 0.02
    fig = multiplier_figure(history, 20.0, statistic, ("target_unsafe_rate", 0.02))
    top, low = fig.axes
    lines = {line.get_label(): line for line in top.get_lines()}
    assert list(lines["lambda"].get_ydata()) == [1.0, 3.0, 20.0, 12.0]
    assert list(lines["cap = 20"].get_ydata()) == [20.0, 20.0]  # a horizontal line at the cap
    lines = {line.get_label(): line for line in low.get_lines()}
    # the lower panel shows the quantity itself (g + target) against the target
    assert list(lines["what lambda answers to"].get_ydata()) == pytest.approx([0.32, 0.12, 0.01, 0.0])
    assert list(lines["target_unsafe_rate = 0.02"].get_ydata()) == [0.02, 0.02]
    # without a statistic: one panel, the cap only when given
    assert len(multiplier_figure(history).axes) == 1
    assert [line.get_label() for line in multiplier_figure(history).axes[0].get_lines()] == ["lambda"]
