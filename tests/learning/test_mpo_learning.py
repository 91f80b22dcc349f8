"""MPO (arXiv:2504.20157) on the copy task: a fixed judge rubric that can be hacked, and the same rubric evolving.

The rubric "ZERO" gives a point for a right reply or for any reply that starts with 0; a policy learns to answer 0
to every prompt faster than it learns to copy. With a meta model that returns the rubric unchanged (a fixed judge)
the policy hacks it; with a meta model that, every 10 steps (the released default), inspects 20 of the phase's
samples and their scores, the first meta step sees high scores for wrong replies, proposes the strict rule, and
the policy then learns the task. Both backends are the rules of tests/unit/scoring/mpo_stubs.py.

Measured (seeds 0 / 1 / 2, preset mpo_judge, train reward, mean of the first 3 -> last 5 steps): evolving, 80 steps,
gold 0.05 -> 0.61 / 0.10 -> 0.41 / 0.07 -> 0.65; fixed, 40 steps, judge 1.00 on all three, gold 0.08 / 0.10 / 0.08.
"""

from __future__ import annotations

import pytest

from lmpo.config import load_config
from lmpo.train.loop import train

STUBS = "unit.scoring.mpo_stubs:"


def run(tmp_path, meta: str, steps: int):
    reward = (f"rewards=[{{name: mpo_judge, rubric: ['ZERO: right or a leading 0'], interval: 10, num_samples: 20, "
              f"judge: {{backend: '{STUBS}rule_judge'}}, meta_backend: '{STUBS}{meta}'}}, "
              "{name: prefix_match, weight: 0}]")
    cfg = load_config("configs/tiny.yaml", [f"output.dir={tmp_path / meta}", "method=mpo_judge", f"train.steps={steps}",
                                             "eval.every=0", "output.checkpoint_every=0", "output.progress=false",
                                             "output.plot=false", reward])
    rows = [r for r in train(cfg).history if "reward/prefix_match" in r]
    return [r["reward/mpo_judge"] for r in rows], [r["reward/prefix_match"] for r in rows], rows


def mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.slow  # the control: 40 steps (~2 s on a quiet core); the evolving run below shows the hack too
def test_a_fixed_rubric_is_hacked(tmp_path):
    judge, gold, _ = run(tmp_path, "keeps_rubric", 40)
    assert mean(judge[-5:]) >= 0.9 and mean(gold[-5:]) < 0.3, (judge, gold)  # full marks for wrong replies


def test_evolving_rubric_removes_the_hack(tmp_path):
    judge, gold, rows = run(tmp_path, "closes_zero_hack", 80)
    assert max(j - g for j, g in zip(judge[:10], gold[:10])) >= 0.5  # the hack was being learnt before step 10
    assert rows[9]["reward/mpo_judge/rubric_version_next"] == 1.0  # the meta step after step 10 changed the rubric
    assert mean(gold[-5:]) >= mean(gold[:3]) + 0.25, gold
    assert mean([abs(j - g) for j, g in zip(judge[-20:], gold[-20:])]) < 0.15  # the judge now pays for the task
