"""The CLI as a user runs it, in a subprocess: train, kill, resume, eval, compare, list (bad inputs:
test_bad_inputs.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")


def lmpo(*args, cwd=None, check=True, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "lmpo.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])})
    if check and proc.returncode != 0:
        raise AssertionError(f"lmpo {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_train_two_steps_writes_run_folder(tmp_path):
    proc = lmpo("train", TINY, "train.steps=2", f"output.dir={tmp_path}", "output.run_name=r", "output.plot=true")
    run = tmp_path / "r"
    for f in ("config.yaml", "metrics.jsonl", "curves.png", "summary.json", "checkpoints/latest"):
        assert (run / f).exists(), f
    steps = [r["step"] for r in metrics(run)]
    assert steps == [0, 1, 2]
    assert "eval/accuracy" in proc.stdout and "before" in proc.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["autocast"] is None  # the tiny config trains in float32


def test_killed_run_resumes_exactly(tmp_path):
    common = [TINY, "train.steps=8", "output.checkpoint_every=2", "eval.every=4", "eval.num_prompts=8"]
    lmpo("train", *common, f"output.dir={tmp_path}", "output.run_name=full")
    # Start the same run, SIGKILL it as soon as its first checkpoint exists, then resume it.
    cmd = [sys.executable, "-m", "lmpo.cli", "train", *common, f"output.dir={tmp_path}", "output.run_name=killed"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "killed"
    deadline = time.time() + 240
    while not (run / "checkpoints" / "latest").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists(), "the run finished before it could be killed"
    lmpo("train", "--resume", str(run))
    full, resumed = metrics(tmp_path / "full"), metrics(run)
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    for a, b in zip(full, resumed):
        for key in a:
            if key.startswith(("reward/", "loss/", "eval/", "rollout/length")):
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)


def test_eval_and_list(tmp_path):
    lmpo("train", TINY, "train.steps=1", f"output.dir={tmp_path}", "output.run_name=r")
    out = json.loads(lmpo("eval", str(tmp_path / "r"), "eval.num_prompts=4").stdout)
    assert out["checkpoint"].endswith("step_000001") and 0.0 <= out["eval/accuracy"] <= 1.0
    listing = lmpo("list").stdout
    for name in ("grpo", "rloo", "reinforce_pp", "ppo_clip", "gspo", "dynamic_sampling", "token_mean", "arXiv:2402.03300"):
        assert name in listing


def test_compare_writes_table_and_figure(tmp_path):
    out = tmp_path / "cmp"
    lmpo("compare", TINY, "--methods", "grpo,rloo", "--seeds", "0,1", "--out", str(out), "--target", "0.5",
         "train.steps=2", "eval.num_prompts=4")
    table = (out / "results.md").read_text()
    assert "| grpo |" in table and "| rloo |" in table and "lmpo compare" in table
    assert (out / "reward_curves.png").stat().st_size > 1000
    assert set(json.loads((out / "results.json").read_text())) == {"grpo", "rloo"}


def test_compare_reports_a_failed_run_and_reuses_finished_ones(tmp_path):
    out = tmp_path / "cmp"
    # soft_grpo's preset ends thinking at "</think>", which the tiny character tokenizer cannot encode: that run fails
    args = ["compare", TINY, "--methods", "grpo,soft_grpo", "--out", str(out), "train.steps=2", "eval.num_prompts=4"]
    first = lmpo(*args)
    table = (out / "results.md").read_text()
    assert "| grpo |" in table and "| soft_grpo | failed:" in table and "think_end" in table
    again = lmpo(*args, "--reuse")
    assert "[compare] grpo-seed0" in first.stdout and "[compare] grpo-seed0" not in again.stdout
    assert "| grpo |" in (out / "results.md").read_text()


# Bad input (config, data, rewards, damaged run folders): tests/e2e/test_bad_inputs.py
