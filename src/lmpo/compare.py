"""``lmpo compare``: several methods on identical prompts and seeds, one figure and two tables.

Each (method, seed) run is a separate ``lmpo train`` process, so peak memory and wall time are measured per run and
runs cannot leak state into each other. Runs share the config, hence the task, the prompt order (seeded by
``train.seed``) and the model initialisation.

Run folders already in ``--out`` are never clobbered. Before anything trains, every run is looked at: one that
finished with the same config is read back, one stopped midway (or shorter ``train.steps``) is resumed, and one
trained with another config, past ``train.steps``, or stopped before its first checkpoint makes the whole command
refuse, naming the folders and why, with nothing changed.

Outputs in ``--out``: ``results.json`` (labelled statistics with every seed's value, see :func:`summarise`),
``results.md`` (a table per method and one per seed) and ``curves.png`` (training reward and held-out curves per
method: the mean over seeds with a min-max band).

Steps to target: the first step whose training reward ``reward/mean`` (the mean reward of that step's sampled
replies, before shaping) is at least the target. The target is ``--target``; without it, it is halfway from the
runs' mean first-step training reward to the highest training reward any run logged, so it adapts to the reward's
scale and at least one run reaches it. A run that never reaches it has ``null`` (``-`` in the table).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from lmpo.config import check_writable_folder, load_config
from lmpo.errors import LmpoError
from lmpo.train.checkpoint import latest_checkpoint
from lmpo.train.metrics import read_metrics, series
from lmpo.train.rundir import SUMMARY, checkpoint_step, trained_steps

TARGET_KEY = "reward/mean"
# Settings that do not change what a run computes; a run folder whose other settings differ is not resumed.
IGNORED = ("output.", "train.steps")


# --------------------------------------------------------------------------- statistics
def stat(per_seed: dict[int, float | None]) -> dict[str, Any]:
    """``{"mean", "std", "per_seed"}``: mean and sample std (n - 1; null for fewer than two) of the finite values;
    ``per_seed`` keeps every seed's value, missing ones as null."""
    vals = [v for v in per_seed.values() if v is not None and math.isfinite(v)]
    mean = sum(vals) / len(vals) if vals else None
    std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else None
    return {"mean": mean, "std": std, "per_seed": {str(s): v for s, v in per_seed.items()}}


def steps_to_target(rows: list[dict], target: float | None, key: str = TARGET_KEY) -> int | None:
    """The first logged step whose ``key`` is >= ``target`` (None if none is, or no target)."""
    if target is None:
        return None
    for step, value in zip(*series(rows, key)):
        if value is not None and value >= target:
            return step
    return None


def default_target(results: dict[str, list[dict]], key: str = TARGET_KEY) -> float | None:
    """Halfway from the runs' mean first-step ``key`` to the highest ``key`` any run logged (module docstring)."""
    firsts, best = [], None
    for runs in results.values():
        for r in runs:
            _, ys = series([row for row in r["rows"] if row.get("step", 0) >= 1], key)
            if ys:
                firsts.append(ys[0])
                best = max(ys) if best is None else max(best, max(ys))
    if not firsts:
        return None
    start = sum(firsts) / len(firsts)
    return round(start + 0.5 * (best - start), 3)


# --------------------------------------------------------------------------- existing run folders
def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Settings (dotted keys) whose values differ between a run folder's config and this command's."""
    a, b = (_flat(yaml.safe_load(yaml.safe_dump(d, sort_keys=False))) for d in (saved, wanted))
    keys = [k for k in dict.fromkeys([*a, *b]) if not k.startswith(IGNORED) and a.get(k) != b.get(k)]
    return [f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in keys]


def existing_run(run_dir: Path, wanted: dict[str, Any], steps: int) -> tuple[str, str]:
    """What to do with ``run_dir``: ``("train" | "resume" | "done" | "refuse", why)``."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        logged = trained_steps(run_dir)
        if logged:
            return "refuse", (f"holds metrics of {len(logged)} training steps but no checkpoint (it stopped before "
                              "its first one), so it can only be replaced")
        return "train", "training"
    if not (run_dir / "config.yaml").is_file():
        return "refuse", "holds checkpoints but no config.yaml"
    try:  # through the loader, so settings added to lmpo since the run was made read as their defaults
        saved = load_config(str(run_dir / "config.yaml")).to_dict()
    except LmpoError as exc:
        return "refuse", f"holds checkpoints but its config.yaml does not load ({exc})"
    diff = config_differences(saved, wanted)
    if diff:
        more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
        return "refuse", f"was trained with another config: {'; '.join(diff[:3])}{more}"
    step = checkpoint_step(ckpt)
    if step > steps:
        return "refuse", f"is at step {step}, past train.steps={steps}"
    if step < steps:
        return "resume", f"resuming from step {step} of {steps}"
    try:
        summary = json.loads((run_dir / SUMMARY).read_text())
    except (OSError, ValueError):
        summary = {}
    if summary.get("steps") == step:
        return "done", f"finished earlier (step {step}), read back"
    return "resume", f"finished at step {step}; rebuilding its summary"


