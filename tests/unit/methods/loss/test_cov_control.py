"""Clip-Cov and KL-Cov (arXiv:2505.22617 Eqs. 11-13).

Cov_t = (log pi_t - mean log pi)(A_t - mean A) over the trained tokens. Clip-Cov detaches r*N random tokens with
omega_low < Cov < omega_high (PPO clip elsewhere); KL-Cov adds beta |log pi - log pi_old| on the top r*N by Cov to
the unclipped -r A.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.loss.cov_control import ClipCovLoss, KLCovLoss, token_covariance
from factories import from_config, make_batch

F64 = torch.float64


def inputs(lp, old, adv, mask=None, ids=None):
    lp = torch.tensor(lp, dtype=F64)
    B, T = lp.shape
    mask = torch.ones(B, T, dtype=torch.bool) if mask is None else torch.tensor(mask, dtype=torch.bool)
    a = torch.as_tensor(adv, dtype=F64)
    a = a[:, None].expand(B, T).clone() if a.dim() == 1 else a
    b = make_batch([0.0] * B, None, mask, advantages=a * mask, old_logprobs=torch.tensor(old, dtype=F64), dtype=F64)
    if ids is not None:
        b = b.replace(response_ids=torch.tensor(ids))
    return b, lp.requires_grad_(True)


def test_hand_covariance():
    # log pi = [[-1, -3], [-2, pad]], A = [[1, 1], [-2, pad]]: means -2 and 0 over 3 tokens
    #   Cov = (1)(1) = 1, (-1)(1) = -1, (0)(-2) = 0
    b, lp = inputs([[-1.0, -3.0], [-2.0, 0.0]], [[-1.0, -3.0], [-2.0, 0.0]], [[1.0, 1.0], [-2.0, 0.0]],
                   [[1, 1], [1, 0]])
    assert_close(token_covariance(lp, b.advantages, b.response_mask), torch.tensor([[1.0, -1.0], [0.0, 0.0]], dtype=F64))


def test_hand_kl_cov():
    # 4 tokens, on-policy except token 0 (log r = 0.5); log pi = [-1, -2, -3, -4], A = [2, 2, -2, -1]
    #   means -2.5 and 0.25: Cov = (1.5)(1.75), (0.5)(1.75), (-0.5)(-2.25), (-1.5)(-1.25)
    #                            = 2.625, 0.875, 1.125, 1.875 -> top-1 (r = 0.25, N = 4): token 0
    #   loss: -A r everywhere (r_0 = e^0.5) + 1.0 * |0.5| on token 0
    lp = [[-1.0, -2.0, -3.0, -4.0]]
    old = [[-1.5, -2.0, -3.0, -4.0]]
    b, x = inputs(lp, old, [[2.0, 2.0, -2.0, -1.0]])
    out = KLCovLoss(ratio=0.25, coef=1.0)(x, b)
    e = torch.exp(torch.tensor(0.5, dtype=F64)).item()
    exp = torch.tensor([[-2 * e + 0.5, -2.0, 2.0, 1.0]], dtype=F64)
    top = out.metrics["loss/cov_penalised_frac"].item()
    assert top == 0.25
    assert_close(out.per_token, exp)
    out.per_token.sum().backward()
    assert_close(x.grad, torch.tensor([[-2 * e + 1.0, -2.0, 2.0, 1.0]], dtype=F64))  # + beta sign(log r)


def test_hand_clip_cov():
    # on-policy (r = 1, nothing PPO-clipped); Cov from test_hand_kl_cov = [3, 1, 1, 3]; window (2, 5): candidates
    # tokens 0 and 3; ratio 0.5 -> 2 tokens detached = both candidates: loss [0, -2, 2, 0], gradient likewise
    lp = [[-1.0, -2.0, -3.0, -4.0]]
    b, x = inputs(lp, lp, [[2.0, 2.0, -2.0, -2.0]])
    out = ClipCovLoss(ratio=0.5, cov_low=2.0, cov_high=5.0)(x, b)
    assert_close(out.per_token, torch.tensor([[0.0, -2.0, 2.0, 0.0]], dtype=F64))
    out.per_token.sum().backward()
    assert_close(x.grad, torch.tensor([[0.0, -2.0, 2.0, 0.0]], dtype=F64))
    # ratio 0.25 -> one of the two candidates only, chosen by the seeded key; the other keeps its PPO loss
    b, x = inputs(lp, lp, [[2.0, 2.0, -2.0, -2.0]])
    out = ClipCovLoss(ratio=0.25, cov_low=2.0, cov_high=5.0)(x, b)
    zero = (out.per_token == 0).squeeze(0).tolist()
    assert zero.count(True) == 1 and (zero[0] or zero[3])


def test_card_property_only_high_covariance_tokens_are_touched():
    # tokens outside the covariance window / outside the top-k keep exactly the plain surrogate's gradient
    g = torch.Generator().manual_seed(3)
    lp = -torch.rand(4, 6, generator=g, dtype=F64) * 3
    adv = torch.randn(4, 6, generator=g, dtype=F64)
    b, x = inputs(lp.tolist(), lp.tolist(), adv)
    cov = token_covariance(lp, b.advantages, b.response_mask)
    out = KLCovLoss(ratio=0.1)(x, b)  # on-policy: the |log r| penalty is 0 but the chosen tokens are the top 2
    out.per_token.sum().backward()
    assert_close(x.grad, -b.advantages + 0.0 * cov)  # on-policy |log r| = 0: pure -A gradient (sign(0) = 0)
    # Clip-Cov: all detached tokens lie inside the window, and they are ratio * N of them
    b, x = inputs(lp.tolist(), lp.tolist(), adv)
    out = ClipCovLoss(ratio=0.1, cov_low=0.0, cov_high=5.0)(x, b)
    dropped = (out.per_token == 0) & (b.advantages != 0)
    assert int(dropped.sum()) == 2 and bool(((cov[dropped] > 0) & (cov[dropped] < 5)).all())


def test_clip_cov_choice_is_reproducible_and_follows_rows():
    g = torch.Generator().manual_seed(5)
    lp = -torch.rand(5, 6, generator=g, dtype=F64) * 3
    adv = torch.randn(5, 6, generator=g, dtype=F64)
    ids = torch.randint(0, 50, (5, 6), generator=g).tolist()
    comp = ClipCovLoss(ratio=0.1, cov_low=0.0, cov_high=10.0)
    b, x = inputs(lp.tolist(), lp.tolist(), adv, ids=ids)
    first = comp(x, b).per_token
    assert torch.equal(comp(x, b).per_token, first)
    perm = torch.tensor([3, 0, 4, 1, 2])
    bp, xp = inputs(lp[perm].tolist(), lp[perm].tolist(), adv[perm], ids=[ids[i] for i in perm.tolist()])
    assert_close(comp(xp, bp).per_token, first[perm])


def loop_kl_cov(lp, old, adv, mask, ratio, coef):
    import math

    toks = [(i, t) for i in range(len(lp)) for t in range(len(lp[0])) if mask[i][t]]
    ml = sum(lp[i][t] for i, t in toks) / len(toks)
    ma = sum(adv[i][t] for i, t in toks) / len(toks)
    cov = {(i, t): (lp[i][t] - ml) * (adv[i][t] - ma) for i, t in toks}
    k = max(int(ratio * len(toks)), 1)
    top = set(sorted(toks, key=lambda it: -cov[it])[:k])
    out = [[0.0] * len(lp[0]) for _ in lp]
    for i, t in toks:
        r = math.exp(lp[i][t] - old[i][t])
        out[i][t] = -adv[i][t] * r + (coef * abs(lp[i][t] - old[i][t]) if (i, t) in top else 0.0)
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("seed", range(5))
def test_kl_cov_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(4, 5, generator=g, dtype=F64) * 3
    old = lp + torch.randn(4, 5, generator=g, dtype=F64) * 0.3
    adv = torch.randn(4, 5, generator=g, dtype=F64)
    mask = (torch.rand(4, 5, generator=g) > 0.25).tolist()
    b, x = inputs(lp.tolist(), old.tolist(), adv, mask)
    out = KLCovLoss(ratio=0.2, coef=0.7)(x, b).per_token
    assert_close(out, loop_kl_cov(lp.tolist(), old.tolist(), b.advantages.tolist(), mask, 0.2, 0.7))


def test_config_errors():
    with pytest.raises(ConfigError, match="loss.ratio"):
        from_config(KLCovLoss, ratio=0.0)
    with pytest.raises(ConfigError, match="cov_low"):
        from_config(ClipCovLoss, cov_low=6.0, cov_high=5.0)
