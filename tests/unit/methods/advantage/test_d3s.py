"""D3S dual-level down-sampling (arXiv:2509.22115): max-Var(A) samples, top |A|*H tokens, relaxing schedule."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.advantage.d3s import D3SAdvantage, max_variance_subset, ramp
from lmpo.methods.advantage.grpo import GRPOAdvantage
from lmpo.methods.aggregate import SeqMeanTokenMean
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from factories import from_config, make_batch, random_batch


def with_entropy(batch, ent):
    return batch.replace(extras={"entropy": torch.as_tensor(ent, dtype=torch.float32)})


# --------------------------------------------------------------------------- hand cases
def test_hand_card_max_variance_pair():
    # Card: A = (-1.2, -0.3, 0.1, 0.4, 1.0), k = 2. Pair variances (population): {a, b} -> ((a - b) / 2)^2, maximal
    # for the widest pair {-1.2, 1.0}: (2.2 / 2)^2 = 1.21.
    a = torch.tensor([-1.2, -0.3, 0.1, 0.4, 1.0])
    assert max_variance_subset(a, 2).tolist() == [True, False, False, False, True]
    # Through the component: one group, T = 1, sample_ratio 0.4 -> k = round(0.4 * 5) = 2; token_ratio 1.
    b = make_batch(torch.zeros(5), [0] * 5, T=1, advantages=a[:, None])
    d3s = D3SAdvantage(sample_ratio=0.4, token_ratio=1.0, anneal_steps=10)
    assert d3s.token_mask(b)[:, 0].tolist() == [True, False, False, False, True]


def test_hand_three_of_five():
    # k = 3 from (-1.2, -0.3, 0.1, 0.4, 1.0): candidates m = 0..3 (m largest + 3 - m smallest):
    #   m=0 {-1.2,-0.3,0.1}: mean -1.4/3, var = (1.54 - 1.96/3)/3 = 0.2956
    #   m=1 {-1.2,-0.3,1.0}: mean -0.5/3, var = (2.53 - 0.25/3)/3 = 0.8156
    #   m=2 {-1.2,0.4,1.0}:  mean 0.2/3,  var = (2.60 - 0.04/3)/3 = 0.8622   <- maximum
    #   m=3 {0.1,0.4,1.0}:   mean 0.5,    var = (1.17 - 0.75)/3 = 0.14
    a = torch.tensor([0.4, -1.2, 1.0, -0.3, 0.1])
    assert max_variance_subset(a, 3).tolist() == [True, True, True, False, False]


def test_hand_token_level():
    # Two rows, T = 2, all tokens valid, sample level off. |A| = [[1, 1], [2, 2]], H = [[0.5, 0.1], [0.1, 0.0]]
    # scores = [[0.5, 0.1], [0.2, 0.0]]; token_ratio 0.5 of 4 tokens -> keep the 2 best: (0,0)=0.5 and (1,0)=0.2.
    b = make_batch([0.0, 0.0], [0, 1], [2, 2], advantages=[[1.0, 1.0], [-2.0, -2.0]])
    b = with_entropy(b, [[0.5, 0.1], [0.1, 0.0]])
    keep = D3SAdvantage(sample_ratio=1.0, token_ratio=0.5).token_mask(b)
    assert keep.tolist() == [[True, False], [True, False]]


# --------------------------------------------------------------------------- card properties
def test_full_ratios_reduce_to_grpo():
    b = random_batch(0, T=4)
    b = with_entropy(b, torch.rand(b.response_ids.shape))
    d3s = D3SAdvantage(sample_ratio=1.0, token_ratio=1.0)
    assert_close(d3s(b), GRPOAdvantage()(b))
    assert torch.equal(d3s.token_mask(b.replace(advantages=d3s(b))), b.response_mask)
    # anneal_steps = 0: no down-sampling whatever the initial ratios
    assert torch.equal(D3SAdvantage(anneal_steps=0).token_mask(b.replace(advantages=d3s(b))), b.response_mask)


def test_zero_advantage_tokens_come_last():
    # Row 0 has A = 0 (score 0 whatever its huge entropy); row 1 has A != 0 and small H > 0: row 1 goes first.
    b = make_batch([0.0, 0.0], [0, 1], [2, 2], advantages=[[0.0, 0.0], [0.3, 0.3]])
    b = with_entropy(b, [[9.0, 9.0], [0.01, 0.02]])
    keep = D3SAdvantage(sample_ratio=1.0, token_ratio=0.5).token_mask(b)
    assert keep.tolist() == [[False, False], [True, True]]


def test_schedule_relaxes_and_survives_resume():
    assert ramp(0.5, 0, 10) == 0.5 and ramp(0.5, 5, 10) == 0.75 and ramp(0.5, 20, 10) == 1.0
    d3s = D3SAdvantage(sample_ratio=0.2, token_ratio=0.4, anneal_steps=4)
    b = make_batch(torch.zeros(5), [0] * 5, T=1, advantages=torch.randn(5, 1))
    b = with_entropy(b, torch.ones(5, 1))
    kept = [int(d3s.token_mask(b).sum()) for _ in range(5)]
    assert kept == sorted(kept) and kept[-1] == 5  # monotone relaxation to the full set
    fresh = D3SAdvantage(sample_ratio=0.2, token_ratio=0.4, anneal_steps=4)
    fresh.load_state_dict(d3s.state_dict())
    assert fresh.ratios() == d3s.ratios() == (1.0, 1.0)


def test_intra_level_keeps_k_per_group():
    a = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0])[:, None]
    b = make_batch(torch.zeros(8), [0] * 4 + [1] * 4, T=1, advantages=a)
    intra = D3SAdvantage(sample_ratio=0.5, token_ratio=1.0, level="intra").token_mask(b)[:, 0]
    assert intra.tolist() == [True, False, False, True, True, False, False, True]
    cross = D3SAdvantage(sample_ratio=0.5, token_ratio=1.0, level="cross").token_mask(b)[:, 0]
    assert cross.tolist() == [True, True, False, False, False, False, True, True]


def test_config_errors():
    for kw, key in (({"sample_ratio": 0.0}, "sample_ratio"), ({"token_ratio": 1.5}, "token_ratio"),
                    ({"anneal_steps": -1}, "anneal_steps"), ({"level": "x"}, "level")):
        with pytest.raises(ConfigError, match=f"advantage.{key}"):
            from_config(D3SAdvantage, **kw)


# --------------------------------------------------------------------------- slow references
@pytest.mark.parametrize("seed", range(6))
def test_max_variance_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(3, 9, (1,), generator=g))
    v = torch.randn(n, generator=g, dtype=torch.float64)
    for k in range(2, n + 1):
        best = max(torch.stack([v[list(c)] for c in [comb]]).var(unbiased=False).item()
                   for comb in itertools.combinations(range(n), k))
        got = v[max_variance_subset(v, k)]
        assert got.numel() == k
        assert abs(got.var(unbiased=False).item() - best) < 1e-12


@pytest.mark.parametrize("seed", range(4))
def test_token_level_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    b = random_batch(seed, T=5)
    b = b.replace(advantages=GRPOAdvantage()(b))
    ent = torch.rand(b.response_ids.shape, generator=g)
    b = with_entropy(b, ent)
    keep = D3SAdvantage(sample_ratio=1.0, token_ratio=0.3).token_mask(b)
    scores = [(abs(b.advantages[i, t].item()) * ent[i, t].item(), i, t)
              for i in range(b.batch_size) for t in range(b.response_ids.shape[1]) if b.response_mask[i, t]]
    n_keep = max(1, round(0.3 * len(scores)))
    thr = sorted((s for s, _, _ in scores), reverse=True)[n_keep - 1]
    ref = torch.zeros_like(keep)
    for s, i, t in scores:
        ref[i, t] = s >= thr
    assert torch.equal(keep, ref)


# --------------------------------------------------------------------------- gradient
def test_gradient_only_through_kept_tokens():
    # On-policy PPO loss l = -A * r with r = 1 at lp = old: d/dlp of the GRPO aggregate (seq mean of token means over
    # the kept tokens) is -A_{i,t} / (|kept_i| * n_kept_rows) on kept tokens and exactly 0 elsewhere.
    b = random_batch(3, T=4)
    b = b.replace(advantages=GRPOAdvantage()(b))
    b = with_entropy(b, torch.rand(b.response_ids.shape, generator=torch.Generator().manual_seed(0)))
    keep = D3SAdvantage(sample_ratio=0.6, token_ratio=0.5).token_mask(b)
    kb = b.replace(response_mask=b.response_mask & keep, advantages=b.advantages * keep,
                   old_logprobs=torch.zeros(b.response_ids.shape))
    lp = torch.zeros(b.response_ids.shape, requires_grad=True)
    agg = SeqMeanTokenMean()
    agg(PPOClipLoss()(lp, kb).per_token, kb.response_mask, agg.normaliser(kb.response_mask, 4)).backward()
    rows = keep.sum(-1)
    n_rows = float((rows > 0).sum())
    expected = torch.where(keep, -kb.advantages / (rows[:, None].clamp_min(1) * n_rows), torch.zeros(()))
    assert_close(lp.grad, expected)