# --------------------------------------------------------------------------- the command
def run_compare(config: str | None, methods: list[str], seeds: list[int], overrides: list[str], out: Path,
                target: float | None = None, quiet: bool = False, reuse: bool | None = None) -> dict[str, Any]:
    """Train (or resume, or read back) every (method, seed); a run that fails is reported in the table and the
    others go on. ``reuse`` is accepted for old callers: reading back and resuming is what compare always does."""
    del reuse
    for m in methods:  # fail fast, before any run starts, on a misspelt method or a bad override
        load_config(config, [*overrides, f"method={m}"])
    check_writable_folder(out, "--out")
    jobs, refused = [], []
    for m in methods:
        for s in seeds:
            name = f"{m}-seed{s}"
            run_dir = out / "runs" / name
            train_args = [*overrides, f"method={m}", f"train.seed={s}", f"output.dir={out / 'runs'}",
                          f"output.run_name={name}", "output.progress=false"]
            wanted = load_config(config, train_args)
            action, why = existing_run(run_dir, wanted.to_dict(), wanted.train.steps)
            if action == "refuse":
                refused.append(f"  {run_dir}: {why}")
            jobs.append((m, s, name, run_dir, train_args, action, why))
    if refused:
        raise LmpoError(
            f"compare: --out {str(out)!r} already holds runs this command would not resume or read back:\n"
            + "\n".join(refused) + "\nNothing was changed. Use another --out, or delete those run folders to retrain "
            "them.")
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {}
    failures: dict[str, str] = {}
    for m, s, name, run_dir, train_args, action, why in jobs:
        done = run_dir / "compare.json"
        try:
            earlier = json.loads(done.read_text()).get("wall_s") if done.exists() else None
        except ValueError:
            earlier = None
        if not quiet:
            print(f"[compare] {name}: {why}", flush=True)
        wall = earlier
        if action != "done":
            cmd = [sys.executable, "-m", "lmpo.cli", "train", *([config] if config else []), *train_args,
                   *(["--resume"] if action == "resume" else [])]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            wall = (earlier or 0.0) + time.perf_counter() - t0
            if proc.returncode != 0:
                lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
                failures[name] = (lines[-1] if lines else f"exit {proc.returncode}")[:300]
                print(f"[compare] {name} FAILED (exit {proc.returncode}): {failures[name]}", file=sys.stderr, flush=True)
                continue
            done.write_text(json.dumps({"cmd": cmd[1:], "wall_s": wall}))
        summary = json.loads((run_dir / SUMMARY).read_text())
        results.setdefault(m, []).append({"seed": s, "wall_s": wall, "rows": read_metrics(run_dir / "metrics.jsonl"),
                                          **summary})
    if not results:
        raise LmpoError("compare: every run failed:\n" + "\n".join(f"  {m}: {e}" for m, e in failures.items()))
    given = target is not None
    target = target if given else default_target(results)
    table = summarise(results, target)
    cmd = command_line(config, methods, seeds, overrides, target if given else None, out)
    how = "--target" if given else ("default: halfway from the runs' mean first-step training reward to the highest "
                                    "training reward any run logged")
    (out / "results.json").write_text(json.dumps(
        {"command": cmd, "target": {"metric": TARGET_KEY, "value": target, "source": how}, "methods": table,
         **({"failed": failures} if failures else {})}, indent=2))
    (out / "results.md").write_text(markdown_table(table, cmd, target, how, failures))
    plot_compare(results, out / "curves.png", target)
    return table


def summarise(results: dict[str, list[dict]], target: float | None) -> dict[str, Any]:
    """Per method: every statistic as ``{"mean", "std", "per_seed"}`` (see :func:`stat`)."""
    table = {}
    for m, runs in results.items():
        def per(fn):
            return stat({r["seed"]: fn(r) for r in runs})

        hits = per(lambda r: steps_to_target(r["rows"], target))
        table[m] = {
            "seeds": [r["seed"] for r in runs],
            "heldout_reward": per(lambda r: r["eval_after"].get("eval/reward")),
            "heldout_accuracy": per(lambda r: r["eval_after"].get("eval/accuracy")),
            "heldout_accuracy_start": per(lambda r: r["eval_before"].get("eval/accuracy")),
            # preference runs (lmpo.train.preference): the held-out pairs ranked right by the policy's log-probs
            "heldout_pair_accuracy": per(lambda r: r["eval_after"].get("eval/logp_accuracy")),
            "steps_to_target": {**hits, "reached": sum(v is not None for v in hits["per_seed"].values()),
                                "runs": len(runs)},
            "wall_s": per(lambda r: r.get("wall_s")),
            "peak_rss_gb": per(lambda r: r.get("peak_rss_gb")),
        }
    return table


