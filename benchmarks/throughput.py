#!/usr/bin/env python3
"""Throughput of the policy stage against TRL 0.24's ``PPOTrainer``, side by side in one invocation (issue 10).

For each workload (W1 = issue 10's; W2 = a larger one) and each precision (fp32; bf16 autocast), runs

- ``trl``: ``benchmarks/peer_trl_ppo.py`` (copied from ``shared/bench/``) in TRL's own venv (``--trl-python``,
  default ``.bench-venv/bin/python``, built by ``make throughput``),
- ``ppo`` and ``repo``: ``benchmarks/perf_project.py`` (derived from ``shared/bench/perf_w1_project.py``) in this
  interpreter, ``python -m repo_lightning fit`` with the like-for-like settings (``repo`` adds the cost model and
  the cost critic),

each as a fresh subprocess, alternating sides run by run (the order rotates each repetition), so slow drift of a
shared machine hits every side alike. Each run times ``--iters`` iterations after ``--warmup`` untimed ones; the
table pools the timed iterations of all repetitions (median / min / max) and takes the phase split and peak RSS
as the median over repetitions.

The update phase's achieved GFLOP/s is the model FLOPs of the PPO update (``update_flops``: forward + backward =
3 x forward matmul FLOPs of the policy on every token, its LM head on the response positions only, and each
critic; counted the same way for both sides, so wasted work such as TRL's logits at prompt positions is not
credited) divided by the update's median seconds, reported against the best of a few square matmuls of the same
dtype on this machine, measured in this invocation (``matmul_peak``).

    python benchmarks/throughput.py                      # W1 and W2, fp32 and bf16, trl/ppo/repo, 2 reps
    python benchmarks/throughput.py --workloads W1 --dtypes fp32 --reps 3
    python benchmarks/throughput.py --dry-run --out /tmp/t.json   # tiny, no TRL venv: the plumbing only

Writes the JSON to ``--out`` (default ``benchmarks/out/throughput.json``) and prints the table, then the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEER_SCRIPT = HERE / "peer_trl_ppo.py"
PROJECT_SCRIPT = HERE / "perf_project.py"

# Workloads in peer_trl_ppo.py's flag names. W1 is issue 10's; W2 is larger in every dimension that matters on a
# CPU (width, depth, vocabulary, sequence length), about 4x W1's FLOPs per iteration.
WORKLOADS: dict[str, dict] = {
    "W1": {
        "n_embd": 256,
        "n_layer": 4,
        "n_head": 4,
        "vocab": 4096,
        "n_positions": 128,
        "num_prompts": 512,
        "prompt_len": 16,
        "batch_size": 32,
        "response_length": 32,
        "ppo_epochs": 4,
        "mini_batches": 4,
        "kl_coef": 0.05,
        "lr": 5e-5,
    },
    "W2": {
        "n_embd": 384,
        "n_layer": 6,
        "n_head": 6,
        "vocab": 8192,
        "n_positions": 128,
        "num_prompts": 512,
        "prompt_len": 24,
        "batch_size": 32,
        "response_length": 40,
        "ppo_epochs": 2,
        "mini_batches": 4,
        "kl_coef": 0.05,
        "lr": 5e-5,
    },
    # The dry run's: seconds, not minutes.
    "tiny": {
        "n_embd": 32,
        "n_layer": 1,
        "n_head": 2,
        "vocab": 64,
        "n_positions": 32,
        "num_prompts": 16,
        "prompt_len": 4,
        "batch_size": 4,
        "response_length": 4,
        "ppo_epochs": 1,
        "mini_batches": 2,
        "kl_coef": 0.05,
        "lr": 5e-5,
    },
}
# Timed iterations and warm-up iterations per run.
ITERS = {"W1": (4, 1), "W2": (2, 1), "tiny": (1, 1)}
SIDES = ("trl", "ppo", "repo")
# Not run by default: ``ppo`` with the module's own defaults where they differ from what TRL runs (dropout 0.1 as
# GPT-2's config has it, AdamW unfused with weight decay 0.01, old log-probs from one more actor forward pass), to
# show what the like-for-like settings change.
# ``repo-shared``: ``repo`` with one critic backbone and two value heads (``critics: shared``) instead of a reward and a
# cost critic: the update trains two networks, as ``ppo`` and TRL do (docs/algorithm.md section 10).
EXTRA_SIDES = ("ppo-defaults", "repo-shared")
PHASES = ("generate", "rollout_scoring", "ppo_update", "other")
RESULT_KEYS = (
    "sec_per_iter_median",
    "sec_per_iter_min",
    "sec_per_iter_max",
    "gen_tokens_per_sec",
    "phase_sec_median",
    "peak_rss_mib",
    "update_gflops",
    "update_peak_frac",
    "speed_vs_trl",
    "runs",
)


def update_flops(w: dict, critics: int) -> float:
    """Model FLOPs of one iteration's PPO update (forward + backward = 3 x forward), as both sides must do it.

    Per sequence of ``L = prompt + response`` tokens and per layer: ``24 d^2`` FLOPs a token for the dense layers
    (qkv, out, 4d MLP) and ``4 L d`` for attention scores and values; the policy's LM head ``2 d V`` on the
    ``response`` positions whose log-probs are used; a critic's scalar head ``2 d`` a token. Embedding lookups,
    norms, activations and the optimizer are not counted.
    """
    d, n_layer, vocab = w["n_embd"], w["n_layer"], w["vocab"]
    length = w["prompt_len"] + w["response_length"]
    body = length * n_layer * (24 * d * d + 4 * length * d)
    policy = body + 2 * d * vocab * w["response_length"]
    critic = body + 2 * d * length
    return 3.0 * w["ppo_epochs"] * w["batch_size"] * (policy + critics * critic)


def matmul_peak(dtype: str, threads: int, size: int = 2048, reps: int = 5) -> dict:
    """Best GFLOP/s of ``size x size`` matmuls in ``dtype`` (``torch.mm``, ``threads`` threads), this process."""
    import torch

    torch.set_num_threads(threads)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a = torch.randn(size, size).to(dt)
    b = torch.randn(size, size).to(dt)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return {"gflops": round(2 * size**3 / best / 1e9, 1), "size": size, "reps": reps, "threads": threads}


def _flags(w: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in w.items()]


def run_one(side: str, workload: str, dtype: str, args, workdir: str) -> dict:
    """One subprocess run; returns its JSON (last stdout line) plus ``wall_sec``, or ``{"error": ...}``."""
    w = WORKLOADS[workload]
    iters, warmup = args.iters or ITERS[workload][0], args.warmup if args.warmup is not None else ITERS[workload][1]
    common = _flags(w) + [f"--iters={iters}", f"--warmup={warmup}", f"--threads={args.threads}", "--seed=1234"]
    if dtype == "bf16":
        common.append("--bf16")
    if side == "trl":
        cmd = [args.trl_python, str(PEER_SCRIPT), *common, f"--workdir={workdir}/trl-{workload}"]
    elif side == "ppo-defaults":
        cmd = [sys.executable, str(PROJECT_SCRIPT), *common, "--algorithm=ppo", "--dropout=0.1", "--optimizer=adamw"]
        cmd.append("--old-logprobs=forward")
    elif side == "repo-shared":
        cmd = [sys.executable, str(PROJECT_SCRIPT), *common, "--algorithm=repo", "--critics=shared"]
        cmd.append(f"--workdir={workdir}/{side}-{workload}-{dtype}")
    else:
        cmd = [sys.executable, str(PROJECT_SCRIPT), *common, f"--algorithm={side}"]
        cmd.append(f"--workdir={workdir}/{side}-{workload}-{dtype}")
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": str(args.threads),
            "MKL_NUM_THREADS": str(args.threads),
            "PEER": f"{workdir}/peer",
        }
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout, cwd=ROOT)
    wall = time.perf_counter() - t
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-2000:]
        return {"error": f"exit {proc.returncode}: {tail}", "cmd": cmd}
    out = json.loads(lines[-1])
    out["wall_sec"] = round(wall, 2)
    return out


def summarize(runs: list[dict], w: dict, side: str, peak: float) -> dict:
    """Pool the timed iterations of the runs of one (workload, dtype, side)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"] if runs else "not run", "runs": len(runs)}
    iters = [x for r in ok for x in r["iter_sec"]]
    med = statistics.median(iters)
    phases = {p: round(statistics.median(r["phase_sec_median"][p] for r in ok), 4) for p in PHASES}
    flops = update_flops(w, critics=2 if side == "repo" else 1)
    gflops = flops / phases["ppo_update"] / 1e9 if phases["ppo_update"] > 0 else 0.0
    return {
        "sec_per_iter_median": round(med, 4),
        "sec_per_iter_min": round(min(iters), 4),
        "sec_per_iter_max": round(max(iters), 4),
        "run_medians": [r["sec_per_iter_median"] for r in ok],
        "gen_tokens_per_sec": round(w["batch_size"] * w["response_length"] / med, 1),
        "phase_sec_median": phases,
        "peak_rss_mib": round(statistics.median(r["peak_rss_mib"] for r in ok), 1),
        "update_gflop_per_iter": round(flops / 1e9, 2),
        "update_gflops": round(gflops, 3),
        "update_peak_frac": round(gflops / peak, 4) if peak else None,
        "speed_vs_trl": None,
        "runs": len(ok),
        "failed_runs": len(runs) - len(ok),
        "versions": ok[0].get("versions"),
    }


