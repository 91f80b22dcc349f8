"""lmpo vs TRL GRPOTrainer on the identical workload, alternating, one subprocess per measurement.

    python benchmarks/bench.py --quick            # a few minutes: fp32+bf16, 2 rounds, short sweep
    python benchmarks/bench.py                    # full: 3 rounds, sweep T in 64/256/1024 and G in 4/8/16
    lmpo bench [--quick] ...                      # the same, through the CLI
    make bench                                    # installs the `bench` extra (TRL) and runs the full benchmark

Writes ``<out>/results.json`` (every raw measurement) and ``<out>/results.md`` (medians and lmpo/TRL ratios).
See ``benchmarks/workers.py`` for what exactly each side runs and why the workloads are identical.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import (BenchError, markdown_table, matmul_peak, parse_worker_output,  # noqa: E402
                    ratio_rows, stream_peak, summarize)


def run_worker(spec: dict, timeout: float, log) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]),
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(HERE / "workers.py"), json.dumps(spec)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE.parent)
    if proc.returncode != 0:
        raise BenchError(f"{spec['side']} worker exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    res = parse_worker_output(proc.stdout)
    res["wall_s"] = time.perf_counter() - t0
    steps = res.get("steps") or []
    brief = f"median step {sorted(s['step_s'] for s in steps)[len(steps) // 2]:.2f}s" if steps else ""
    if "peak_flops" in res:
        brief = ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in res["peak_flops"].items())
    log(f"  {spec['side']:<6} {spec.get('precision', ''):<5} G={spec.get('group', '-')} T={spec.get('length', '-')}"
        f"  {brief}  peak RSS {res.get('peak_rss_gb', 0):.2f} GB  ({res['wall_s']:.0f}s wall)")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short run (a few minutes)")
    p.add_argument("--rounds", type=int, default=None, help="alternations of lmpo and TRL per precision")
    p.add_argument("--steps", type=int, default=None, help="training steps per measurement (incl. warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="leading steps not measured")
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32,bf16")
    p.add_argument("--sides", default=None, help="comma list of lmpo,trl (default: trl only if installed)")
    p.add_argument("--group", type=int, default=8, help="completions per prompt (one prompt per step)")
    p.add_argument("--length", type=int, default=64, help="completion length in tokens")
    p.add_argument("--natural-length", action="store_true", help="let EOS end completions (default: fixed length)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("LMPO_BENCH_THREADS", os.cpu_count() or 1)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="default")
    p.add_argument("--sweep", choices=["none", "quick", "full"], default=None, help="lmpo scaling sweep")
    p.add_argument("--sweep-precision", default="fp32")
    p.add_argument("--lmpo-override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra lmpo config override for the lmpo side (levers), repeatable")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker")
    p.add_argument("--render", metavar="RESULTS_JSON", default=None,
                   help="measure nothing: rewrite the tables of an earlier run's results.json (give the same options)")
    a = p.parse_args(argv)
    if a.render:
        raw = json.loads(Path(a.render).read_text())
        precisions = [x for x in a.precisions.split(",") if x in raw]
        sides = sorted({s for prec in precisions for s in raw[prec]}, key=["lmpo", "trl"].index)
        md = render(raw, precisions, sides, a)
        Path(a.render).with_name("results.md").write_text(md)
        print(md)
        return 0

    rounds = a.rounds or (2 if a.quick else 3)
    steps = a.steps or (3 if a.quick else 5)
    sweep = a.sweep or ("quick" if a.quick else "full")
    has_trl = importlib.util.find_spec("trl") is not None
    sides = a.sides.split(",") if a.sides else (["lmpo", "trl"] if has_trl else ["lmpo"])
    if "trl" in sides and not has_trl:
        print("TRL is not installed: `pip install -e '.[bench]'` (or `make bench`).", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    base = {"model": a.model, "group": a.group, "length": a.length, "steps": steps, "warmup": a.warmup,
            "threads": a.threads, "seed": a.seed, "fixed_length": not a.natural_length,
            "overrides": a.lmpo_override}
    raw: dict[str, list] = {"matmul": [], "sweep": []}
    log(f"threads={a.threads} rounds={rounds} steps={steps} (warm-up {a.warmup}) sides={sides} G={a.group} T={a.length}")
    raw["matmul"].append(run_worker({"side": "matmul", "threads": a.threads, "rows": a.group}, a.timeout, log))
    precisions = [x for x in a.precisions.split(",") if x]
    for prec in precisions:
        raw[prec] = {s: [] for s in sides}
        for r in range(rounds):
            order = sides if r % 2 == 0 else sides[::-1]  # alternate who goes first
            for side in order:
                raw[prec][side].append(run_worker({**base, "side": side, "precision": prec}, a.timeout, log))
    raw["matmul"].append(run_worker({"side": "matmul", "threads": a.threads, "rows": a.group}, a.timeout, log))

    if sweep != "none" and "lmpo" in sides:
        lengths = (64, 256, 1024) if sweep == "full" else (64, 256)
        groups = (4, 8, 16)
        points = [(a.group, t) for t in lengths] + [(g, a.length) for g in groups if g != a.group]
        for g, t in points:
            spec = {**base, "side": "lmpo", "precision": a.sweep_precision, "group": g, "length": t,
                    "steps": 2, "warmup": 1}
            raw["sweep"].append(run_worker(spec, a.timeout, log))

    (out / "results.json").write_text(json.dumps(raw, indent=1))
    md = render(raw, precisions, sides, a)
    (out / "results.md").write_text(md)
    print("\n" + md)
    print(f"raw measurements: {out / 'results.json'}")
    return 0


def render(raw: dict, precisions: list[str], sides: list[str], a) -> str:
    peak, peak_cpu = matmul_peak(raw["matmul"]), matmul_peak(raw["matmul"], "peak_flops_cpu")
    stream_cpu = stream_peak(raw["matmul"], "stream_bytes_per_cpu_s")
    read_cpu = stream_peak(raw["matmul"], "read_bytes_per_cpu_s")
    parts = [f"Machine: {os.cpu_count()} CPUs, torch threads {a.threads}. Matmul peak (best square matmul): "
             + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peak.items())
             + "; per CPU-second: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peak_cpu.items())
             + (f". Decode-shaped matmul (fp32, {a.group} rows): {stream_cpu / 1e9:.2f} weight GB per CPU-second"
                if stream_cpu else "")
             + (f"; plain read of the same weights: {read_cpu / 1e9:.2f} GB per CPU-second" if read_cpu else "")]
    for prec in precisions:
        lm = summarize(raw[prec]["lmpo"]) if "lmpo" in sides else None
        tr = summarize(raw[prec]["trl"]) if "trl" in sides else None
        rows = ratio_rows(lm or {}, tr, peak.get(prec), peak_cpu.get(prec), stream_cpu, read_cpu)
        n = (lm or tr)["runs"]
        parts.append(f"\n### {prec}: G={a.group}, T={a.length}, medians over {n} runs per side\n")
        parts.append(markdown_table(("metric", "lmpo", "TRL", "lmpo/TRL"), rows))
    if raw["sweep"]:
        rows = []
        for r in raw["sweep"]:
            s = summarize([r])
            rows.append((r["spec"]["group"], r["spec"]["length"], r["spec"]["group"] * r["spec"]["length"],
                         f"{s['step_s']:.2f}", f"{s['step_cpu']:.2f}", f"{s['generate_cpu']:.2f}",
                         f"{s['update_cpu']:.2f}", f"{s['peak_rss_gb']:.2f}",
                         f"{s['peak_rss_gb'] - s['base_rss_gb']:.2f}"))
        parts.append(f"\n### lmpo scaling ({raw['sweep'][0]['spec']['precision']}, one measured step each)\n")
        parts.append(markdown_table(("G", "T", "BxT", "step s", "step CPU-s", "generate CPU-s", "update CPU-s",
                                     "peak RSS GB", "peak - after-load GB"), rows))
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    sys.exit(main())