# --------------------------------------------------------------------------- tables
def command_line(config, methods, seeds, overrides, target, out) -> str:
    return " ".join(["lmpo compare", *([config] if config else []), f"--methods {','.join(methods)}",
                     f"--seeds {','.join(map(str, seeds))}", *([f"--target {target}"] if target is not None else []),
                     *([f"--out {out}"] if out is not None else []), *overrides])


def _num(v: float | None, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def _ms(s: dict[str, Any], fmt: str = ".3f") -> str:
    return _num(s["mean"], fmt) + ("" if s["std"] is None else f" ± {format(s['std'], fmt)}")


def markdown_table(table: dict[str, Any], cmd: str, target: float | None, how: str, failures=None) -> str:
    hit = f"steps to train reward >= {_num(target)}"
    lines = [f"Command: `{cmd}`", "",
             f"Mean ± sample std over seeds. Steps to target: the first step whose training reward (`{TARGET_KEY}`) "
             f"is >= {_num(target)} ({how}); `-` = not reached; averaged over the seeds that reached it.", "",
             f"| method | held-out reward | held-out accuracy (start -> end) | {hit} | wall time (s) | peak RSS (GB) |",
             "|---|---|---|---|---|---|"]
    for m, r in table.items():
        h = r["steps_to_target"]
        lines.append(
            f"| {m} | {_ms(r['heldout_reward'])} | {_num(r['heldout_accuracy_start']['mean'])} -> "
            f"{_ms(r['heldout_accuracy'])} | {_ms(h, '.1f')} ({h['reached']}/{h['runs']} seeds) | "
            f"{_num(r['wall_s']['mean'], '.0f')} | {_num(r['peak_rss_gb']['mean'], '.2f')} |")
    for name, err in (failures or {}).items():
        lines.append(f"| {name} | failed: {err.replace('|', '/')} | | | | |")
    lines += ["", "Per seed:", "",
              f"| method | seed | held-out reward | held-out accuracy (start -> end) | {hit} | wall time (s) |",
              "|---|---|---|---|---|---|"]
    for m, r in table.items():
        for s in map(str, r["seeds"]):
            lines.append(
                f"| {m} | {s} | {_num(r['heldout_reward']['per_seed'][s])} | "
                f"{_num(r['heldout_accuracy_start']['per_seed'][s])} -> {_num(r['heldout_accuracy']['per_seed'][s])} | "
                f"{_num(r['steps_to_target']['per_seed'][s], 'd')} | {_num(r['wall_s']['per_seed'][s], '.0f')} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- figure
def _band(runs: list[dict], key: str):
    """Steps logged by every seed, and the mean, min and max over seeds at those steps."""
    import numpy as np

    curves = [dict(zip(*series(r["rows"], key))) for r in runs]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    if not steps:
        return None
    vals = np.array([[c[s] for s in steps] for c in curves], dtype=float)
    return steps, vals.mean(0), vals.min(0), vals.max(0)


def plot_compare(results: dict[str, list[dict]], out: Path, target: float | None = None) -> None:
    """Training reward (left) and held-out accuracy or reward (right) per method: mean over seeds, min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heldout = "eval/accuracy" if any("eval/accuracy" in row for runs in results.values() for r in runs
                                     for row in r["rows"]) else "eval/reward"
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for i, (m, runs) in enumerate(results.items()):
        color = f"C{i % 10}"
        for a, key, marker in ((ax[0], TARGET_KEY, None), (ax[1], heldout, "o")):
            band = _band(runs, key)
            if band is None:
                continue
            steps, mean, lo, hi = band
            a.plot(steps, mean, color=color, marker=marker, label=f"{m} (n={len(runs)})")
            if len(runs) > 1:
                a.fill_between(steps, lo, hi, color=color, alpha=0.2, linewidth=0)
    if target is not None:
        ax[0].axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax[0].set_xlabel("step"), ax[0].set_ylabel(f"training reward ({TARGET_KEY})")
    ax[0].set_title("training rollouts (mean over seeds, min-max band)")
    ax[1].set_xlabel("step"), ax[1].set_ylabel(f"held-out {heldout.split('/')[-1]}")
    ax[1].set_title("held-out evaluation (greedy)")
    for a in ax:
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
