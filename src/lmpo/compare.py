"""``lmpo compare``: several methods on identical prompts and seeds, one figure and one table.

Each (method, seed) run is a separate ``lmpo train`` process, so peak memory and wall time are measured per run and
runs cannot leak state into each other. Runs share the config, hence the task, the prompt order (seeded by
``train.seed``) and the model initialisation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lmpo.config import check_writable_folder, load_config
from lmpo.errors import LmpoError
from lmpo.train.metrics import read_metrics, series


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


def steps_to_target(rows: list[dict], key: str, target: float | None) -> int | None:
    if target is None:
        return None
    for step, value in zip(*series(rows, key)):
        if value >= target:
            return step
    return None


def run_compare(config: str | None, methods: list[str], seeds: list[int], overrides: list[str], out: Path,
                target: float | None = None, quiet: bool = False, reuse: bool = False) -> dict[str, Any]:
    """Train every (method, seed); a run that fails is reported in the table and the others go on.

    With ``reuse``, a run whose folder already holds a finished result of the same command (``compare.json``) is
    read back instead of trained again, so an interrupted comparison resumes where it stopped.
    """
    for m in methods:  # fail fast, before any run starts, on a misspelt method or a bad override
        load_config(config, [*overrides, f"method={m}"])
    check_writable_folder(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {}
    failures: dict[str, str] = {}
    for m in methods:
        for s in seeds:
            name = f"{m}-seed{s}"
            run_dir = out / "runs" / name
            cmd = [sys.executable, "-m", "lmpo.cli", "train", *([config] if config else []), *overrides,
                   f"method={m}", f"train.seed={s}", f"output.dir={out / 'runs'}", f"output.run_name={name}",
                   "output.progress=false", "--overwrite"]
            done = run_dir / "compare.json"
            if reuse and done.exists() and json.loads(done.read_text()).get("cmd") == cmd[1:]:
                wall = json.loads(done.read_text())["wall_s"]
            else:
                if not quiet:
                    print(f"[compare] {name}", flush=True)
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
                wall = time.perf_counter() - t0
                if proc.returncode != 0:
                    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
                    failures[m] = (lines[-1] if lines else f"exit {proc.returncode}")[:300]
                    print(f"[compare] {name} FAILED (exit {proc.returncode}): {failures[m]}", file=sys.stderr, flush=True)
                    continue
                done.write_text(json.dumps({"cmd": cmd[1:], "wall_s": wall}))
            summary = json.loads((run_dir / "summary.json").read_text())
            results.setdefault(m, []).append({"seed": s, "wall_s": wall, "rows": read_metrics(run_dir / "metrics.jsonl"),
                                              **summary})
    if not results:
        raise LmpoError("compare: every run failed:\n" + "\n".join(f"  {m}: {e}" for m, e in failures.items()))
    table = summarise(results, target)
    (out / "results.json").write_text(json.dumps({**table, **({"failed": failures} if failures else {})}, indent=2))
    (out / "results.md").write_text(markdown_table(table, config, methods, seeds, overrides, target, failures, out))
    plot_compare(results, out / "reward_curves.png")
    return table


def summarise(results: dict[str, list[dict]], target: float | None) -> dict[str, Any]:
    table = {}
    for m, runs in results.items():
        final_r = [r["eval_after"].get("eval/reward", float("nan")) for r in runs]
        final_a = [r["eval_after"].get("eval/accuracy", float("nan")) for r in runs]
        start_a = [r["eval_before"].get("eval/accuracy", float("nan")) for r in runs]
        hits = [steps_to_target(r["rows"], "reward/mean", target) for r in runs]
        table[m] = {
            "heldout_reward": _mean_std(final_r), "heldout_accuracy": _mean_std(final_a),
            "heldout_accuracy_start": _mean_std(start_a),
            "steps_to_target": [h for h in hits],
            "wall_s": _mean_std([r["wall_s"] for r in runs]),
            "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
        }
    return table


def markdown_table(table: dict[str, Any], config, methods, seeds, overrides, target, failures=None, out=None) -> str:
    cmd = " ".join(["lmpo compare", *([config] if config else []), f"--methods {','.join(methods)}",
                    f"--seeds {','.join(map(str, seeds))}", *([f"--target {target}"] if target is not None else []),
                    *([f"--out {out}"] if out is not None else []), *overrides])
    hit = f"steps to train reward >= {target}" if target is not None else "steps to target (no --target)"
    lines = [f"Command: `{cmd}`", "",
             f"| method | held-out reward | held-out accuracy (start -> end) | {hit} | wall time (s) | peak RSS (GB) |",
             "|---|---|---|---|---|---|"]
    for m, r in table.items():
        hits = ", ".join("-" if h is None else str(h) for h in r["steps_to_target"])
        lines.append(
            f"| {m} | {r['heldout_reward'][0]:.3f} ± {r['heldout_reward'][1]:.3f} | "
            f"{r['heldout_accuracy_start'][0]:.3f} -> {r['heldout_accuracy'][0]:.3f} ± {r['heldout_accuracy'][1]:.3f} | "
            f"{hits} | {r['wall_s'][0]:.0f} | {r['peak_rss_gb']:.2f} |")
    for m, err in (failures or {}).items():
        lines.append(f"| {m} | failed: {err.replace('|', '/')} | | | | |")
    return "\n".join(lines) + "\n"


def plot_compare(results: dict[str, list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    for m, runs in results.items():
        curves = [dict(zip(*series(r["rows"], "reward/mean"))) for r in runs]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        if not steps:
            continue
        vals = np.array([[c[s] for s in steps] for c in curves])
        mean, std = vals.mean(0), vals.std(0)
        ax.plot(steps, mean, label=f"{m} (n={len(runs)})")
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("step"), ax.set_ylabel("training reward (mean over seeds ± std)"), ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
