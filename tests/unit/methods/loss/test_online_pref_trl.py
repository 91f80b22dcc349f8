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

DATA = json.loads((Path(__file__).parents[3] / "data" / "peer" / "trl_online_dpo.json").read_text())
F64 = torch.float64


def test_file_names_the_peer_and_version():
    assert DATA["peer"] == "trl" and DATA["version"] == "1.16.0"


def test_trl_online_ipo_uses_summed_log_ratios():
    # TRL's online IPO is (h - 1/(2 beta))^2 on *summed* log-ratios, whereas TRL's DPOTrainer IPO (and lmpo's ipo)
    # token-average them; so online_pref + ipo is not compared with it. This pins what TRL's number is.
    case = next(c for c in DATA["cases"] if c["loss_type"] == "ipo")
    mask = torch.tensor(case["mask"]).bool()
    h = ((torch.tensor(case["policy"], dtype=F64) - torch.tensor(case["ref"], dtype=F64)) * mask).sum(-1)
    r = torch.tensor(case["rewards"], dtype=F64)
    B = len(r) // 2
    first = r[:B] >= r[B:]
    margin = torch.where(first, h[:B] - h[B:], h[B:] - h[:B])
    assert ((margin - 1 / (2 * case["beta"])) ** 2).mean().item() == pytest.approx(case["loss"], rel=1e-9)


@pytest.mark.parametrize("case", [c for c in DATA["cases"] if c["loss_type"] == "sigmoid"], ids=lambda c: str(c["seed"]))
def test_matches_trl_online_dpo(case):
    name = "dpo"
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
