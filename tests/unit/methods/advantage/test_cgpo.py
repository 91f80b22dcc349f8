"""CGPO's CRPG (arXiv:2409.20370): the card's worked example (calibrated reward, judges, coefficients), the KL
gate by hand, a loop reference, the gradient of the REINFORCE surrogate on these advantages, the judged reward."""

from __future__ import annotations

import math

import pytest
import torch

from factories import from_config, make_batch
from lmpo.errors import RewardError
from lmpo.methods.advantage.cgpo import CGPOReward, CRPGAdvantage, crpg_coefficients
from lmpo.registry import REWARDS

sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731


def test_card_worked_example():
    # RM rewards (2, 0), baseline reward 0, judges (1, 1), KL 0: w = (sigmoid(2), sigmoid(0)) = (0.8808, 0.5),
    # coefficients w - mean = (+0.1904, -0.1904)
    w = torch.tensor([sig(2.0), sig(0.0)])
    assert crpg_coefficients(w, torch.zeros(2), 1.0).tolist() == pytest.approx([0.1904, -0.1904], abs=1e-4)
    # the first judge flips to 0: w = (0, 0.5) -> (-0.25, +0.25): the high-RM violating sample is pushed down
    assert crpg_coefficients(torch.tensor([0.0, 0.5]), None, None).tolist() == pytest.approx([-0.25, 0.25])


def test_kl_budget_gates_the_weight_by_hand():
    # w = (1, 1, 1), KL = (0, 0.5, 2) with KL_max 1: gates (1, 0.5, 0) -> w (1, 0.5, 0), mean 0.5
    assert crpg_coefficients(torch.ones(3), torch.tensor([0.0, 0.5, 2.0]), 1.0).tolist() == pytest.approx([0.5, 0.0, -0.5])


def test_advantage_against_a_loop_reference_with_kl():
    g = torch.Generator().manual_seed(0)
    b = make_batch(torch.rand(6, generator=g), [0, 0, 0, 1, 1, 1], [3, 2, 4, 1, 4, 2], T=4)
    b.old_logprobs = -torch.rand(6, 4, generator=g)
    b.ref_logprobs = -torch.rand(6, 4, generator=g)
    adv = from_config(CRPGAdvantage, kl_max=0.8)(b)
    ws = []
    for i in range(6):
        kl = sum(float(b.old_logprobs[i, t] - b.ref_logprobs[i, t]) for t in range(4) if b.response_mask[i, t])
        ws.append(float(b.rewards[i]) * max(0.0, 1 - kl / 0.8))
    mean = sum(ws) / 6
    for i in range(6):
        for t in range(4):
            want = ws[i] - mean if b.response_mask[i, t] else 0.0
            assert adv[i, t].item() == pytest.approx(want, abs=1e-5)
    assert from_config(CRPGAdvantage).needs == frozenset() and "ref_logprobs" in from_config(CRPGAdvantage, kl_max=1.0).needs


def test_gradient_of_the_surrogate():
    # REINFORCE on A: d/dlogp_{i,t} of -sum(A * logp) / n_tokens = -A_i / n_tokens
    b = make_batch([1.0, 0.0], [0, 0], [2, 1], T=2)
    adv = from_config(CRPGAdvantage)(b)
    logp = torch.zeros(2, 2, requires_grad=True)
    (-(adv * logp).sum() / b.response_mask.sum()).backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-0.5 / 3, -0.5 / 3, 0.5 / 3, 0.0])


def test_judged_calibrated_reward():
    m = "unit.scoring.stubs:"
    r = REWARDS.build("cgpo_reward", where="rewards[0]", rm=m + "length_score", judges=[m + "first_digit"],
                      judge_threshold=1.0)
    # rm = reply length, baseline "12" has length 2: "123" -> sigmoid(1); "1" -> sigmoid(-1); "0x" fails the judge
    assert r(["p"] * 3, ["123", "1", "0x"], answer=["12"] * 3) == pytest.approx([sig(1), sig(-1), 0.0])
    assert r.pop_metrics() == {"violations": 1.0}
    with pytest.raises(RewardError, match='"answer" column'):
        r(["p"], ["1"])
    assert isinstance(r, CGPOReward)
