"""Sharded checkpoints (torch.distributed.checkpoint) of a 2-rank run: the round trip, exact resume, resuming on
another number of ranks, evaluating one, and a killed rank (the run fails at once and resumes from its last
checkpoint). Each run is ``torchrun -m lmpo train configs/tiny.yaml`` (gloo, 2 CPU processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from dist_launch import ROOT, env, lmpo, torchrun

pytestmark = pytest.mark.dist

CFG = str(ROOT / "configs/tiny.yaml")
QUIET = ["eval.num_prompts=0", "output.progress=false", "output.plot=false", "train.threads=1",
         "output.checkpoint_every=2", "output.keep_checkpoints=5"]


def train(nproc: int, out: Path, name: str, steps: int, *extra: str, timeout: float = 240):
    proc = lmpo(nproc, "train", CFG, f"output.dir={out}", f"output.run_name={name}", f"train.steps={steps}", *QUIET,
                *extra, cwd=out, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return out / name


def rows(run: Path) -> dict[int, dict]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = {k: v for k, v in row.items() if not k.startswith("perf/")}
    return out


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from lmpo.models.load import load_model
    from lmpo.train import dist_checkpoint

    model, _ = load_model("tiny", seed=123)  # other initial weights: everything compared comes from the checkpoint
    dist_checkpoint.load(ckpt, model, None, None, None)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    whole = train(2, out, "whole", 4)
    half = train(2, out, "half", 2)
    resumed = train(2, out, "half", 4, "--resume")
    return out, whole, resumed


def test_sharded_checkpoint_layout_and_rank0_only_files(runs):
    _, whole, _ = runs
    ckpt = whole / "checkpoints" / "step_000004"
    assert (whole / "checkpoints" / "latest").read_text().strip() == "step_000004"
    assert {p.name for p in ckpt.iterdir()} == {"sharded", "state.pt", "rng_rank0.pt", "rng_rank1.pt"}
    assert (ckpt / "sharded" / ".metadata").is_file()
    # strategy auto = fsdp2 for the tiny Llama: each rank wrote its own shards of the weights and AdamW states
    assert all((ckpt / "sharded" / f"__{r}_0.distcp").stat().st_size > 1000 for r in (0, 1))
    assert not list((whole / "checkpoints").glob(".tmp-*"))  # moved into place, nothing left half-written
    assert [r for r in rows(whole)] == [1, 2, 3, 4]  # one metrics row per step: rank 0 alone writes
    a = torch.load(ckpt / "rng_rank0.pt", weights_only=False)["torch"]
    b = torch.load(ckpt / "rng_rank1.pt", weights_only=False)["torch"]
    assert not torch.equal(a, b)  # each rank samples from its own stream


def test_resume_on_two_ranks_equals_the_uninterrupted_run(runs):
    _, whole, resumed = runs
    assert rows(resumed) == rows(whole)  # steps 3-4 after the restart: the same rollouts, losses and rewards
    w, r = weights(whole / "checkpoints/step_000004"), weights(resumed / "checkpoints/step_000004")
    assert w.keys() == r.keys()
    for name in w:
        assert torch.equal(w[name], r[name]), name
    first = weights(whole / "checkpoints/step_000002")
    assert any(not torch.equal(first[n], w[n]) for n in w)  # steps 3-4 trained


def test_resume_on_another_number_of_ranks_and_eval(runs):
    out, whole, _ = runs
    import shutil

    one = out / "one"
    shutil.copytree(whole, one)
    train(1, out, "one", 6, "--resume")  # 2-rank checkpoint -> one process (DCP reshards the states)
    assert (one / "checkpoints/latest").read_text().strip() == "step_000006"
    assert (one / "checkpoints/step_000006/model.pt").is_file()  # a single process writes its own format
    assert sorted(rows(one)) == [1, 2, 3, 4, 5, 6]
    # that single-process checkpoint -> 2 ranks again, with FSDP2 (each rank keeps its shards of the whole tensors)
    # and with DDP: the same continuation (AdamW's states restored in both, not restarted)
    shutil.copytree(one, out / "one-ddp")
    train(2, out, "one", 8, "--resume")
    train(2, out, "one-ddp", 8, "train.dist.strategy=ddp", "--resume")
    assert (one / "checkpoints/step_000008/sharded").is_dir() and sorted(rows(one))[-1] == 8
    a, b = rows(one), rows(out / "one-ddp")
    for step in (7, 8):
        assert a[step].keys() == b[step].keys()
        assert a[step] == pytest.approx(b[step], rel=1e-4, abs=1e-6), step

    from lmpo.config import load_config
    from lmpo.train.loop import evaluate_run

    cfg = load_config(str(one / "config.yaml"), ["eval.num_prompts=4", "train.threads=1"])
    got = evaluate_run(cfg, run_dir=one)  # a sharded checkpoint, read in one process
    assert got["checkpoint"].endswith("step_000008") and 0.0 <= got["eval/accuracy"] <= 1.0


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(x) for x in (task / "children").read_text().split()]
    return kids


def _rank_of(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"RANK=")), None)


def test_killed_rank_fails_the_run_cleanly_and_it_resumes(tmp_path):
    run = tmp_path / "killed"
    cmd = torchrun(2, "-m", "lmpo", "train", CFG, f"output.dir={tmp_path}", "output.run_name=killed",
                   "train.steps=400", "train.dist.timeout_s=60", *QUIET)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (run / "checkpoints/latest").is_file():  # the first checkpoint is written
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.2)
        rank1 = next(p for p in _children(proc.pid) if _rank_of(p) == "1")
        os.kill(rank1, signal.SIGKILL)
        t0 = time.monotonic()
        output, _ = proc.communicate(timeout=120)  # no hang: the launcher stops the other rank and fails
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0 and time.monotonic() - t0 < 120
    assert "step_000400" not in os.listdir(run / "checkpoints")
    last = int((run / "checkpoints/latest").read_text().strip().removeprefix("step_"))
    assert last >= 2 and last % 2 == 0
    train(2, tmp_path, "killed", last + 2, "train.dist.timeout_s=60", "--resume")
    assert (run / "checkpoints/latest").read_text().strip() == f"step_{last + 2:06d}"
    assert sorted(rows(run))[-3:] == [last, last + 1, last + 2]
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_ray_placement_runs_the_tiny_task_as_torchrun_does(runs):
    """train.dist.placement=ray: one controller, 2 rank actors on a local Ray cluster; the same run as torchrun's."""
    pytest.importorskip("ray")
    out, whole, _ = runs
    proc = lmpo(1, "train", CFG, f"output.dir={out}", "output.run_name=ray", "train.steps=4", *QUIET,
                "train.dist.placement=ray", "train.dist.world_size=2", cwd=out, timeout=400)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    run = out / "ray"
    assert {p.name for p in (run / "checkpoints/step_000004").iterdir()} == {"sharded", "state.pt", "rng_rank0.pt",
                                                                             "rng_rank1.pt"}
    assert rows(run) == rows(whole)  # the same rollouts, losses and rewards at every step
    w, r = weights(whole / "checkpoints/step_000004"), weights(run / "checkpoints/step_000004")
    assert all(torch.equal(w[n], r[n]) for n in w)
