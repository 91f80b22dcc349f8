"""Step time and peak memory per rank, 1 process vs 2 torchrun ranks, on the default model with full fine-tuning.

    python benchmarks/dist_scaling.py [--steps 3] [--out docs/results/distributed]

Both runs train the same global batch (rollout.prompts_per_step=4 x 8 generations; 2 ranks: 2 prompts each) from
configs/default.yaml with LoRA off (every weight trained), no evaluation, and the only checkpoint after the last
step (after its metrics are taken). The 1-process run gets 2 threads and each rank of the 2-rank runs 1 (the same
cores); the 2-rank run once with DDP, once with FSDP2. Writes <out>.json and <out>.md with the load average (uptime)
before and after each run: on a shared machine the numbers move with it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def run(nproc: int, steps: int, out: Path, strategy: str = "auto") -> dict:
    name = f"dist-bench-{nproc}rank-{strategy}"
    args = ["train", str(ROOT / "configs/default.yaml"), "model.lora.enabled=false", "rollout.prompts_per_step=4",
            f"train.steps={steps}", "eval.num_prompts=0", "eval.at_start=false", "output.checkpoint_every=0",
            "output.progress=false", "output.plot=false", f"train.threads={2 // nproc}", f"output.dir={out}",
            f"output.run_name={name}", f"train.dist.strategy={strategy}", "--overwrite"]
    launcher = ([sys.executable, "-m", "lmpo"] if nproc == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
                 "lmpo"])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    before, t0 = uptime(), time.perf_counter()
    proc = subprocess.run(launcher + args, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] >= 1]
    peaks = {k: max(r[k] for r in rows) for k in rows[-1] if k.startswith("perf/peak_rss_gb")}
    return {"ranks": nproc, "strategy": strategy if nproc > 1 else "-", "command": " ".join(["torchrun --nproc_per_node 2 -m lmpo" if nproc > 1 else "lmpo"]
                                                + args),
            "step_s": [r["perf/step_s"] for r in rows], "generate_s": [r["perf/generate_s"] for r in rows],
            "update_s": [r.get("perf/update_s") for r in rows], "peak_rss_gb": peaks, "wall_s": wall,
            "uptime_before": before, "uptime_after": uptime()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "docs/results/distributed"))
    ap.add_argument("--runs-dir", default="/tmp/lmpo-dist-bench")
    a = ap.parse_args()
    runs = Path(a.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    results = [run(2, a.steps, runs, "ddp"), run(2, a.steps, runs, "fsdp2"), run(1, a.steps, runs)]
    Path(a.out + ".json").write_text(json.dumps(results, indent=2))
    lines = ["# 1 process vs 2 torchrun ranks (default model, full fine-tuning)", "",
             f"Made by `python benchmarks/dist_scaling.py --steps {a.steps}` on {os.cpu_count()} CPU cores "
             "shared with other jobs (load averages below).", "",
             "| ranks | strategy | step s (each step) | generate s | update s | peak RSS GB per rank | load before / after |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        peaks = (f"{r['peak_rss_gb']['perf/peak_rss_gb']:.2f}" if r["ranks"] == 1 else
                 ", ".join(f"{k.split('_')[-1]}: {v:.2f}" for k, v in sorted(r["peak_rss_gb"].items())
                           if k != "perf/peak_rss_gb"))
        load = lambda u: u.split("load average:")[-1].strip()  # noqa: E731
        lines.append(f"| {r['ranks']} | {r['strategy']} | {', '.join(f'{x:.1f}' for x in r['step_s'])} | "
                     f"{', '.join(f'{x:.1f}' for x in r['generate_s'])} | "
                     f"{', '.join(f'{x:.1f}' for x in r['update_s'] if x is not None)} | {peaks} | "
                     f"{load(r['uptime_before'])} / {load(r['uptime_after'])} |")
    lines += ["", "Commands:", ""] + [f"    {r['command']}" for r in results]
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
