"""Asynchronous off-policy training (``train.async``): throughput and learning-curve cost of max_staleness k.

    python benchmarks/async_bench.py [--config configs/tiny.yaml] [--ks sync,0,1,2,4] [--seeds 0,1,2]
                                     [--steps 30] [--threads 1] [--out docs/results/async] [key=value ...]
    (or: make bench-async; BENCH_ASYNC_ARGS="--config configs/default.yaml --steps 4 --seeds 0 --tag default")

Every run is ``lmpo train CONFIG`` in a fresh subprocess (no evaluation until the end, no checkpoint before the
end, run folder in a temporary directory), the variants interleaved seed by seed so that a drift in the machine's
load spreads over all of them. Per run it reads ``metrics.jsonl``: ``perf/step_s`` (the trainer's wall time per
step, waiting for its batch included), ``perf/generate_s`` (the sampling time of the step's batch, in the producer
thread under train.async), ``async/wait_s``, the reward per step and the final held-out accuracy. Throughput is
steps per second of training (the steps after the first, which includes the producer's start); the learning cost
is the mean training reward and the final held-out accuracy against the synchronous run of the same seeds.
The 1-minute load average is recorded before and after every run: on a shared machine the timings are only as
good as that column. Writes ``OUT.json`` (everything) and ``OUT.md`` (tables, the command, the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(config: str, variant: str, seed: int, steps: int, threads: int, extra: list[str], tmp: Path) -> dict:
    name = f"{variant}-seed{seed}"
    overrides = [f"train.steps={steps}", f"train.seed={seed}", f"train.threads={threads}", "eval.every=0",
                 "eval.at_start=false", "output.checkpoint_every=0", "output.plot=false", "output.progress=false",
                 f"output.dir={tmp}", f"output.run_name={name}", *extra]
    if variant != "sync":
        overrides.append(f"train.async.max_staleness={int(variant)}")
    cmd = [sys.executable, "-m", "lmpo.cli", "train", config, *overrides]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    load_before, t0 = os.getloadavg()[0], time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rows = [json.loads(x) for x in (tmp / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps_rows = [r for r in rows if r["step"] >= 1 and "perf/step_s" in r]
    final = next((r for r in reversed(rows) if "eval/accuracy" in r), {})
    return {"variant": variant, "seed": seed, "wall_s": wall, "load_before": load_before,
            "load_after": os.getloadavg()[0],
            "step_s": [r["perf/step_s"] for r in steps_rows], "generate_s": [r["perf/generate_s"] for r in steps_rows],
            "wait_s": [r.get("async/wait_s", 0.0) for r in steps_rows],
            "staleness": [r.get("async/staleness", 0.0) for r in steps_rows],
            "reward": [r["reward/mean"] for r in steps_rows], "eval_accuracy": final.get("eval/accuracy"),
            "eval_reward": final.get("eval/reward"), "command": shlex.join(["lmpo", "train", config, *overrides])}


def mean(xs):
    return statistics.fmean(xs) if xs else float("nan")


def sd(xs):
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarise(runs: list[dict], variants: list[str]) -> dict:
    out = {}
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        after_first = [r["step_s"][1:] for r in rs]
        out[v] = {
            "seeds": [r["seed"] for r in rs],
            "step_s_median": statistics.median([x for xs in after_first for x in xs]),
            "steps_per_s": mean([len(xs) / sum(xs) for xs in after_first]),
            "generate_s_mean": mean([x for r in rs for x in r["generate_s"][1:]]),
            "wait_s_mean": mean([x for r in rs for x in r["wait_s"][1:]]),
            "staleness_mean": mean([x for r in rs for x in r["staleness"]]),
            "reward_mean": mean([mean(r["reward"]) for r in rs]), "reward_mean_sd": sd([mean(r["reward"]) for r in rs]),
            "reward_last10": mean([mean(r["reward"][-10:]) for r in rs]),
            "eval_accuracy": mean([r["eval_accuracy"] for r in rs if r["eval_accuracy"] is not None]),
            "eval_accuracy_sd": sd([r["eval_accuracy"] for r in rs if r["eval_accuracy"] is not None]),
            "load_mean": mean([(r["load_before"] + r["load_after"]) / 2 for r in rs]),
            "curve": [mean(xs) for xs in zip(*[r["reward"] for r in rs])],
        }
    base = out.get("sync") or out[variants[0]]
    for v in variants:
        out[v]["speedup"] = out[v]["steps_per_s"] / base["steps_per_s"]
    return out


def write_md(path: Path, summary: dict, args, command: str, runs: list[dict]) -> None:
    label = {"sync": "synchronous"}
    lines = [f"# train.async on {args.config} ({args.steps} steps, seeds {args.seeds}, train.threads={args.threads})",
             "", f"Command: `{command}`", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, shared; the load "
             "column is the 1-minute load average around the runs of each variant (`uptime`).", "",
             "| variant | step s (median) | steps/s | speed-up | generate s | trainer wait s | mean staleness | "
             "train reward (mean ± sd over seeds) | last-10 reward | held-out accuracy | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for v, s in summary.items():
        name = label.get(v, f"k={v}")
        lines.append(f"| {name} | {s['step_s_median']:.3f} | {s['steps_per_s']:.3f} | {s['speedup']:.2f}x | "
                     f"{s['generate_s_mean']:.3f} | {s['wait_s_mean']:.3f} | {s['staleness_mean']:.2f} | "
                     f"{s['reward_mean']:.3f} ± {s['reward_mean_sd']:.3f} | {s['reward_last10']:.3f} | "
                     f"{s['eval_accuracy']:.3f} ± {s['eval_accuracy_sd']:.3f} | {s['load_mean']:.1f} |")
    steps = len(next(iter(summary.values()))["curve"])
    marks = sorted({i for i in range(4, steps, 5)} | {steps - 1})
    lines += ["", "Training reward per step (mean over seeds):", "",
              "| variant | " + " | ".join(f"step {i + 1}" for i in marks) + " |",
              "|---|" + "---|" * len(marks)]
    for v, s in summary.items():
        lines.append(f"| {label.get(v, f'k={v}')} | " + " | ".join(f"{s['curve'][i]:.3f}" for i in marks) + " |")
    lines += ["", "Per run: `" + runs[0]["command"] + "` with the variant's `train.async.max_staleness` and seed.", ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--ks", default="sync,0,1,2,4", help="variants: sync and/or max_staleness values")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="docs/results/async")
    ap.add_argument("--tag", default="", help="suffix of the output files (e.g. default)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of every run")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.ks.split(",") if v.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    command = shlex.join(["python", "benchmarks/async_bench.py", *(argv if argv is not None else sys.argv[1:])])
    runs = []
    with tempfile.TemporaryDirectory(prefix="lmpo-async-bench-") as tmp:
        for seed in seeds:
            for v in variants:
                r = run_one(args.config, v, seed, args.steps, args.threads, args.overrides, Path(tmp))
                print(f"{v:>5} seed {seed}: {r['wall_s']:.1f} s, step {statistics.median(r['step_s']):.3f} s, "
                      f"reward {mean(r['reward']):.3f}, load {r['load_before']:.1f}", flush=True)
                runs.append(r)
    summary = summarise(runs, variants)
    out = Path(args.out + (f"-{args.tag}" if args.tag else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "summary": summary, "runs": runs}, indent=1))
    write_md(out.with_suffix(".md"), summary, args, command, runs)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
