"""lmpo.train.loop.drive: the outer step loop the RL, preference and scorer stages share (on a fake run)."""

from types import SimpleNamespace

import pytest

from lmpo.errors import TrainingDiverged
from lmpo.train.loop import drive


class FakeLog:
    def __init__(self):
        self.rows = []

    def write(self, step, metrics):
        row = {"step": step, **metrics}
        self.rows.append(row)
        return row


class FakeRun:
    def __init__(self, tmp_path, steps=5, at_start=True, eval_every=2, ckpt_every=3, start=0):
        self.cfg = SimpleNamespace(train=SimpleNamespace(steps=steps),
                                   eval=SimpleNamespace(at_start=at_start, every=eval_every),
                                   output=SimpleNamespace(checkpoint_every=ckpt_every, progress=False))
        self.start, self.eval_before, self.log, self.dir = start, {}, FakeLog(), tmp_path
        self.calls = []

    def evaluate(self):
        self.calls.append("eval")
        return {"eval/acc": float(len(self.calls))}

    def checkpoint(self, step):
        self.calls.append(f"ckpt{step}")


def test_rows_evaluations_checkpoints_and_hooks(tmp_path):
    run = FakeRun(tmp_path)
    out = drive(run, lambda s: run.calls.append(f"step{s}") or {"loss": float(s)}, stats={"data/n": 7},
                before=lambda: run.calls.append("before"), after_step=lambda s: run.calls.append(f"after{s}"),
                close=lambda: run.calls.append("close"))
    # eval at start; eval every 2 and at the last step; checkpoint every 3 and at the last step
    assert run.calls == ["eval", "before", "step1", "after1", "step2", "eval", "after2", "step3", "ckpt3", "after3",
                         "step4", "eval", "after4", "step5", "eval", "ckpt5", "after5", "close"]
    assert run.log.rows[0] == {"step": 0, "data/n": 7, "eval/acc": 1.0}
    assert [r["step"] for r in run.log.rows] == [0, 1, 2, 3, 4, 5]
    assert run.log.rows[2] == {"step": 2, "loss": 2.0, "eval/acc": 6.0}
    assert run.eval_before == {"eval/acc": 1.0} and out == {"eval/acc": 15.0}  # the 15th call


def test_row_zero_rules_and_nothing_to_evaluate(tmp_path):
    run = FakeRun(tmp_path, steps=2, at_start=False)  # stats_alone: the counts without an evaluation
    drive(run, lambda s: {}, stats={"data/n": 3}, stats_alone=True)
    assert run.log.rows[0] == {"step": 0, "data/n": 3}
    run = FakeRun(tmp_path, steps=2)  # evaluates=False: no evaluation, no row 0, no eval metrics
    assert drive(run, lambda s: {"loss": 1.0}, evaluates=False, stats={"data/n": 3}) == {}
    assert run.calls == ["ckpt2"] and [r["step"] for r in run.log.rows] == [1, 2]
    run = FakeRun(tmp_path, steps=4, start=2)  # resumed: no evaluation at start, steps 3..4
    run.eval_before = {"eval/acc": 0.5}
    assert drive(run, lambda s: {}, evaluates=False) == {"eval/acc": 0.5}
    assert [r["step"] for r in run.log.rows] == [3, 4]


def test_diverged_names_the_last_good_step_and_closes(tmp_path):
    run = FakeRun(tmp_path, steps=5, at_start=False)

    def step(s):
        if s == 3:
            raise TrainingDiverged("loss is nan")
        return {}

    with pytest.raises(TrainingDiverged, match=r"loss is nan \(Last completed step: 2; no checkpoint had been "
                                                r"written yet\.\)"):
        drive(run, step, close=lambda: run.calls.append("close"))
    assert run.calls[-1] == "close"
