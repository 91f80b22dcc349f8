"""VCPO (arXiv:2602.17616): l_t = -sg(w'_i) A_i log pi(y_t), w'_i = min(pi/mu, c) per sequence,
A_i = R_i - b*_q, b*_q = sum w'^2 G R / sum w'^2 G; ESS step factor sqrt(min(1, ESS / B))."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.aggregate import SeqMeanTokenMean
from lmpo.methods.loss.vcpo import VCPOLoss
from factories import from_config, make_batch, random_groups, random_mask

F64 = torch.float64
IS_PG = functools.partial(VCPOLoss, form="is_pg", grad_norm="tokens")  # the paper's written form, lmpo's old default


def batch(rewards, groups, mask, mu):
    b = make_batch(rewards, groups, mask, advantages=torch.zeros(mask.shape), dtype=F64)
    return b.replace(sampler_logprobs=mu)


def run(loss_fn, lp, b):
    x = lp.clone().requires_grad_(True)
    out = loss_fn(x, b)
    out.per_token.sum().backward()
    return out.per_token.detach(), x.grad, out.metrics


def test_hand_card_baseline():
    # Card (b): R = [1, 0], w = [1, 2], equal gradient norms -> b* = (1*1 + 4*0) / (1 + 4) = 0.2 (group mean: 0.5).
    # One token per row: logp - mu = [0, ln 2]. No std scaling: A = [0.8, -0.2];
    #   l = -w A logp = [-0.8 * lp0, 0.4 * lp1], grad = -w A = [-0.8, 0.4].
    mask = torch.ones(2, 1, dtype=torch.bool)
    mu = torch.tensor([[-1.0], [-2.0]], dtype=F64)
    lp = mu + torch.tensor([[0.0], [math.log(2)]], dtype=F64)
    b = batch([1.0, 0.0], [5, 5], mask, mu)
    loss, grad, m = run(IS_PG(grad_norm="equal", norm_by_std=False), lp, b)
    assert_close(grad, torch.tensor([[-0.8], [0.4]], dtype=F64))
    assert_close(loss, torch.tensor([[-0.8 * -1.0], [0.4 * (-2 + math.log(2))]], dtype=F64))
    # with std scaling: group std of [1, 0] (Bessel) = 0.70711 -> grads / (0.70711 + 1e-6)
    _, grad, _ = run(IS_PG(grad_norm="equal"), lp, b)
    assert_close(grad, torch.tensor([[-0.8], [0.4]], dtype=F64) / (math.sqrt(0.5) + 1e-6))
    # ESS of w = [1, 2]: 9 / 5 = 1.8 of 2 rows -> rho 0.9, sqrt -> 0.94868
    assert m["loss/ess_frac"].item() == pytest.approx(0.9)


def test_hand_token_proxy_and_truncation():
    # w = [1, 1], lengths [1, 3], R = [1, 0]: G = [1, 3] -> b* = 1 / 4 = 0.25; A = [0.75, -0.25] (no std)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    mu = -torch.ones(2, 3, dtype=F64)
    _, grad, _ = run(IS_PG(norm_by_std=False), mu.clone(), batch([1.0, 0.0], [0, 0], mask, mu))
    assert_close(grad, torch.tensor([[-0.75, 0, 0], [0.25, 0.25, 0.25]], dtype=F64))
    # truncation: w = [16, 1] -> w' = [8, 1]; equal norms: b* = (64 * 1 + 0) / 65; A0 = 1/65, A1 = -64/65
    #   grad = -w' A = [-8/65, 64/65]
    m1 = torch.ones(2, 1, dtype=torch.bool)
    mu1 = torch.tensor([[-3.0], [-1.0]], dtype=F64)
    lp1 = mu1 + torch.tensor([[math.log(16)], [0.0]], dtype=F64)
    _, grad, m = run(IS_PG(grad_norm="equal", norm_by_std=False), lp1, batch([1.0, 0.0], [0, 0], m1, mu1))
    assert_close(grad, torch.tensor([[-8 / 65], [64 / 65]], dtype=F64))
    assert m["loss/is_trunc_frac"].item() == 0.5


def test_baseline_is_group_mean_when_weights_equal():
    # on-policy (w = 1) with equal lengths the optimal baseline is the group mean: GRPO's advantage.
    g = torch.Generator().manual_seed(1)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    r = torch.rand(6, generator=g, dtype=F64)
    mask = torch.ones(6, 2, dtype=torch.bool)
    mu = -torch.rand(6, 2, generator=g, dtype=F64)
    _, grad, m = run(IS_PG(norm_by_std=False), mu.clone(), batch(r, groups, mask, mu))
    mean = torch.stack([r[:3].mean()] * 3 + [r[3:].mean()] * 3)
    assert_close(grad, -(r - mean)[:, None].expand(6, 2))
    assert m["loss/ess_frac"].item() == pytest.approx(1.0)


def test_ess_step_scaling_accumulates_over_microbatches():
    # card (a): equal weights -> factor 1. w = [4, 1, 1, 1]: ESS = 49 / 19, rho = 49 / 76, sqrt -> 0.80296;
    # linear -> 0.64474. Split into two calls, the factor is the same; after the optimizer step it resets to 1.
    mask = torch.ones(4, 1, dtype=torch.bool)
    mu = torch.full((4, 1), -2.0, dtype=F64)
    lp = mu + torch.tensor([[math.log(4)], [0.0], [0.0], [0.0]], dtype=F64)
    b = batch([1.0, 0.0, 1.0, 0.0], [0, 0, 1, 1], mask, mu)
    for rule, expect in (("sqrt", math.sqrt(49 / 76)), ("linear", 49 / 76)):
        fn = IS_PG(ess_rule=rule)
        fn(lp[:2], b.select(torch.arange(2)))
        fn(lp[2:], b.select(torch.arange(2, 4)))
        assert fn.lr_scale() == pytest.approx(expect)
        fn.after_optimizer_step()
        assert fn.lr_scale() == 1.0
    fn = IS_PG()
    fn(mu.clone(), b)  # equal weights
    assert fn.lr_scale() == pytest.approx(1.0)
    fn.after_optimizer_step()
    # weights ~[1, 0, 0, 0] (log w = -20 for three rows): ESS -> 1, rho 0.25, factor 0.5
    fn(mu + torch.tensor([[0.0], [-20.0], [-20.0], [-20.0]], dtype=F64), b)
    assert fn.lr_scale() == pytest.approx(0.5, rel=1e-6)
    assert IS_PG(ess_rule="none").lr_scale() == 1.0
    state = fn.state_dict()
    fresh = IS_PG()
    fresh.load_state_dict(state)
    assert fresh.lr_scale() == fn.lr_scale()


def loop_vcpo(lp, mu, mask, r, groups, c, proxy, norm_by_std, eps):
    B, T = len(lp), len(lp[0])
    w = []
    for i in range(B):
        w.append(min(math.exp(sum(lp[i][t] - mu[i][t] for t in range(T) if mask[i][t])), c))
    G = [sum(mask[i]) if proxy == "tokens" else 1.0 for i in range(B)]
    grad = [[0.0] * T for _ in range(B)]
    for i in range(B):
        mem = [j for j in range(B) if groups[j] == groups[i]]
        b = sum(w[j] ** 2 * G[j] * r[j] for j in mem) / sum(w[j] ** 2 * G[j] for j in mem)
        a = r[i] - b
        if norm_by_std:
            mean = sum(r[j] for j in mem) / len(mem)
            std = math.sqrt(sum((r[j] - mean) ** 2 for j in mem) / (len(mem) - 1)) if len(mem) > 1 else 0.0
            a = a / (std + eps)
        for t in range(T):
            if mask[i][t]:
                grad[i][t] = -w[i] * a
    return torch.tensor(grad, dtype=F64)


@pytest.mark.parametrize("proxy, norm_by_std, c",
                         [("tokens", True, 8.0), ("equal", False, 1.5), ("tokens", False, 8.0)])
def test_matches_loop_reference(proxy, norm_by_std, c):
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        groups = random_groups(g)
        B = groups.numel()
        T = int(torch.randint(1, 6, (1,), generator=g))
        mask = random_mask(g, B, T)
        r = torch.randint(0, 2, (B,), generator=g).to(F64)
        mu = -torch.rand(B, T, generator=g, dtype=F64) * 2
        lp = mu + torch.randn(B, T, generator=g, dtype=F64) * 0.4
        b = batch(r, groups, mask, mu)
        fn = IS_PG(grad_norm=proxy, norm_by_std=norm_by_std, is_threshold=c)
        loss, grad, _ = run(fn, lp, b)
        ref = loop_vcpo(lp.tolist(), mu.tolist(), mask.tolist(), r.tolist(), groups.tolist(), c, proxy,
                        norm_by_std, 1e-6)
        assert_close(grad, ref)
        assert_close(loss, torch.where(mask, ref * lp, torch.zeros((), dtype=F64)))  # l = (-w A) * logp
        # through the aggregator: d/dlogp = -w' A / (|y_i| N_rows), the paper's (1/B) sum_i w'_i A_i grad of the
        # token-mean log-likelihood
        x = lp.clone().requires_grad_(True)
        agg = SeqMeanTokenMean()
        agg(fn(x, b).per_token, mask, agg.normaliser(mask, 0)).backward()
        assert_close(x.grad, ref / mask.sum(-1, keepdim=True) / B)


def test_extras_grad_norms_override_proxy():
    # supplied ||g||^2 = [3, 1] with w = 1, R = [1, 0]: b* = 3/4 -> A = [0.25, -0.75]
    mask = torch.ones(2, 1, dtype=torch.bool)
    mu = -torch.ones(2, 1, dtype=F64)
    b = batch([1.0, 0.0], [0, 0], mask, mu)
    b = b.replace(extras={"grad_sq_norm": torch.tensor([3.0, 1.0], dtype=F64)})
    _, grad, _ = run(IS_PG(norm_by_std=False), mu.clone(), b)
    assert_close(grad, torch.tensor([[-0.25], [0.75]], dtype=F64))


def test_config_errors_and_needs():
    with pytest.raises(ConfigError, match="loss.is_threshold"):
        from_config(VCPOLoss, is_threshold=0.0)
    with pytest.raises(ConfigError, match="loss.ess_rule"):
        from_config(VCPOLoss, ess_rule="cbrt")
    with pytest.raises(ConfigError, match="loss.grad_norm"):
        from_config(VCPOLoss, grad_norm="fisher")
    with pytest.raises(ConfigError, match="loss.form"):
        from_config(VCPOLoss, form="grpo")
    with pytest.raises(ConfigError, match="loss.ess_base"):
        from_config(VCPOLoss, ess_base=0.0)
    with pytest.raises(ConfigError, match="loss.behaviour"):
        from_config(VCPOLoss, behaviour="ref")
    assert VCPOLoss().needs == frozenset({"old_logprobs"}) and VCPOLoss(form="is_pg").needs == frozenset()
    assert VCPOLoss(form="is_pg", behaviour="old").needs == frozenset({"old_logprobs"})


# --------------------------------------------------------------------------- the released code's form (issue 21)
def test_hand_exact_gradient_norms_released_form():
    # A one-parameter policy: log pi(y_it) = base_it + theta x_it, at theta = 0 (= pi_old: ratio 1).
    # Rows (one group, R = [1, 0, 0]): x = [1, 1] | [3] | [0.5, 0.5, 0.5]; w = pi_old / mu = [2, 1, 1] (< c = 8).
    # Unit-advantage loss of row i: -w'_i sum_t pi/pi_old, so g_i = w'_i sum_t x_it = [4, 3, 1.5]:
    #   ||g||^2 = [16, 9, 2.25]; W = ||g||^2 w^2 = [64, 9, 2.25] -> b* = 64 / 75.25 = 0.850498
    #   (the length stand-in would give W = w'^2 L w^2 = [32, 1, 3] -> b* = 0.8889)
    #   A = (R - b*) / (std + 1e-6), std = sqrt(1/3) (Bessel)
    # seq-mean-token-mean gradient in theta: (1/3) sum_i (1/L_i) sum_t (-A_i w'_i x_it)
    #   = (1/3) (-2 A_0 - 3 A_1 - 0.5 A_2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    x = torch.tensor([[1.0, 1.0, 0.0], [3.0, 0.0, 0.0], [0.5, 0.5, 0.5]], dtype=F64)
    base = -torch.rand(3, 3, generator=torch.Generator().manual_seed(0), dtype=F64) - 0.5
    mu = base.clone()
    mu[0, 0] -= math.log(2)  # w_0 = 2
    b = make_batch([1.0, 0.0, 0.0], [7, 7, 7], mask, advantages=torch.zeros(3, 3), old_logprobs=base, dtype=F64)
    b = b.replace(sampler_logprobs=mu)
    theta = torch.zeros((), dtype=F64, requires_grad=True)
    fn = VCPOLoss()
    out = fn(base + theta * x, b)
    bstar = 64 / 75.25
    std = math.sqrt(1 / 3) + 1e-6
    A = [(1 - bstar) / std, -bstar / std, -bstar / std]
    want = torch.tensor([[-2 * A[0]] * 2 + [0.0], [-A[1], 0.0, 0.0], [-A[2]] * 3], dtype=F64)
    assert_close(out.per_token.detach(), want)
    agg = SeqMeanTokenMean()
    agg(out.per_token, mask, agg.normaliser(mask, 0)).backward()
    assert theta.grad.item() == pytest.approx((-2 * A[0] - 3 * A[1] - 0.5 * A[2]) / 3, rel=1e-9)
    assert out.metrics["loss/ess_frac"].item() == pytest.approx(16 / 6 / 3)  # (2+1+1)^2 / (4+1+1) / 3


def test_exact_norms_match_a_per_trajectory_loop_on_a_softmax_policy():
    # A linear softmax policy (vocabulary 5, features 4) off pi_old and mu; the reference does what the released
    # code does: one backward per trajectory for g_i, then b* from ||g_i||^2 w_i^2, then sum_i A_i g_i / (B L_i).
    g = torch.Generator().manual_seed(3)
    B, T, V, D = 6, 4, 5, 4
    feats = torch.randn(B, T, D, generator=g, dtype=F64)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = random_mask(g, B, T)
    W0 = torch.randn(D, V, generator=g, dtype=F64) * 0.5

    def logprobs(W):
        return torch.log_softmax(feats @ W, -1).gather(-1, ids[..., None])[..., 0]

    old = logprobs(W0).detach() + 0.05 * torch.randn(B, T, generator=g, dtype=F64)
    mu = old - 0.4 * torch.rand(B, T, generator=g, dtype=F64)
    r = torch.randint(0, 2, (B,), generator=g).to(F64)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    b = make_batch(r, groups, mask, advantages=torch.zeros(B, T), old_logprobs=old, dtype=F64)
    b = b.replace(sampler_logprobs=mu)
    W = W0.clone().requires_grad_(True)
    fn = VCPOLoss(is_threshold=1.3)
    agg = SeqMeanTokenMean()
    agg(fn(logprobs(W), b).per_token, mask, agg.normaliser(mask, 0)).backward()
    # reference
    gs, ws = [], []
    for i in range(B):
        Wi = W0.clone().requires_grad_(True)
        lp = logprobs(Wi)[i]
        w = math.exp(sum(float(old[i, t] - mu[i, t]) for t in range(T) if mask[i, t]))
        wc = min(w, 1.3)
        unit = sum(-wc * torch.exp(lp[t] - old[i, t]) for t in range(T) if mask[i, t])
        (gi,) = torch.autograd.grad(unit, Wi)
        gs.append(gi)
        ws.append(w)
    want = torch.zeros_like(W0)
    for i in range(B):
        mem = [j for j in range(B) if int(groups[j]) == int(groups[i])]
        lam = [float((gs[j] ** 2).sum()) * ws[j] ** 2 for j in mem]
        bstar = sum(l * float(r[j]) for l, j in zip(lam, mem)) / sum(lam)
        mean = sum(float(r[j]) for j in mem) / len(mem)
        std = math.sqrt(sum((float(r[j]) - mean) ** 2 for j in mem) / (len(mem) - 1))
        A = (float(r[i]) - bstar) / (std + 1e-6)
        want += A * gs[i] / (B * int(mask[i].sum()))
    assert_close(W.grad, want)
