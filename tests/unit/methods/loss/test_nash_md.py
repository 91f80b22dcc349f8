"""Nash-MD-PG (arXiv:2312.00886): -(P(y ≻ opponent) - 1/2) log pi + tau sg(log pi - log mu) log pi on policy rows;
opponents from the token-level geometric mixture (rollout.mode mixture)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.config import load_config
from lmpo.errors import ConfigError
from lmpo.methods.aggregate import SeqMeanTokenSum
from lmpo.methods.loss.nash_md import NashMDLoss
from lmpo.models import build_tiny_model
from lmpo.models.tiny import build_tiny_tokenizer
from lmpo.pipeline import build_pipeline
from lmpo.rollout.base import SamplingParams
from lmpo.rollout.mixture import mixed_logits
from lmpo.rollout.modes import build_train_generator
from factories import from_config, make_batch, random_mask

F64 = torch.float64


def batch(rewards, groups, mask, ref, opponent):
    b = make_batch(rewards, groups, mask, advantages=torch.zeros(mask.shape), dtype=F64)
    return b.replace(ref_logprobs=ref, extras={"opponent": torch.tensor(opponent, dtype=torch.float32)})


def agg_loss(fn, lp, b):
    agg = SeqMeanTokenSum()
    m = b.response_mask & (b.extras["opponent"] == 0)[:, None]  # the mixture mode leaves opponents untrained
    return agg(fn(lp, b).per_token, m, agg.normaliser(m, 0))


def test_hand_case():
    # One group: policy row 0 (reward 1), opponent row 1 (reward 0); temperature 1: P = sigmoid(1) = 0.731059.
    # tau = 0.1, log pi(y0) = [-0.5, -1.0], log mu(y0) = [-0.7, -0.6] -> kl = [0.2, -0.4].
    # loss = sum_t [-(P - 1/2) lp_t + tau kl_t lp_t] = -(0.231059)(-1.5) + 0.1 (0.2 * -0.5 + -0.4 * -1.0)
    #      = 0.346589 + 0.03 = 0.376589; d/d lp_t = -(P - 1/2) + tau kl_t = [-0.211059, -0.271059]; opponent: 0.
    P = 1 / (1 + math.exp(-1))
    mask = torch.ones(2, 2, dtype=torch.bool)
    ref = torch.tensor([[-0.7, -0.6], [-1.0, -1.0]], dtype=F64)
    lp = torch.tensor([[-0.5, -1.0], [-2.0, -0.3]], dtype=F64, requires_grad=True)
    loss = agg_loss(from_config(NashMDLoss, tau=0.1), lp, batch([1.0, 0.0], [0, 0], mask, ref, [0, 1]))
    assert loss.item() == pytest.approx(-(P - 0.5) * -1.5 + 0.03)
    loss.backward()
    assert_close(lp.grad, torch.tensor([[-(P - 0.5) + 0.02, -(P - 0.5) - 0.04], [0.0, 0.0]], dtype=F64))


def test_card_equal_preferences_at_the_reference_give_zero_gradient():
    # P = 1/2 for every pair (equal rewards) and pi = mu: both terms vanish.
    g = torch.Generator().manual_seed(0)
    mask = random_mask(g, 4, 3)
    ref = -torch.rand(4, 3, generator=g, dtype=F64) * mask
    lp = ref.clone().requires_grad_(True)
    agg_loss(from_config(NashMDLoss), lp, batch([0.3] * 4, [0, 0, 1, 1], mask, ref, [0, 1, 0, 1])).backward()
    assert torch.all(lp.grad == 0)


def test_win_rate_is_the_mean_over_the_groups_opponents_and_analytic_gradient():
    g = torch.Generator().manual_seed(1)
    mask = random_mask(g, 5, 3)
    ref = -torch.rand(5, 3, generator=g, dtype=F64) * mask
    r = [1.0, 0.0, 0.5, 2.0, 0.0]
    b = batch(r, [0, 0, 0, 0, 0], mask, ref, [0, 0, 1, 1, 0])
    sig = lambda x: 1 / (1 + math.exp(-x / 0.5))  # noqa: E731
    P = {i: sum(sig(r[i] - r[j]) for j in (2, 3)) / 2 for i in (0, 1, 4)}
    out = from_config(NashMDLoss, temperature=0.5)(torch.zeros(5, 3, dtype=F64), b)
    assert out.metrics["loss/win_rate"].item() == pytest.approx(sum(P.values()) / 3)
    # the KL term is a stop-gradient surrogate (its value is not the objective), so the gradient is checked against
    # the update it must produce: d/d lp_t = (-(P_i - 1/2) + tau (lp_t - ref_t)) / 3 on the 3 policy rows, 0 else
    x = (-torch.rand(5, 3, generator=g, dtype=F64) * mask).requires_grad_(True)
    agg_loss(from_config(NashMDLoss, tau=0.2, temperature=0.5), x, b).backward()
    expect = torch.zeros(5, 3, dtype=F64)
    for i in (0, 1, 4):
        expect[i] = (-(P[i] - 0.5) + 0.2 * (x[i].detach() - ref[i])) / 3 * mask[i]
    assert_close(x.grad, expect)


def test_card_geometric_mixture_worked_example():
    # logits_theta = [2, 0], logits_mu = [0, 0], beta = 0.5 -> mixed [1, 0] -> probs [0.731, 0.269]
    z = mixed_logits(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]), 0.5)
    assert_close(torch.softmax(z, -1), torch.tensor([0.731059, 0.268941]), atol=1e-6, rtol=0)
    assert_close(mixed_logits(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]), 1.0), torch.tensor([0.0, 1.0]))


def test_mixture_mode_lays_out_policy_rows_and_untrained_opponents():
    model, tok = build_tiny_model(seed=0), build_tiny_tokenizer()
    gen = build_train_generator("mixture", {"mixture_coef": 1.0}, model, tok)  # opponents from the reference alone
    r1, r2 = {"prompt": "1="}, {"prompt": "2="}
    torch.manual_seed(0)
    out = gen.generate(["1=", "1=", "1=", "2=", "2="], SamplingParams(max_new_tokens=3), rows=[r1, r1, r1, r2, r2])
    assert out.extras["opponent"].tolist() == [0.0, 0.0, 1.0, 0.0, 1.0]
    assert not out.batch_fields["response_mask"][[2, 4]].any() and out.batch_fields["response_mask"][[0, 1, 3]].any()
    with pytest.raises(ConfigError, match="mixture_coef must be in"):
        load_config(None, ["rollout.mode=mixture", "rollout.mode_params={mixture_coef: 1.5}"])
    with pytest.raises(ConfigError, match="Set rollout.mode=mixture"):
        build_pipeline(load_config("configs/tiny.yaml", ["method=grpo", "loss={name: nash_md}"]))
