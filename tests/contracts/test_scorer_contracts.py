"""Contracts of the learned scorers (every reward with a ``pop_metrics``: reward models, PRMs, judges, ensembles):
one finite float per sample, each sample scored independently of the others in its batch (so permuting the batch
permutes the scores, and scoring one by one equals scoring batched, failures aside: those take their group's mean), failure counts as plain floats. A new scorer
joins by adding its tiny configuration to SCORERS; test_every_scorer_is_covered fails until it does."""

from __future__ import annotations

import math

import pytest

import lmpo.methods  # noqa: F401  (cgpo_reward is registered next to its advantage)
import lmpo.rewards  # noqa: F401
from lmpo.registry import REWARDS

SCORERS = {
    "reward_model": {"path": "tiny", "batch_size": 3},
    "process_reward_model": {"path": "tiny", "separator": " ", "batch_size": 3},
    "judge": {"model": "tiny", "template": "{prompt}{completion}=", "parse": "number", "max_score": 1000,
              "max_new_tokens": 3, "batch_size": 3},
    "polar": {"path": "tiny", "batch_size": 2},
    "cappy": {"path": "tiny", "batch_size": 2},
    "cgpo_reward": {"rm": {"name": "reward_model", "path": "tiny"}, "judges": [{"name": "prefix_match"}]},
    "caprl": {"backend": "unit.scoring.stubs:reads_first_digit", "batch_size": 2},
    "mpo_judge": {"rubric": ["ZERO: right or a leading 0", "RIGHT"], "judge": {"backend": "unit.scoring.mpo_stubs:rule_judge"},
                  "meta_backend": "unit.scoring.mpo_stubs:closes_zero_hack"},
    "rm_ensemble": {"members": [{"name": "reward_model", "path": "tiny:1"}, {"name": "reward_model", "path": "tiny:2"},
                                {"name": "prefix_match"}], "combine": "uwo"},
}
PROMPTS = ["1=", "23=", "1=", "4=", "56="]
REPLIES = ["1", "2 3", "7 ", "", "56 6"]
ANSWERS = ["1", "23", "1", "4", "56"]


def test_every_scorer_is_covered():
    scorers = {e.name for e in REWARDS.entries() if hasattr(e.obj, "pop_metrics")}
    assert scorers == set(SCORERS), scorers ^ set(SCORERS)


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_scorer_contract(name):
    fn = REWARDS.build(name, where="rewards[0]", **SCORERS[name])
    extra = {"questions": [[{"question": "q", "options": list("0123456789"), "answer": a[0]}] for a in ANSWERS]}
    out = fn(prompts=PROMPTS, completions=REPLIES, answer=ANSWERS, **extra)
    failed = fn.pop_metrics().get("failures", 0.0)
    assert isinstance(out, list) and len(out) == len(PROMPTS) and all(math.isfinite(v) for v in out), out
    perm = [3, 0, 4, 1, 2]
    permuted = fn(prompts=[PROMPTS[i] for i in perm], completions=[REPLIES[i] for i in perm],
                  answer=[ANSWERS[i] for i in perm], questions=[extra["questions"][i] for i in perm])
    assert permuted == pytest.approx([out[i] for i in perm], abs=1e-5)
    if not failed:  # a masked failure takes its group's mean, which depends on the batch by design
        one_by_one = [fn(prompts=[p], completions=[c], answer=[a], questions=[q])[0]
                      for p, c, a, q in zip(PROMPTS, REPLIES, ANSWERS, extra["questions"])]
        assert one_by_one == pytest.approx(out, abs=1e-5)
    if name == "judge":  # the verdicts themselves never depend on the batch (left padding, attention mask)
        texts = [fn._judge_text(p, c, {}) for p, c in zip(PROMPTS, REPLIES)]
        assert fn.verdicts(texts) == [fn.verdicts([t])[0] for t in texts]
    metrics = fn.pop_metrics()
    assert all(isinstance(k, str) and isinstance(v, float) for k, v in metrics.items()), metrics
