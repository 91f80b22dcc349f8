"""DPPO (arXiv:2602.04879): l_t = -A sg(min(r, C)) log pi M_t with M_t the binary TV / KL trust-region mask."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.loss.dppo import DPPOLoss, binary_divergence
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from factories import from_config, make_batch

F64 = torch.float64


def run(loss_fn, p, p_old, adv):
    lp = torch.tensor(p, dtype=F64).log().requires_grad_(True)
    old = torch.tensor(p_old, dtype=F64).log()
    B, T = lp.shape
    a = torch.tensor(adv, dtype=F64)[:, None].expand(B, T).clone()
    b = make_batch([0.0] * B, None, torch.ones(B, T, dtype=torch.bool), advantages=a, old_logprobs=old, dtype=F64)
    out = loss_fn(lp, b)
    out.per_token.sum().backward()
    return out.per_token.detach(), lp.grad, out.metrics


def test_hand_case_tv():
    # delta 0.15; A = +1: p_old -> p: 0.5 -> 0.6 (+0.1, kept), 0.5 -> 0.7 (+0.2, masked), 0.9 -> 0.5 (fell, kept)
    #   kept tokens: l = -A r log p with r detached: -1.2 log 0.6 and -(5/9) log 0.5; gradient -A r = -1.2, -5/9
    loss, grad, m = run(DPPOLoss(delta_low=0.15), [[0.6, 0.7, 0.5]], [[0.5, 0.5, 0.9]], [1.0])
    assert_close(loss, torch.tensor([[-1.2 * math.log(0.6), 0.0, -(5 / 9) * math.log(0.5)]], dtype=F64))
    assert_close(grad, torch.tensor([[-1.2, 0.0, -5 / 9]], dtype=F64))
    assert_close(m["loss/clip_frac"], torch.tensor(1 / 3))
    # A = -1: the fallen token (0.9 -> 0.5, -0.4) leaves the region on the A <= 0 side; the risen ones are kept
    _, grad, _ = run(DPPOLoss(delta_low=0.15), [[0.6, 0.7, 0.5]], [[0.5, 0.5, 0.9]], [-1.0])
    assert_close(grad, torch.tensor([[1.2, 1.4, 0.0]], dtype=F64))


def test_hand_binary_kl():
    # p_old = 0.5, p = 0.6: KL = 0.5 log(0.5/0.6) + 0.5 log(0.5/0.4) = 0.5 log(25/24) = 0.020411
    d = binary_divergence(torch.tensor([math.log(0.6)], dtype=F64), torch.tensor([math.log(0.5)], dtype=F64), "kl")
    assert abs(d.item() - 0.5 * math.log(25 / 24)) < 1e-6
    # with delta 0.01 it is outside the region for A > 0 (p rose), inside for A < 0 (the direction that does not push)
    _, g_pos, _ = run(DPPOLoss(divergence="kl", delta_low=0.01), [[0.6]], [[0.5]], [1.0])
    _, g_neg, _ = run(DPPOLoss(divergence="kl", delta_low=0.01), [[0.6]], [[0.5]], [-1.0])
    assert g_pos.item() == 0.0 and abs(g_neg.item() - 1.2) < 1e-12


def test_card_property_rare_tokens_are_not_over_restricted():
    # A rare token whose probability goes 0.001 -> 0.01 (ratio 10) is far outside PPO's clip (zero gradient) but
    # moved only 0.009 in TV: DPPO keeps its gradient. A frequent token 0.5 -> 0.7 (ratio 1.4) is also clipped by
    # PPO, and DPPO masks it too (0.2 > 0.15): the region follows the probability mass, not the ratio.
    p, p_old = [[0.01, 0.7]], [[0.001, 0.5]]
    _, g_dppo, _ = run(DPPOLoss(delta_low=0.15), p, p_old, [1.0])
    _, g_ppo, _ = run(PPOClipLoss(epsilon=0.2), p, p_old, [1.0])
    assert g_ppo[0, 0].item() == 0.0 and g_dppo[0, 0].item() != 0.0
    assert g_ppo[0, 1].item() == 0.0 and g_dppo[0, 1].item() == 0.0
    # the truncation: a ratio of 10 weighs min(10, C)
    _, g_cap, _ = run(DPPOLoss(delta_low=0.15, is_cap=4.0), p, p_old, [1.0])
    assert abs(g_cap[0, 0].item() + 4.0) < 1e-9


@pytest.mark.parametrize("kind", ["tv", "kl"])
def test_matches_loop_reference(kind):
    g = torch.Generator().manual_seed(7)
    p = torch.rand(4, 5, generator=g, dtype=F64) * 0.9 + 0.05
    p_old = (p + torch.randn(4, 5, generator=g, dtype=F64) * 0.2).clamp(0.02, 0.98)
    adv = torch.randn(4, generator=g, dtype=F64)
    lo, hi = (0.1, 0.12) if kind == "tv" else (0.02, 0.03)
    loss, _, _ = run(DPPOLoss(divergence=kind, delta_low=lo, delta_high=hi), p.tolist(), p_old.tolist(), adv.tolist())
    for i in range(4):
        for t in range(5):
            a, q, q0 = adv[i].item(), p[i, t].item(), p_old[i, t].item()
            if kind == "tv":
                keep = (q - q0 <= hi) if a > 0 else (q - q0 >= -lo)
            else:
                kl = q0 * math.log(q0 / q) + (1 - q0) * math.log((1 - q0 + 1e-8) / (1 - q + 1e-8))
                keep = (kl <= hi or q <= q0) if a > 0 else (kl <= lo or q >= q0)
            exp = -a * min(q / q0, 20.0) * math.log(q) if keep else 0.0
            assert abs(loss[i, t].item() - exp) < 1e-9, (i, t)


def test_config_errors():
    with pytest.raises(ConfigError, match="loss.divergence"):
        from_config(DPPOLoss, divergence="js")
    with pytest.raises(ConfigError, match="loss.delta_low"):
        from_config(DPPOLoss, delta_low=0.0)
