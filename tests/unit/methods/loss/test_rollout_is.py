"""ppo_clip_is: PPO clip loss times a detached trainer/sampler importance weight (TIS / MIS, token or sequence).

rho_t = exp(old_t - sampler_t); truncate: w = min(rho, C); mask: w = rho * 1[lower <= rho <= C];
sequence level: rho_i = exp(sum_t (old - sampler)) for every token of row i.
loss_t = w_t * l^PPO_t, gradient d loss_t / d logp_t = w_t * d l^PPO_t / d logp_t.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.aggregate import SeqMeanTokenMean
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from lmpo.methods.loss.rollout_is import PPOClipISLoss
from lmpo.train.step import UpdateSettings, minibatch_loss
from factories import from_config, make_batch

F64 = torch.float64


def batch(old, sampler, adv, mask=None):
    old = torch.as_tensor(old, dtype=F64)
    B, T = old.shape
    adv = torch.as_tensor(adv, dtype=F64)
    adv = adv[:, None].expand(B, T).clone() if adv.dim() == 1 else adv
    mask = torch.ones(B, T, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool)
    b = make_batch([0.0] * B, None, mask, advantages=adv * mask, old_logprobs=old, dtype=F64)
    return b.replace(sampler_logprobs=torch.as_tensor(sampler, dtype=F64))


def run(loss_fn, lp, b):
    lp = torch.as_tensor(lp, dtype=F64).clone().requires_grad_(True)
    out = loss_fn(lp, b)
    out.per_token.sum().backward()
    return out.per_token.detach(), lp.grad, out.metrics


def test_hand_token_truncate_and_mask():
    # old = -1 everywhere; sampler = -1 - log(rho) with rho = [3, 1.5, 0.5]; logp = old (r = 1); A = +1.
    # PPO per token at r = 1: loss -1, grad -1.  TIS C=2: w = [2, 1.5, 0.5] -> loss [-2, -1.5, -0.5] = grad.
    # MIS C=2: w = [0, 1.5, 0.5];  MIS with lower = 0.6: w = [0, 1.5, 0].
    rho = torch.tensor([[3.0, 1.5, 0.5]], dtype=F64)
    old = torch.full((1, 3), -1.0, dtype=F64)
    b = batch(old, old - rho.log(), [1.0])
    loss, grad, m = run(PPOClipISLoss(cap=2.0), old, b)
    assert_close(loss, torch.tensor([[-2.0, -1.5, -0.5]], dtype=F64))
    assert_close(grad, torch.tensor([[-2.0, -1.5, -0.5]], dtype=F64))
    assert_close(m["loss/is_hit_frac"], torch.tensor(1 / 3))  # a float32 fraction
    assert_close(m["loss/is_weight_mean"], torch.tensor(4.0 / 3, dtype=F64))
    loss, _, _ = run(PPOClipISLoss(mode="mask"), old, b)
    assert_close(loss, torch.tensor([[0.0, -1.5, -0.5]], dtype=F64))
    loss, _, _ = run(PPOClipISLoss(mode="mask", lower=0.6), old, b)
    assert_close(loss, torch.tensor([[0.0, -1.5, 0.0]], dtype=F64))


def test_hand_sequence_level():
    # Row 0: rho_t = [2, 0.8, pad(100)] -> sequence rho = 1.6 (padding ignored); TIS C = 2 keeps 1.6 on both tokens.
    # Row 1: rho_t = [2, 1.5] -> 3 > 2: truncate -> 2 on both tokens; mask -> 0 (the whole response is rejected).
    # logp = old, A = +1: PPO loss -1 per token, so loss = -w.
    rho = torch.tensor([[2.0, 0.8, 100.0], [2.0, 1.5, 1.0]], dtype=F64)
    old = torch.full((2, 3), -2.0, dtype=F64)
    b = batch(old, old - rho.log(), [1.0, 1.0], [[1, 1, 0], [1, 1, 0]])
    loss, _, _ = run(PPOClipISLoss(level="sequence"), old, b)
    assert_close(loss, torch.tensor([[-1.6, -1.6, 0.0], [-2.0, -2.0, 0.0]], dtype=F64))
    loss, _, _ = run(PPOClipISLoss(level="sequence", mode="mask"), old, b)
    assert_close(loss, torch.tensor([[-1.6, -1.6, 0.0], [0.0, 0.0, 0.0]], dtype=F64))


def test_no_mismatch_is_exactly_ppo_clip():
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 5, generator=g, dtype=F64) * 2
    lp = old + torch.randn(4, 5, generator=g, dtype=F64) * 0.3
    b = batch(old, old.clone(), torch.randn(4, 5, generator=g, dtype=F64))
    for kw in ({}, {"level": "sequence"}, {"mode": "mask"}):
        loss, grad, _ = run(PPOClipISLoss(epsilon=0.2, epsilon_high=0.28, dual_clip=3.0, **kw), lp, b)
        ref_loss, ref_grad, _ = run(PPOClipLoss(epsilon=0.2, epsilon_high=0.28, dual_clip=3.0), lp, b)
        assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)


def test_config_errors():
    for kw, key in [({"level": "seq"}, "loss.level"), ({"mode": "clip"}, "loss.mode"), ({"cap": 0.0}, "loss.cap"),
                    ({"mode": "mask", "lower": 3.0}, "loss.lower"), ({"lower": 0.5}, "loss.lower"),
                    ({"epsilon": -1.0}, "loss.epsilon"), ({"dual_clip": 0.5}, "loss.dual_clip")]:
        with pytest.raises(ConfigError, match=key):
            from_config(PPOClipISLoss, **kw)
    assert PPOClipISLoss.needs == frozenset({"old_logprobs", "sampler_logprobs"})


def loop_is(lp, old, sampler, adv, mask, level, mode, cap, lower, eps):
    B, T = len(lp), len(lp[0])
    loss = [[0.0] * T for _ in range(B)]
    grad = [[0.0] * T for _ in range(B)]
    for i in range(B):
        seq = sum(old[i][t] - sampler[i][t] for t in range(T) if mask[i][t])
        for t in range(T):
            if not mask[i][t]:
                continue
            rho = math.exp(seq if level == "sequence" else old[i][t] - sampler[i][t])
            if mode == "truncate":
                w = min(rho, cap)
            else:
                w = rho if (rho <= cap and (lower is None or rho >= lower)) else 0.0
            r, a = math.exp(lp[i][t] - old[i][t]), adv[i][t]
            if (a >= 0 and r > 1 + eps) or (a < 0 and r < 1 - eps):
                l, g = -a * min(max(r, 1 - eps), 1 + eps), 0.0
            else:
                l, g = -a * r, -a * r
            loss[i][t], grad[i][t] = w * l, w * g
    return torch.tensor(loss, dtype=F64), torch.tensor(grad, dtype=F64)


@pytest.mark.parametrize("level, mode, cap, lower", [("token", "truncate", 2.0, None), ("token", "mask", 1.3, 0.7),
                                                     ("sequence", "truncate", 1.5, None),
                                                     ("sequence", "mask", 2.0, 0.5)])
def test_matches_loop_reference(level, mode, cap, lower):
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        B, T = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        old = -torch.rand(B, T, generator=g, dtype=F64) * 2
        sampler = old + torch.randn(B, T, generator=g, dtype=F64) * 0.4
        lp = old + torch.randn(B, T, generator=g, dtype=F64) * 0.3
        lp = torch.where(((lp - old).exp() - 1).abs().sub(0.2).abs() < 1e-3, old, lp)  # away from the clip kinks
        adv = torch.randn(B, T, generator=g, dtype=F64)
        mask = torch.rand(B, T, generator=g) > 0.25
        mask[:, 0] = True
        b = batch(old, sampler, adv, mask)
        loss, grad, _ = run(PPOClipISLoss(level=level, mode=mode, cap=cap, lower=lower), lp, b)
        ref_loss, ref_grad = loop_is(lp.tolist(), old.tolist(), sampler.tolist(), (adv * mask).tolist(),
                                     mask.tolist(), level, mode, cap, lower, 0.2)
        assert_close(loss, ref_loss)
        assert_close(grad, ref_grad)


def test_gradcheck_through_aggregator():
    g = torch.Generator().manual_seed(4)
    mask = torch.rand(3, 5, generator=g) > 0.2
    mask[:, 0] = True
    old = -torch.rand(3, 5, generator=g, dtype=F64)
    b = batch(old, old + torch.randn(3, 5, generator=g, dtype=F64) * 0.5, torch.randn(3, 5, generator=g, dtype=F64),
              mask)
    agg = SeqMeanTokenMean()
    norm = agg.normaliser(mask, 0)
    lp = (old + 0.05 * torch.randn(3, 5, generator=g, dtype=F64)).requires_grad_(True)
    fn = PPOClipISLoss(level="sequence")
    assert torch.autograd.gradcheck(lambda x: agg(fn(x, b).per_token, mask, norm), (lp,))


class _Runner:
    """Stands in for PolicyRunner: returns fixed 'current' log-probs with a gradient."""

    def __init__(self, lp):
        self.lp = lp

    def for_loss(self, mb, needs, loss_fn):
        return self

    def logprobs(self, mb, with_entropy=False, entropy_grad=True):
        return self.lp, torch.zeros_like(self.lp)

    def forward(self, batch, with_entropy=False, entropy_grad=True, hidden=False):
        return (*self.logprobs(batch, with_entropy, entropy_grad), None)


def test_trainer_on_policy_uses_detached_current_logprobs_against_sampler():
    # On-policy (old_logprobs None), minibatch_loss sets old = lp.detach(): r = 1 and rho = exp(lp - sampler).
    # lp = -1, sampler = -1 - log 3 (rho = 3, truncated to 2) and -1 - log 0.5 (rho = 0.5); A = 1 -> loss = -w.
    lp = torch.full((1, 2), -1.0, dtype=F64, requires_grad=True)
    sampler = torch.tensor([[-1.0 - math.log(3.0), -1.0 - math.log(0.5)]], dtype=F64)
    b = make_batch([0.0], None, [[1, 1]], advantages=[[1.0, 1.0]], dtype=F64).replace(sampler_logprobs=sampler)
    agg = SeqMeanTokenMean()
    norm = agg.normaliser(b.response_mask, 2)
    loss, metrics = minibatch_loss(_Runner(lp), b, PPOClipISLoss(), agg, UpdateSettings(), norm)
    assert loss.item() == pytest.approx(-(2.0 + 0.5) / 2)
    assert metrics["loss/is_weight_mean"].item() == pytest.approx(1.25)
