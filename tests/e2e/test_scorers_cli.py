"""The scorer flow from the CLI, in subprocesses: train a reward model, evaluate it, point an RL run at it, resume
the RM run; bad stage settings exit 2 with a readable error (slow: four interpreter starts)."""

from __future__ import annotations

import json

import pytest

from e2e.test_cli import lmpo

pytestmark = pytest.mark.slow


def test_train_rm_eval_then_rl_against_it(tmp_path):
    out = f"output.dir={tmp_path}"
    r = lmpo("train", "configs/tiny-rm.yaml", out, "train.steps=4", "output.checkpoint_every=2", "eval.every=2",
             "output.progress=false")
    assert "eval/accuracy" in r.stdout
    r = lmpo("train", "configs/tiny-rm.yaml", out, "train.steps=6", "output.checkpoint_every=2", "eval.every=2",
             "output.progress=false", "--resume")
    rows = [json.loads(x) for x in (tmp_path / "tiny-rm/metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == list(range(7))
    r = lmpo("eval", str(tmp_path / "tiny-rm"))
    assert 0.0 <= json.loads(r.stdout)["eval/accuracy"] <= 1.0
    r = lmpo("train", "configs/tiny.yaml", out, "output.run_name=rl", "train.steps=2", "eval.every=0",
             "output.progress=false", f"rewards=[{{name: reward_model, path: '{tmp_path / 'tiny-rm'}'}}]")
    rows = [json.loads(x) for x in (tmp_path / "rl/metrics.jsonl").read_text().splitlines()]
    assert any("reward/reward_model" in x for x in rows)


def test_bad_scorer_inputs_exit_2(tmp_path):
    r = lmpo("train", "configs/tiny-rm.yaml", f"output.dir={tmp_path}", "stage=rewardmodel", check=False)
    assert r.returncode == 2 and "reward_model" in r.stderr and "Traceback" not in r.stderr
    r = lmpo("train", "configs/tiny.yaml", f"output.dir={tmp_path}", "rewards=[{name: reward_model, path: ./nope}]",
             check=False)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "grpo-copy-seed0").exists()  # nothing written for a run that could not start