def _machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "L3 cache", "Vendor ID"):
                info[key.strip()] = value.strip()
        info["avx512_bf16"] = "avx512_bf16" in lscpu
        info["amx_bf16"] = "amx_bf16" in lscpu
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def table(result: dict) -> str:
    """Markdown table of the summaries."""
    head = (
        "| workload | dtype | side | s/iter median (min-max) | x TRL (per rep) | tok/s | generate | scoring | update "
        "| other | peak RSS MiB | update GFLOP/s (% of matmul peak) |\n"
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = [head]
    for key, s in result["results"].items():
        workload, dtype, side = key.split("/")
        if "error" in s:
            rows.append(f"| {workload} | {dtype} | {side} | failed: {s['error'][:60]!r} |||||||||")
            continue
        ph = s["phase_sec_median"]
        ratio = f"{s['speed_vs_trl']:.2f}" if s["speed_vs_trl"] else "-"
        if s.get("speed_vs_trl_per_rep"):
            ratio += " (" + ", ".join(f"{r:.2f}" for r in s["speed_vs_trl_per_rep"]) + ")"
        frac = f" ({100 * s['update_peak_frac']:.0f}%)" if s["update_peak_frac"] is not None else ""
        rows.append(
            f"| {workload} | {dtype} | {side} | {s['sec_per_iter_median']:.3f} ({s['sec_per_iter_min']:.3f}-"
            f"{s['sec_per_iter_max']:.3f}) | {ratio} | {s['gen_tokens_per_sec']:.0f} | {ph['generate']:.3f} | "
            f"{ph['rollout_scoring']:.3f} | {ph['ppo_update']:.3f} | {ph['other']:.3f} | {s['peak_rss_mib']:.0f} | "
            f"{s['update_gflops']:.1f}{frac} |"
        )
    peaks = ", ".join(f"{k} {max(v['gflops'], v['gflops_after'])} GFLOP/s" for k, v in result["matmul_peak"].items())
    return "\n".join(rows) + f"\n\nmatmul peak ({result['settings']['threads']} threads): {peaks}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=["W1", "W2"], choices=sorted(WORKLOADS))
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES + EXTRA_SIDES)
    p.add_argument("--reps", type=int, default=2, help="runs per (workload, dtype, side)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per run (default: per workload)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations per run (default: per workload)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--trl-python", default=str(ROOT / ".bench-venv" / "bin" / "python"))
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "throughput.json"))
    p.add_argument("--dry-run", action="store_true", help="tiny workload, our sides only, no TRL venv needed")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Run the grid, print the table and the JSON, write the JSON to ``--out``."""
    args = parse_args(argv)
    if args.dry_run:
        args.workloads, args.sides, args.reps = ["tiny"], [s for s in args.sides if s != "trl"] or ["ppo"], 1
    if "trl" in args.sides and not Path(args.trl_python).exists():
        raise SystemExit(f"TRL venv python {args.trl_python} not found: run `make throughput` (it builds .bench-venv)")
    size = 256 if args.dry_run else 2048
    peaks = {dt: matmul_peak(dt, args.threads, size=size) for dt in args.dtypes}
    runs: dict[str, list[dict]] = {}
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="throughput-") as workdir:
        for workload in args.workloads:
            for dtype in args.dtypes:
                for rep in range(args.reps):
                    shift = rep % len(args.sides)
                    for side in args.sides[shift:] + args.sides[:shift]:
                        res = run_one(side, workload, dtype, args, workdir)
                        runs.setdefault(f"{workload}/{dtype}/{side}", []).append(res)
                        status = res.get("error", "")[:200] or f"{res['sec_per_iter_median']:.3f} s/iter"
                        print(
                            f"[{time.time() - start:6.0f}s] {workload} {dtype} {side} rep {rep}: {status}", flush=True
                        )
    peaks_after = {dt: matmul_peak(dt, args.threads, size=size) for dt in args.dtypes}
    results = {}
    for key, rs in runs.items():
        workload, dtype, side = key.split("/")
        peak = max(peaks[dtype]["gflops"], peaks_after[dtype]["gflops"])
        results[key] = summarize(rs, WORKLOADS[workload], side, peak)
    for key, s in results.items():
        workload, dtype, side = key.split("/")
        trl = results.get(f"{workload}/{dtype}/trl")
        if side != "trl" and trl and "error" not in trl and "error" not in s:
            s["speed_vs_trl"] = round(trl["sec_per_iter_median"] / s["sec_per_iter_median"], 3)
            # Per-repetition ratios (runs next to each other): the spread says how much of the ratio is noise.
            s["speed_vs_trl_per_rep"] = [
                round(t / o, 3) for t, o in zip(trl["run_medians"], s["run_medians"], strict=False)
            ]
    result = {
        "settings": {
            "workloads": {k: WORKLOADS[k] for k in args.workloads},
            "iters_warmup": {
                k: [args.iters or ITERS[k][0], ITERS[k][1] if args.warmup is None else args.warmup]
                for k in args.workloads
            },
            "dtypes": args.dtypes,
            "sides": args.sides,
            "reps": args.reps,
            "threads": args.threads,
            "dry_run": args.dry_run,
        },
        "machine": _machine(),
        "matmul_peak": {dt: {**peaks[dt], "gflops_after": peaks_after[dt]["gflops"]} for dt in args.dtypes},
        "results": results,
        "runs": runs,
        "wall_sec": round(time.time() - start, 1),
    }
    print(table(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    return result


if __name__ == "__main__":
    main()
