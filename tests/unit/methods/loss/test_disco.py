"""DisCO (arXiv:2505.12366): every trained token of a valid group's row carries -J_q, plus beta * sg(hinge) * k_t,
k_t = r_t - 1 - log r_t, hinge = max(0, K - delta), K = token mean of k over the batch (released code)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.aggregate import SeqMeanTokenMean
from lmpo.methods.loss.disco import DisCOLoss
from factories import from_config, make_batch, random_groups, random_mask

F64 = torch.float64


def batch(rewards, groups, mask, old):
    return make_batch(rewards, groups, mask, advantages=torch.zeros(mask.shape), old_logprobs=old, dtype=F64)


def agg_loss(loss_fn, lp, b):
    agg = SeqMeanTokenMean()
    mask = b.response_mask
    return agg(loss_fn(lp, b).per_token, mask, agg.normaliser(mask, 0))


def test_hand_card_case():
    # One group, one token per response, logL score = log-prob. s+ = -0.5, negatives (-1, -2), tau = 1,
    # old = lp (K = 0).
    #   J = -0.5 - log(e^-1 + e^-2) = -0.5 - (-1 + log(1 + e^-1)) = 0.5 - 0.31326 = 0.18674 -> every token carries -J.
    #   seq_mean_token_mean over 3 rows: loss = -J; dJ/ds+ = 1, dJ/ds- = -softmax(-1, -2) = (-0.73106, -0.26894).
    # A second, all-correct group contributes nothing (then the loss is -J * 3/5 and the gradient scales by 3/5).
    mask = torch.ones(3, 1, dtype=torch.bool)
    lp = torch.tensor([[-0.5], [-1.0], [-2.0]], dtype=F64)
    b = batch([1.0, 0.0, 0.0], [0, 0, 0], mask, lp.clone())
    x = lp.clone().requires_grad_(True)
    out = DisCOLoss(tau=1.0)(x, b)
    J = 0.5 - math.log(1 + math.exp(-1))
    assert_close(out.per_token, torch.full((3, 1), -J, dtype=F64))
    assert out.metrics["loss/kl_old"].item() == 0.0 and out.metrics["loss/kl_hinge"].item() == 0.0
    agg_loss(DisCOLoss(tau=1.0), x, b).backward()
    sm = torch.tensor([math.exp(-1), math.exp(-2)]) / (math.exp(-1) + math.exp(-2))
    assert_close(x.grad, -torch.tensor([[1.0], [-sm[0]], [-sm[1]]], dtype=F64))
    # with an all-correct second group
    mask5 = torch.ones(5, 1, dtype=torch.bool)
    lp5 = torch.tensor([[-0.5], [-1.0], [-2.0], [-0.3], [-0.7]], dtype=F64)
    b5 = batch([1.0, 0.0, 0.0, 1.0, 1.0], [0, 0, 0, 1, 1], mask5, lp5.clone())
    x5 = lp5.clone().requires_grad_(True)
    out5 = DisCOLoss(tau=1.0)(x5, b5)
    assert torch.all(out5.per_token[3:] == 0)
    agg_loss(DisCOLoss(tau=1.0), x5, b5).backward()
    assert_close(x5.grad[:3], x.grad * 3 / 5)
    assert torch.all(x5.grad[3:] == 0)


def test_hand_balanced_and_lratio():
    # DisCO-b, logL: J = mean(-0.5, -1.5) - mean(-1, -2) = -1 + 1.5 = 0.5 -> -0.5 per token.
    mask = torch.ones(4, 1, dtype=torch.bool)
    lp = torch.tensor([[-0.5], [-1.5], [-1.0], [-2.0]], dtype=F64)
    b = batch([1.0, 1.0, 0.0, 0.0], [0] * 4, mask, lp.clone())
    assert_close(DisCOLoss(variant="balanced")(lp, b).per_token, torch.full((4, 1), -0.5, dtype=F64))
    # L-ratio score with lp = old: every score = 1 -> J = 1 - tau log(2 e^{1/tau}) = -tau ln 2 (tau = 1) -> +ln 2
    assert_close(DisCOLoss(score="lratio", tau=1.0)(lp, b).per_token, torch.full((4, 1), math.log(2), dtype=F64))


def test_hinge_penalty():
    # Rewards all equal (no valid group): only the penalty. One token, r = 1.02:
    #   k = 0.02 - ln 1.02 = 1.97353e-4; K = k; hinge = 1e3 (K - 1e-4) = 0.097353 (card: K = 2e-4 -> 0.1)
    #   per-token loss = hinge * k; d/dlogp = hinge * dk/dlogp = hinge * (r - 1) = 0.097353 * 0.02
    # r = 1.005: k = 1.2479e-5 < delta -> no penalty, no gradient.
    for r, active in ((1.02, True), (1.005, False)):
        k = (r - 1) - math.log(r)
        h = max(0.0, 1e3 * (k - 1e-4))
        assert (h > 0) == active
        old = torch.tensor([[-1.0]], dtype=F64)
        b = batch([1.0], [0], torch.ones(1, 1, dtype=torch.bool), old)
        x = (old + math.log(r)).requires_grad_(True)
        out = DisCOLoss()(x, b)
        out.per_token.sum().backward()
        assert out.per_token.item() == pytest.approx(h * k, abs=1e-15)
        assert x.grad.item() == pytest.approx(h * (r - 1), abs=1e-15)
        assert out.metrics["loss/kl_hinge"].item() == pytest.approx(h)


def test_hand_issue21_kl_is_token_mean_over_batch():
    # Issue 21 example: a 1-token row with k = 0.0103 next to a 99-token row with k = 0 (no valid group).
    #   log r = 0.14: k = e^0.14 - 1 - 0.14 = 0.0102736
    #   official K = k / 100 tokens = 1.02736e-4 -> coefficient 1e3 (K - 1e-4) = 0.00274
    #   (lmpo's old per-sequence mean K = k / 2 = 5.137e-3 -> 5.04)
    # Aggregate (seq_mean_token_mean): beta h sum k / 100 tokens = h K; gradient on the 1-token row's token:
    #   h (r - 1) / 100; on the 99-token row: 0 (k' = r - 1 = 0).
    k = math.exp(0.14) - 1 - 0.14
    K = k / 100
    h = 1e3 * (K - 1e-4)
    assert h == pytest.approx(0.0027, abs=1e-4) and k == pytest.approx(0.0103, abs=1e-4)
    mask = torch.zeros(2, 99, dtype=torch.bool)
    mask[0, 0] = True
    mask[1] = True
    old = torch.full((2, 99), -1.0, dtype=F64)
    lp = old.clone()
    lp[0, 0] += 0.14
    b = batch([1.0, 1.0], [0, 1], mask, old)
    x = lp.clone().requires_grad_(True)
    out = DisCOLoss()(x, b)
    assert out.metrics["loss/kl_old"].item() == pytest.approx(K, rel=1e-12)
    assert out.metrics["loss/kl_hinge"].item() == pytest.approx(h, rel=1e-9)
    total = agg_loss(DisCOLoss(), x, b)
    total.backward()
    assert total.item() == pytest.approx(h * K, rel=1e-9)
    assert x.grad[0, 0].item() == pytest.approx(h * math.expm1(0.14) / 100, rel=1e-9)
    assert torch.all(x.grad[1] == 0)


def random_case(seed, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    groups = random_groups(g)
    B = groups.numel()
    T = int(torch.randint(1, 6, (1,), generator=g))
    mask = random_mask(g, B, T)
    rewards = torch.randint(0, 2, (B,), generator=g).to(F64)
    old = -torch.rand(B, T, generator=g, dtype=F64) * 2
    lp = old + torch.randn(B, T, generator=g, dtype=F64) * spread
    return batch(rewards, groups, mask, old), lp


def reference_objective(lp, b, score, variant, tau, delta, beta):
    """Independent loop form of -(sum_q n_q J_q)/N_rows + (beta/2) max(0, K - delta)^2 (differentiable, float64)."""
    mask, old = b.response_mask, b.old_logprobs
    B, T = mask.shape
    g, rw = b.group_ids.tolist(), b.rewards.tolist()
    s, ksum, ntok = [], 0.0, 0
    for i in range(B):
        toks = [t for t in range(T) if mask[i, t]]
        vals = [lp[i, t] if score == "logl" else torch.exp(lp[i, t] - old[i, t]) for t in toks]
        s.append(sum(vals) / len(toks))
        ksum = ksum + sum(torch.exp(lp[i, t] - old[i, t]) - 1 - (lp[i, t] - old[i, t]) for t in toks)
        ntok += len(toks)
    total = lp.new_zeros(())
    for i in range(B):
        pos = [j for j in range(B) if g[j] == g[i] and rw[j] > 0.5]
        neg = [j for j in range(B) if g[j] == g[i] and rw[j] <= 0.5]
        if pos and neg:
            jp = sum(s[j] for j in pos) / len(pos)
            jn = (tau * torch.log(sum(torch.exp(s[j] / tau) for j in neg)) if variant == "disco"
                  else sum(s[j] for j in neg) / len(neg))
            total = total - (jp - jn)  # row i carries -J_q
    K = ksum / ntok  # token mean over the batch (released code)
    return total / B + 0.5 * beta * torch.clamp(K - delta, min=0.0) ** 2


@pytest.mark.parametrize("score, variant, tau", [("logl", "disco", 10.0), ("logl", "disco", 0.5),
                                                  ("lratio", "disco", 1.0), ("logl", "balanced", 1.0),
                                                  ("lratio", "balanced", 1.0)])
@pytest.mark.parametrize("beta", [0.0, 50.0])
def test_matches_reference_value_and_gradient(score, variant, tau, beta):
    # value of the aggregate: the J part matches the reference; the penalty value is beta h K (not beta/2 h^2), so
    # compare values with beta = 0 and gradients always (gradient of the hinge term = beta h grad K).
    delta = 1e-3
    for seed in range(6):
        b, lp = random_case(seed)
        fn = DisCOLoss(score=score, variant=variant, tau=tau, delta=delta, beta=beta)
        x = lp.clone().requires_grad_(True)
        got = agg_loss(fn, x, b)
        got.backward()
        y = lp.clone().requires_grad_(True)
        ref = reference_objective(y, b, score, variant, tau, delta, beta)
        ref.backward()
        if beta == 0.0:
            assert_close(got, ref)
        assert_close(x.grad, y.grad)


def test_gradcheck_without_active_hinge():
    b, lp = random_case(2)
    fn = DisCOLoss(score="lratio", tau=1.0, beta=0.0)
    assert torch.autograd.gradcheck(lambda z: agg_loss(fn, z, b), (lp.clone().requires_grad_(True),))


def test_groupwise_microbatch_invariance_without_penalty():
    g = torch.Generator().manual_seed(4)
    groups = torch.arange(4).repeat_interleave(3)
    mask = random_mask(g, 12, 4)
    old = -torch.rand(12, 4, generator=g, dtype=F64)
    b = batch(torch.randint(0, 2, (12,), generator=g).to(F64), groups, mask, old)
    lp = old + 0.3 * torch.randn(12, 4, generator=g, dtype=F64)
    fn = DisCOLoss(beta=0.0)
    full = fn(lp, b).per_token
    for n in (2, 4):
        parts = torch.arange(12).tensor_split(n)
        assert_close(torch.cat([fn(lp[i], b.select(i)).per_token for i in parts]), full)


def test_config_errors():
    with pytest.raises(ConfigError, match="loss.score"):
        from_config(DisCOLoss, score="logp")
    with pytest.raises(ConfigError, match="loss.variant"):
        from_config(DisCOLoss, variant="b")
    with pytest.raises(ConfigError, match="loss.tau"):
        from_config(DisCOLoss, tau=0.0)
    with pytest.raises(ConfigError, match="loss.delta"):
        from_config(DisCOLoss, delta=-1.0)
    with pytest.raises(ConfigError, match="loss.beta"):
        from_config(DisCOLoss, beta=-1.0)
