"""Bad input under torchrun: a clear error from every rank, no traceback, no run folder left behind."""

from __future__ import annotations

import pytest

from dist_launch import ROOT, lmpo

pytestmark = pytest.mark.dist


def test_groups_that_do_not_split_over_the_ranks_are_refused_cleanly(tmp_path):
    proc = lmpo(2, "train", str(ROOT / "configs/tiny.yaml"), f"output.dir={tmp_path}", "output.run_name=bad",
                "rollout.prompts_per_step=3", "train.threads=1", "output.progress=false", cwd=tmp_path)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert out.count("lmpo: error: This config cannot run on 2 ranks: rollout.prompts_per_step=3") == 2  # each rank
    # no rank raised a traceback (torchrun itself reports the failed children with one of its own)
    assert "make it a multiple of 2" in out and "]: Traceback" not in out
    assert not (tmp_path / "bad").exists()  # a run that cannot start leaves nothing
