"""REAL (arXiv:2602.05630): L_q = log(1 + sum_{O+} e^{-s/tau}) + log(1 + sum_{O-} e^{s/tau}),
s_i = token-mean log(pi/pi_old); each trained token of a row carries its group's L_q."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.aggregate import SeqMeanTokenMean
from lmpo.methods.loss.real import REALLoss
from factories import from_config, make_batch, random_groups, random_mask

F64 = torch.float64


def batch(rewards, groups, mask, old):
    return make_batch(rewards, groups, mask, advantages=torch.zeros(mask.shape), old_logprobs=old, dtype=F64)


def agg_loss(loss_fn, lp, b):
    agg = SeqMeanTokenMean()
    mask = b.response_mask
    return agg(loss_fn(lp, b).per_token, mask, agg.normaliser(mask, 0))


def test_hand_card_case():
    # rewards [1, 1, 0, 0], logp = old (all s = 0), tau = 0.5:
    #   L = log(1 + 2 e^0) + log(1 + 2 e^0) = 2 ln 3 = 2.19722 on every trained token.
    #   dL/ds_pos = -(1/tau) e^0 / (1 + 2) = -2/3, dL/ds_neg = +2/3.
    # A second group [1, 1, 1, 1] is dropped: loss 0, gradient 0.
    # seq_mean_token_mean over N_rows = 8: loss = 4 L / 8 = L / 2 (= mean over the 2 prompts);
    #   d/d logp_{k,t} = (1/8) * 4 * dL/ds_k * (1/|o_k|) = dL/ds_k / (2 |o_k|).
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]] * 2, dtype=torch.bool)
    old = -torch.rand(8, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    b = batch([1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0], [0, 0, 0, 0, 1, 1, 1, 1], mask, old)
    lp = old.clone().requires_grad_(True)
    out = REALLoss(tau=0.5)(lp, b)
    L = 2 * math.log(3)
    expect = torch.where(mask, torch.tensor([L] * 4 + [0.0] * 4, dtype=F64)[:, None], torch.zeros((), dtype=F64))
    assert_close(out.per_token, expect)
    loss = agg_loss(REALLoss(tau=0.5), lp, b)
    assert loss.item() == pytest.approx(L / 2)
    loss.backward()
    lengths = mask.sum(-1).to(F64)
    dLds = torch.tensor([-2 / 3, -2 / 3, 2 / 3, 2 / 3, 0, 0, 0, 0], dtype=F64)
    assert_close(lp.grad, torch.where(mask, (dLds / (2 * lengths))[:, None], torch.zeros((), dtype=F64)))
    assert out.metrics["loss/valid_frac"].item() == pytest.approx(0.5)


def test_hand_bce_variant():
    # s = [ln 2 (pos), 0 (neg)], tau = 1: BCE = softplus(-ln 2) = ln(1.5), softplus(0) = ln 2.
    mask = torch.ones(2, 1, dtype=torch.bool)
    old = torch.zeros(2, 1, dtype=F64)
    lp = torch.tensor([[math.log(2)], [0.0]], dtype=F64)
    out = REALLoss(tau=1.0, variant="bce")(lp, batch([1.0, 0.0], [3, 3], mask, old))
    assert_close(out.per_token, torch.tensor([[math.log(1.5)], [math.log(2)]], dtype=F64))


def test_hand_bce_mean_over_valid_rollouts_issue21():
    # Issue 21: the released BCE variant averages over the rollouts of valid groups only.
    # Group 0 = [pos s = ln 2, neg s = 0] (valid); group 1 = [pos, pos] (dropped); tau = 1.
    #   official loss = (ln 1.5 + ln 2) / 2 valid rollouts = ln(3) / 2 = 0.549306 (old: / 4 rows = 0.274653)
    #   gradient on the pos row: d softplus(-s)/ds / 2 = -sigmoid(-ln 2) / 2 = -(1/3)/2 = -1/6;
    #   neg row: sigmoid(0) / 2 = 1/4; dropped rows 0.
    mask = torch.ones(4, 1, dtype=torch.bool)
    old = torch.zeros(4, 1, dtype=F64)
    lp = torch.tensor([[math.log(2)], [0.0], [0.3], [-0.2]], dtype=F64).requires_grad_(True)
    b = batch([1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1], mask, old)
    loss = agg_loss(REALLoss(tau=1.0, variant="bce"), lp, b)
    assert loss.item() == pytest.approx(math.log(3) / 2, rel=1e-12)
    loss.backward()
    assert_close(lp.grad, torch.tensor([[-1 / 6], [1 / 4], [0.0], [0.0]], dtype=F64))


def random_case(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    groups = random_groups(g)
    B = groups.numel()
    T = int(torch.randint(1, 6, (1,), generator=g))
    mask = random_mask(g, B, T)
    rewards = torch.randint(0, 2, (B,), generator=g).to(F64)
    old = -torch.rand(B, T, generator=g, dtype=F64) * 2
    lp = old + torch.randn(B, T, generator=g, dtype=F64) * scale
    return batch(rewards, groups, mask, old), lp


def loop_real(b, lp, tau, variant):
    mask, old = b.response_mask.tolist(), b.old_logprobs.tolist()
    B, T = len(mask), len(mask[0])
    s = []
    for i in range(B):
        toks = [t for t in range(T) if mask[i][t]]
        s.append(sum(lp[i][t] - old[i][t] for t in toks) / len(toks))
    g, r = b.group_ids.tolist(), b.rewards.tolist()
    out = [[0.0] * T for _ in range(B)]
    valid = [any(g[j] == g[i] and r[j] > 0.5 for j in range(B)) and any(g[j] == g[i] and r[j] <= 0.5
                                                                          for j in range(B)) for i in range(B)]
    for i in range(B):
        pos = [j for j in range(B) if g[j] == g[i] and r[j] > 0.5]
        neg = [j for j in range(B) if g[j] == g[i] and r[j] <= 0.5]
        if not pos or not neg:
            continue
        if variant == "anchor":
            L = (math.log(1 + sum(math.exp(-s[j] / tau) for j in pos))
                 + math.log(1 + sum(math.exp(s[j] / tau) for j in neg)))
        else:
            # mean over valid rollouts: B / N_valid under the row mean of the aggregator
            L = math.log(1 + math.exp(-s[i] / tau if r[i] > 0.5 else s[i] / tau)) * B / sum(valid)
        for t in range(T):
            if mask[i][t]:
                out[i][t] = L
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("tau, variant", [(0.5, "anchor"), (2.0, "anchor"), (0.5, "bce")])
def test_matches_loop_reference_and_gradcheck(tau, variant):
    for seed in range(8):
        b, lp = random_case(seed)
        out = REALLoss(tau=tau, variant=variant)(lp, b).per_token
        assert_close(out, loop_real(b, lp.tolist(), tau, variant))
    # fully differentiable (no stop-gradient): float64 finite differences through the aggregator
    x = lp.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: agg_loss(REALLoss(tau=tau, variant=variant), z, b), (x,))


def test_gradient_bounded_and_monotone():
    # |dL_q/ds_k| <= 1/tau for any scores (the anchor bounds every weight), even for very off-policy rows.
    tau = 0.5
    for seed in range(6):
        b, lp = random_case(seed, scale=20.0)
        s = (torch.where(b.response_mask, lp - b.old_logprobs, torch.zeros((), dtype=F64)).sum(-1)
             / b.response_mask.sum(-1)).requires_grad_(True)
        # rebuild per-token log-probs whose token mean is s: put s on every trained token
        x = b.old_logprobs + s[:, None]
        per_row = REALLoss(tau=tau)(x, b).per_token.amax(-1)
        inv = torch.unique(b.group_ids, return_inverse=True)[1]
        total = (per_row / torch.bincount(inv)[inv]).sum()  # every row carries L_q: sum_q L_q
        (g,) = torch.autograd.grad(total, s)
        assert torch.isfinite(g).all() and torch.all(g.abs() <= 1 / tau + 1e-12)
        pos = b.rewards > 0.5
        assert torch.all(g[pos] <= 0) and torch.all(g[~pos] >= 0)  # positives pushed up, negatives down


def test_groupwise_microbatch_invariance():
    # A group's loss couples its rows: any split that keeps groups whole gives the same per-token loss.
    g = torch.Generator().manual_seed(3)
    groups = torch.arange(4).repeat_interleave(3)
    mask = random_mask(g, 12, 4)
    old = -torch.rand(12, 4, generator=g, dtype=F64)
    b = batch(torch.randint(0, 2, (12,), generator=g).to(F64), groups, mask, old)
    lp = old + 0.3 * torch.randn(12, 4, generator=g, dtype=F64)
    full = REALLoss()(lp, b).per_token
    for n in (2, 4):
        parts = torch.arange(12).tensor_split(n)
        assert_close(torch.cat([REALLoss()(lp[i], b.select(i)).per_token for i in parts]), full)


def test_config_errors():
    with pytest.raises(ConfigError, match="loss.tau"):
        from_config(REALLoss, tau=0.0)
    with pytest.raises(ConfigError, match="loss.variant"):
        from_config(REALLoss, variant="circle")
