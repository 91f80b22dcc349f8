"""OTR (arXiv:2509.26313): l_t = -(1/K) sum_k R(a_k) log pi(a_k|s_t), R = 1 if a_k = y*_t else beta."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.loss.otr import OTRLoss
from factories import from_config, make_batch, random_mask

F64 = torch.float64


def batch_with(targets, cand, mask):
    targets = torch.as_tensor(targets)
    b = make_batch([0.0] * targets.shape[0], None, mask, dtype=F64)
    return b.replace(response_ids=targets, extras={"candidate_ids": torch.as_tensor(cand)})


def loss_on(fn, b, cand_lp, lp=None):
    lp = torch.zeros(b.response_ids.shape, dtype=F64) if lp is None else lp
    return fn(lp, b.replace(extras={**b.extras, "candidate_logprobs": cand_lp}))


def test_hand_case():
    # One position, y* = 3, K = 4 samples [3, 3, 5, 7] with log pi = [-0.5, -0.5, -1, -2], beta = -0.1:
    #   l = -(1/4) [1(-0.5) + 1(-0.5) + (-0.1)(-1) + (-0.1)(-2)] = -(1/4)(-1 + 0.3) = 0.175
    #   d l / d log pi(a_k) = -R_k / K = [-0.25, -0.25, 0.025, 0.025]
    # Second position is padding: 0 loss, 0 gradient.
    b = batch_with([[3, 0]], [[[3, 3, 5, 7], [0, 0, 0, 0]]], [[1, 0]])
    cand_lp = torch.tensor([[[-0.5, -0.5, -1.0, -2.0], [-9.0, -9.0, -9.0, -9.0]]], dtype=F64, requires_grad=True)
    out = loss_on(OTRLoss(beta=-0.1), b, cand_lp)
    assert_close(out.per_token.detach(), torch.tensor([[0.175, 0.0]], dtype=F64))
    out.per_token.sum().backward()
    assert_close(cand_lp.grad, torch.tensor([[[-0.25, -0.25, 0.025, 0.025], [0.0] * 4]], dtype=F64))
    assert_close(out.metrics["loss/candidate_hit_rate"], torch.tensor(0.5, dtype=F64))


def expected_grad(logits, y, beta, T_s=1.0):
    """Exact E_{a ~ Pi'}[grad_z l] by enumeration: one K=1 loss per vocabulary entry, weighted by Pi'(a)."""
    V = logits.numel()
    pi_s = torch.softmax(logits / T_s, -1)
    total = torch.zeros(V, dtype=F64)
    for a in range(V):
        z = logits.clone().requires_grad_(True)
        b = batch_with([[y]], [[[a]]], [[1]])
        loss_on(OTRLoss(beta=beta), b, torch.log_softmax(z, -1)[a].view(1, 1, 1)).per_token.sum().backward()
        total += pi_s[a] * z.grad
    return total


def test_card_a_expectation_is_scaled_sft_gradient():
    # vocab 3, logits [2, 0, 0], T_s = 1, y* = 0 -> Pi'(y*) = e^2 / (e^2 + 2) = 0.78699; with beta = 0 the expected
    # gradient is 0.787 x the SFT gradient d(-log pi(0))/dz = pi - e_0.
    z = torch.tensor([2.0, 0.0, 0.0], dtype=F64)
    pi = torch.softmax(z, -1)
    assert float(pi[0]) == pytest.approx(0.78699, abs=1e-5)
    sft = pi - torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    assert_close(expected_grad(z, 0, 0.0), float(pi[0]) * sft)
    # Monte Carlo with K = 256 samples per draw, averaged over 200 draws, matches within sampling error.
    g = torch.Generator().manual_seed(0)
    zz = z.clone().requires_grad_(True)
    cand = torch.multinomial(pi.expand(200, 3), 256, replacement=True, generator=g)  # (200, 256)
    b = batch_with(torch.zeros(200, 1, dtype=torch.long), cand[:, None, :], torch.ones(200, 1, dtype=torch.bool))
    cand_lp = torch.log_softmax(zz, -1)[cand][:, None, :]
    (loss_on(OTRLoss(beta=0.0), b, cand_lp).per_token.sum() / 200).backward()
    assert_close(zz.grad, float(pi[0]) * sft, atol=0.01, rtol=0)


def test_card_b_beta_is_a_baseline_at_unit_temperature():
    # T_s = 1: E[grad] with beta = -0.1 equals (1 - beta) = 1.1 times E[grad] with beta = 0.
    z = torch.tensor([0.3, -1.0, 0.8, 0.1], dtype=F64)
    assert_close(expected_grad(z, 2, -0.1), 1.1 * expected_grad(z, 2, 0.0))
    # With T_s != 1 the identity does not hold.
    assert not torch.allclose(expected_grad(z, 2, -0.1, T_s=2.0), 1.1 * expected_grad(z, 2, 0.0, T_s=2.0))


def test_card_c_sampled_wrong_token_is_pushed_down():
    z = torch.tensor([0.5, 0.0, -0.5], dtype=F64, requires_grad=True)
    b = batch_with([[0]], [[[2, 2]]], [[1]])  # both samples wrong (token 2)
    loss_on(OTRLoss(beta=-0.1), b, torch.log_softmax(z, -1)[[2, 2]].view(1, 1, 2)).per_token.sum().backward()
    assert z.grad[2] > 0  # a gradient-descent step lowers the logit of the sampled wrong token


def reference(targets, cand, cand_lp, mask, beta):
    B, T, K = cand.shape
    out = torch.zeros(B, T, dtype=F64)
    for i in range(B):
        for t in range(T):
            if mask[i, t]:
                out[i, t] = -sum((1.0 if cand[i, t, k] == targets[i, t] else beta) * cand_lp[i, t, k]
                                 for k in range(K)) / K
    return out


@pytest.mark.parametrize("seed", range(4))
def test_matches_loop_reference_and_gradcheck(seed):
    g = torch.Generator().manual_seed(seed)
    B, T, K, V = 3, 4, 5, 4
    mask = random_mask(g, B, T)
    targets = torch.randint(0, V, (B, T), generator=g)
    cand = torch.randint(0, V, (B, T, K), generator=g)
    cand_lp = -torch.rand(B, T, K, generator=g, dtype=F64) * 3
    b = batch_with(targets, cand, mask)
    fn = OTRLoss(beta=-0.2)
    assert_close(loss_on(fn, b, cand_lp).per_token, reference(targets, cand, cand_lp, mask, -0.2))
    torch.autograd.gradcheck(lambda x: loss_on(fn, b, x).per_token, (cand_lp.clone().requires_grad_(),))


def test_without_candidates_is_probability_weighted_sft():
    b = make_batch([0.0], None, [[1, 1]], dtype=F64)
    lp = torch.tensor([[-0.5, -2.0]], dtype=F64, requires_grad=True)
    out = OTRLoss()(lp, b)
    out.per_token.sum().backward()
    assert_close(lp.grad, -lp.detach().exp())  # d/dlp of -sg(pi) log pi = -pi


@pytest.mark.parametrize("beta", [0.1, -1.5])
def test_validation(beta):
    with pytest.raises(ConfigError, match="loss.beta"):
        from_config(OTRLoss, beta=beta)
