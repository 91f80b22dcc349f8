"""online_pref against TRL's online DPO (trl.experimental.online_dpo.OnlineDPOTrainer.training_step) on the same
rollouts: loss, gradient with respect to the policy's per-token log-probs, and the rewards/* metrics. The numbers
were computed once by TRL 1.16.0 (tests/peer/make_trl_online_numbers.py) into tests/data/peer/trl_online_dpo.json.
TRL pairs completion i with completion i + B of prompt i; the stored cases have no tied scores (TRL would give a tie
to the first completion, lmpo skips it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from lmpo.batch import RolloutBatch
from lmpo.methods.aggregate import SeqMeanTokenMean
from lmpo.methods.loss.online_pref import OnlinePreference
from lmpo.registry import PREFERENCE_LOSSES

DATA = json.loads((Path(__file__).parents[3] / "data" / "peer" / "trl_online_dpo.json").read_text())
F64 = torch.float64
NAMES = {"sigmoid": "dpo", "ipo": "ipo"}


def test_file_names_the_peer_and_version():
    assert DATA["peer"] == "trl" and DATA["version"] == "1.16.0"


@pytest.mark.parametrize("case", DATA["cases"], ids=lambda c: f"{c['loss_type']}-{c['seed']}")
def test_matches_trl_online_dpo(case):
    name = NAMES[case["loss_type"]]
    if name not in PREFERENCE_LOSSES:
        pytest.skip(f"preference loss {name!r} is not registered in this checkout")
    mask = torch.tensor(case["mask"]).bool()
    n = mask.shape[0]
    b = RolloutBatch(prompt_ids=torch.zeros(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1, dtype=torch.bool),
                     response_ids=torch.zeros(mask.shape, dtype=torch.long), response_mask=mask,
                     group_ids=torch.arange(n // 2).repeat(2), rewards=torch.tensor(case["rewards"], dtype=F64),
                     sampler_logprobs=torch.zeros(mask.shape, dtype=F64),
                     ref_logprobs=torch.tensor(case["ref"], dtype=F64))
    lp = torch.tensor(case["policy"], dtype=F64, requires_grad=True)
    fn = OnlinePreference(preference={"name": name, "beta": case["beta"]})
    out = fn(lp, b)
    agg = SeqMeanTokenMean()
    loss = agg(out.per_token, mask, agg.normaliser(mask, 0))
    assert loss.item() == pytest.approx(case["loss"], rel=1e-9)
    loss.backward()
    assert_close(lp.grad, torch.tensor(case["grad"], dtype=F64))
    for k, v in case["stats"].items():
        if k in out.metrics:
            assert out.metrics[k].item() == pytest.approx(v, rel=1e-6, abs=1e-7), k
