"""Preplan-and-Anchor (arXiv:2510.13554): WAAD / FAI on attention maps, coupled rhythm gamma, non-negative-only."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError, DataError
from lmpo.methods.advantage.grpo import GRPOAdvantage
from lmpo.methods.advantage.preplan_anchor import (PreplanAnchorAdvantage, fai, head_maps, middle_layers,
                                                   rhythm_gamma, waad)
from lmpo.methods.aggregate import TokenMean
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from lmpo.models.tiny import build_tiny_model

from factories import from_config, make_batch, random_full_batch

F64 = torch.float64


def causal_uniform(N):
    a = torch.tril(torch.ones(N, N, dtype=F64))
    return a / a.sum(-1, keepdim=True)


def test_card_metrics_by_hand():
    # (a) token 3 puts all its mass on token 0, W = 2: WAAD_3 = min(3, 2) = 2
    a = torch.eye(4, dtype=F64)
    a[3] = torch.tensor([1.0, 0, 0, 0])
    assert waad(a, 2)[3].item() == 2.0 and waad(a, 2)[:3].tolist() == [0, 0, 0]
    # FAI with H_lo = 1, H_hi = 3, tokens 1..3 each put 0.5 on token 0: FAI_0 = 0.5
    b = torch.zeros(4, 4, dtype=F64)
    b[0, 0] = 1.0
    for t in (1, 2, 3):
        b[t, 0], b[t, t] = 0.5, 0.5
    assert fai(b, 1, 3)[0].item() == pytest.approx(0.5)
    # FAI_1 = mean over t in {2, 3} of A[t, 1] = 0; FAI_3: no t in [4, 6]: 0
    assert fai(b, 1, 3)[1].item() == 0.0 and fai(b, 1, 3)[3].item() == 0.0
    # uniform causal attention: WAAD_t = sum_{s<=t} min(t - s, W) / (t + 1); t = 3, W = 10: (3+2+1+0)/4 = 1.5
    assert waad(causal_uniform(4), 10)[3].item() == pytest.approx(1.5)


def test_head_selection_by_distance():
    # head 0 attends to itself (distance 0), head 1 to token 0 (distance t), head 2 uniform
    N = 5
    h0 = torch.eye(N, dtype=F64)
    h1 = torch.zeros(N, N, dtype=F64)
    h1[:, 0] = 1.0
    att = torch.stack([h0, h1, causal_uniform(N)])
    loc, glob = head_maps(att, 0, 0.3)  # one head each
    assert torch.equal(loc, h0) and torch.equal(glob, h1)


def test_gamma_card_credit_and_anchor_coupling():
    # every token attends only to itself (WAAD 0, delta 0) except that all attend to token 5 of 8 via the global head:
    # local head = identity, global head = mass on the prompt token 0 plus token 5 for t >= 5.
    N = 8
    loc = torch.eye(N, dtype=F64)
    glob = torch.zeros(N, N, dtype=F64)
    glob[:, 0] = 1.0
    for t in range(6, N):
        glob[t, 0], glob[t, 5] = 0.0, 1.0
    att = torch.stack([loc, glob])
    # reply = positions 1..7 (start 1); FAI over reply with H_lo 1, H_hi 3: token 5 receives 1.0 from 6, 7 -> top.
    # q = 1/7 -> one anchor (position 5 = reply index 4). WAAD all 0 <= median 0, but delta all 0 and tau_d = 0 so
    # max delta >= tau_d holds: a locally dominated anchor -> gamma = 1 + 0.5 * 0.5 at the anchor and its intro
    # (argmax of the all-zero deltas over [t-3, t-1] = its first position, reply index 1).
    gam = rhythm_gamma(att, 1, window=2, h_lo=1, h_hi=3, q=1 / 7, head_quantile=0.5, g=1.5, alpha=0.5, k=3)
    assert gam.tolist() == [1.0, 1.25, 1.0, 1.0, 1.25, 1.0, 1.0]
    # g = 1: no credit at all
    assert torch.equal(rhythm_gamma(att, 1, g=1.0, h_lo=1, h_hi=3), torch.ones(7, dtype=F64))


def test_advantage_card_property_and_grpo_reduction():
    # (b) gamma 1.5 on token 1 of a positive row; the negative row ignores gamma
    b = make_batch(rewards=[1.0, 0.0], group_ids=[0, 0], mask=[[1, 1, 1], [1, 1, 1]])
    sc = torch.tensor([[1.0, 1.5, 1.0, 1.0], [1.5, 1.5, 1.5, 1.5]])
    b2 = b.replace(extras={"credit_scale": sc})
    a = GRPOAdvantage()(b)
    got = PreplanAnchorAdvantage()(b2)
    assert_close(got, torch.stack([a[0] * torch.tensor([1.0, 1.5, 1.0]), a[1]]), atol=1e-6, rtol=0)
    # (c) g = 1 or no scores: GRPO
    r = random_full_batch(seed=2)
    assert torch.equal(PreplanAnchorAdvantage()(r), GRPOAdvantage()(r))
    assert torch.equal(PreplanAnchorAdvantage(g=1.0)(b2), a)


def test_after_score_on_a_tiny_model_restores_attention_and_marks_reply_tokens():
    model = build_tiny_model(seed=0, num_layers=2)
    prev = model.config._attn_implementation
    B, P, T = 2, 3, 5
    g = torch.Generator().manual_seed(0)
    b = make_batch(rewards=[1.0, 0.0], group_ids=[0, 0], mask=[[1] * 5, [1, 1, 1, 0, 0]])
    b = b.replace(prompt_ids=torch.randint(3, 16, (B, P), generator=g), prompt_mask=torch.ones(B, P, dtype=torch.bool),
                  response_ids=torch.randint(3, 16, (B, T), generator=g),
                  response_attn=b.response_mask.clone())
    pa = PreplanAnchorAdvantage(h_lo=1, h_hi=3, window=2, horizon=6)
    out = pa.after_score(SimpleNamespace(generator=SimpleNamespace(model=model)), b)
    sc = out.extras["credit_scale"]
    assert model.config._attn_implementation == prev
    assert sc.shape == (2, 6) and set(sc.flatten().tolist()) <= {1.0, 1.25, 1.5}
    assert (sc[0, :5] > 1).any() and torch.all(sc[1, 3:] == 1) and torch.all(sc[:, 5] == 1)
    # the same maps by hand, one unpadded forward per row (row 1 has 2 padding tokens in the batched forward):
    # eager attentions of both layers (2 layers < 3: all layers)
    model.set_attn_implementation("eager")
    for i, n in ((0, 5), (1, 3)):
        with torch.no_grad():
            ids = torch.cat([b.prompt_ids[i], b.response_ids[i, :n]])[None]
            att = model(input_ids=ids, output_attentions=True).attentions
        ref = rhythm_gamma(torch.cat([a[0] for a in att]).float(), P, window=2, h_lo=1, h_hi=3)
        assert_close(sc[i, :n], ref.float(), atol=1e-6, rtol=0)
    model.set_attn_implementation(prev)
    with pytest.raises(DataError, match="rollout.backend=hf"):
        pa.after_score(SimpleNamespace(generator=object()), b)


def test_middle_layers():
    assert middle_layers(2, 5) == [0, 1]
    assert middle_layers(30, 5) == [10, 12, 14, 17, 19]
    assert middle_layers(6, 5) == [2, 3]


def test_gradient_through_the_clipped_loss():
    # rows (1, 0), one token each: A = +-sqrt(.5); gamma 1.5 on the positive row: A0 = 1.5 sqrt(.5), A1 = -sqrt(.5);
    # both take action 0: token_mean L = -(A0 + A1) log p0 / 2 -> dL/dz0 = -(A0 + A1)(1 - p0) / 2
    b = make_batch(rewards=[1.0, 0.0], group_ids=[0, 0], mask=[[1], [1]])
    b = b.replace(extras={"credit_scale": torch.tensor([[1.5], [1.5]])})
    adv = PreplanAnchorAdvantage()(b)
    z = torch.tensor([0.0, 0.3], dtype=F64, requires_grad=True)
    lp = torch.log_softmax(z, -1)[0].expand(2, 1)
    batch = b.replace(advantages=adv, old_logprobs=lp.detach().float())
    out = PPOClipLoss(epsilon=0.2)(lp, batch)
    agg = TokenMean()
    agg(out.per_token, batch.response_mask, agg.normaliser(batch.response_mask, 1)).backward()
    s = 0.5 * 0.5 ** 0.5
    p = torch.softmax(z.detach(), -1)
    assert_close(z.grad, torch.tensor([-s * (1 - p[0]) / 2, s * p[1] / 2], dtype=F64), atol=1e-6, rtol=1e-5)


def test_bad_hyper_parameters():
    with pytest.raises(ConfigError, match="g"):
        from_config(PreplanAnchorAdvantage, g=0.5)
