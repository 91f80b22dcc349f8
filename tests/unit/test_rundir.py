"""Run-folder safety (lmpo.train.rundir): one writer per folder, nothing written before the run validates,
finished runs left alone, stale temporaries removed, no run silently replaced."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmpo.config import load_config
from lmpo.errors import LmpoError
from lmpo.train.loop import train
from lmpo.train.rundir import LOCK_NAME, RunFolder, RunFolderBusy

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
QUIET = ["output.progress=false", "output.plot=false", "eval.num_prompts=4", "eval.every=0"]


def cfg(out: Path, *overrides, steps=1):
    return load_config(TINY, [f"output.dir={out}", "output.run_name=r", f"train.steps={steps}", *QUIET, *overrides])


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file's bytes except the lock file (which records the pid of whoever last held it)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}


HOLDER = textwrap.dedent("""
    import sys, time
    from lmpo.train.rundir import RunFolder
    RunFolder(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def test_second_process_is_refused_with_holder_pid_and_kill9_releases(tmp_path):
    run = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderBusy, match=rf"in use by another lmpo process \(pid {holder.pid}\)"):
            RunFolder(run).plan(resume=False, overwrite=False, steps=1)
        with pytest.raises(RunFolderBusy, match=str(holder.pid)):  # train() fails at once, before building anything
            train(cfg(tmp_path))
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs in the holder
        holder.wait()
    folder = RunFolder(run)
    folder.plan(resume=False, overwrite=False, steps=1)  # the kernel released the lock with the process
    folder.release()


def test_lock_is_released_when_train_returns_or_fails(tmp_path):
    train(cfg(tmp_path))
    with pytest.raises(LmpoError, match="already holds checkpoints"):
        train(cfg(tmp_path))
    with RunFolder(tmp_path / "r") as folder:  # neither call left the lock held
        folder.acquire()


def test_failed_first_start_leaves_no_folder(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(LmpoError, match="nope"):  # an unknown reward: fails while building, before any write
        train(cfg(out, "rewards=[{name: nope}]"))
    assert not out.exists()
    # a reward function that raises during the evaluation before training: the folder was created, then removed
    with pytest.raises(LmpoError, match="raises"):
        train(cfg(out, "rewards=[{name: 'e2e.bad_rewards:raises'}]"))
    assert not out.exists()


@pytest.mark.parametrize("bad", ["rewards=[{name: nope}]", "model.lora.enabled=true"])
def test_failed_resume_with_bad_override_leaves_run_byte_identical(tmp_path, bad):
    train(cfg(tmp_path))
    run = tmp_path / "r"
    before = snapshot(run)
    # model.lora.enabled=true validates as a config but the checkpoint (full fine-tuning) does not fit the model
    with pytest.raises(LmpoError):
        train(load_config(str(run / "config.yaml"), ["train.steps=2", bad]), resume=True)
    assert snapshot(run) == before


def test_finished_run_resume_changes_nothing(tmp_path, capsys):
    first = train(cfg(tmp_path, steps=2))
    run = tmp_path / "r"
    before = snapshot(run)
    again = train(cfg(tmp_path, steps=2), resume=True)
    assert "already finished" in capsys.readouterr().err
    assert snapshot(run) == before
    assert again.steps == 2 and again.eval_after == first.eval_after and again.eval_before == first.eval_before
    with pytest.raises(LmpoError, match="past train.steps=1"):  # a run cannot be shortened
        train(cfg(tmp_path, steps=1), resume=True)
    assert snapshot(run) == before


def test_summary_is_rebuilt_when_missing_from_a_finished_run(tmp_path):
    first = train(cfg(tmp_path, steps=2))
    run = tmp_path / "r"
    (run / "summary.json").unlink()  # killed between its last checkpoint and its summary
    again = train(cfg(tmp_path, steps=2), resume=True)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["eval_after"] == first.eval_after == again.eval_after
    assert summary["eval_before"] == first.eval_before


def test_resume_extends_a_finished_run_and_removes_stale_temporaries(tmp_path):
    train(cfg(tmp_path, steps=1))
    run = tmp_path / "r"
    stale = run / "checkpoints" / ".tmp-step_000002-99999"  # a checkpoint write killed midway
    stale.mkdir()
    (stale / "model.pt").write_bytes(b"half")
    (run / "checkpoints" / ".latest.tmp-99999").write_text("step_000002")
    (run / ".summary.json.tmp-99999").write_text("{")
    result = train(cfg(tmp_path, steps=2), resume=True)
    assert result.steps == 2
    assert not stale.exists() and not list(run.glob("checkpoints/.*tmp*")) and not list(run.glob(".*.tmp-*"))
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert [r["step"] for r in result.history] == [0, 1, 2]


def test_metrics_without_checkpoint_are_not_replaced_silently(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    rows = '{"step": 0, "eval/accuracy": 0.0}\n{"step": 1, "reward/mean": 0.5}\n{"step": 2, "reward/mean": 0.6}\n'
    (run / "metrics.jsonl").write_text(rows)
    with pytest.raises(LmpoError, match=r"2 training steps .*no checkpoint.*--overwrite"):
        train(cfg(tmp_path))
    assert (run / "metrics.jsonl").read_text() == rows
    with pytest.raises(LmpoError, match="stopped before its first checkpoint.*--overwrite"):
        train(cfg(tmp_path), resume=True)
    result = train(cfg(tmp_path), overwrite=True)
    assert [r["step"] for r in result.history] == [0, 1]


def test_only_a_pre_training_evaluation_may_be_replaced(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0, "eval/accuracy": 0.0}\n')  # reproducible: nothing is lost
    assert [r["step"] for r in train(cfg(tmp_path)).history] == [0, 1]


def test_overwrite_clears_the_previous_run(tmp_path):
    train(cfg(tmp_path, "output.checkpoint_every=1", steps=2))
    run = tmp_path / "r"
    assert (run / "checkpoints" / "step_000002").is_dir()
    result = train(cfg(tmp_path, steps=1), overwrite=True)
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000001"]
    assert [r["step"] for r in result.history] == [0, 1]
    assert json.loads((run / "summary.json").read_text())["steps"] == 1


def test_output_dir_that_is_a_file_is_a_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LmpoError, match="is a file, not a folder"):
        train(cfg(blocker / "runs"))
