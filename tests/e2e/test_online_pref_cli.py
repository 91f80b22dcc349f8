"""Online preference runs from the CLI, in a subprocess: train with checkpoints and the pair metrics, eval, and
compare across the online methods (their rollout modes included)."""

from __future__ import annotations

import json

import pytest

from test_cli import TINY, lmpo, metrics

pytestmark = pytest.mark.slow  # five CLI subprocesses: about 2 minutes on 2 shared cores (make test-slow)


def test_online_dpo_trains_evals_and_compares_with_spin_and_nash_md(tmp_path):
    lmpo("train", TINY, "method=online_dpo", "train.steps=2", "output.checkpoint_every=1", f"output.dir={tmp_path}",
         "output.run_name=r")
    rows = metrics(tmp_path / "r")
    assert [r["step"] for r in rows] == [0, 1, 2]
    trained = [r for r in rows if "loss/pairs" in r]
    assert trained and all(k in trained[0] for k in ("loss/pair_ties", "rewards/chosen", "rewards/margins"))
    out = json.loads(lmpo("eval", str(tmp_path / "r"), "eval.num_prompts=4").stdout)
    assert out["checkpoint"].endswith("step_000002")
    cmp = tmp_path / "cmp"
    lmpo("compare", TINY, "--methods", "online_dpo,spin,nash_md", "--seeds", "0", "--out", str(cmp),
         "train.steps=2", "eval.num_prompts=4")
    table = (cmp / "results.md").read_text()
    assert all(f"| {m} |" in table for m in ("online_dpo", "spin", "nash_md"))
