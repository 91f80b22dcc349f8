"""Run-folder safety through the CLI, in subprocesses: two writers, kill -9 of the holder, failed starts and
failed resumes (the in-process cases are in tests/unit/test_rundir.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")


def lmpo(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "lmpo.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get(
                              "PYTHONPATH", "")])})
    if check and proc.returncode != 0:
        raise AssertionError(f"lmpo {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def files(run) -> dict:
    return {str(p): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}


def test_second_writer_fails_with_holder_pid_and_kill9_releases(tmp_path):
    common = [TINY, f"output.dir={tmp_path}", "output.run_name=r", "eval.every=0", "output.checkpoint_every=0",
              "eval.num_prompts=4", "output.plot=false"]
    run = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, "-m", "lmpo.cli", "train", *common, "train.steps=100000"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and holder.poll() is None and not any(
                json.loads(x).get("step", 0) >= 1 for x in ((run / "metrics.jsonl").read_text().splitlines()
                                                            if (run / "metrics.jsonl").exists() else [])):
            time.sleep(0.05)
        assert holder.poll() is None, "the first run ended early"
        second = lmpo("train", *common, "train.steps=2", check=False)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"is in use by another lmpo process (pid {holder.pid})" in second.stderr, second.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the lock went with the killed process; its training steps (no checkpoint yet) are not replaced silently
    again = lmpo("train", *common, "train.steps=1", check=False)
    assert again.returncode == 2 and "no checkpoint" in again.stderr and "--overwrite" in again.stderr


def test_failed_resume_with_bad_override_leaves_config_byte_identical(tmp_path):
    lmpo("train", TINY, "train.steps=1", f"output.dir={tmp_path}", "output.run_name=r", "output.plot=false")
    run = tmp_path / "r"
    before = files(run)
    proc = lmpo("train", "--resume", str(run), "train.steps=2", "rewards=[{name: nope}]", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "nope" in proc.stderr
    assert files(run) == before  # config.yaml included: the run can still be resumed and evaluated


def test_failed_first_start_leaves_no_folder(tmp_path):
    out = tmp_path / "out"
    proc = lmpo("train", TINY, "rewards=[{name: nope}]", f"output.dir={out}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert not out.exists()
