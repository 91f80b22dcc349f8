"""SofT-GRPO (arXiv:2511.06411): soft steps use ell = mean_i(-eps_i - exp(-eps_i)), eps_i = clamp(z_i - log p_i,
-1.5, 3) over stored ids with log p_i > -3 (log p renormalised over the stored set); discrete tokens use log pi."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from lmpo.methods.loss.soft_grpo import SoftGRPOLoss, soft_step_loglik
from lmpo.rollout.soft import gumbel_loglik
from factories import from_config, make_batch, random_mask

F64 = torch.float64


def test_card_b_gumbel_density():
    # eps = 0 -> -0 - e^0 = -1;  eps = 1 -> -1 - e^-1 = -1.36788; raising log p by 1 (eps 1 -> 0) gives ratio e^0.368
    valid = torch.tensor([True])
    assert_close(gumbel_loglik(torch.tensor([-1.0], dtype=F64), torch.tensor([-1.0], dtype=F64), valid),
                 torch.tensor(-1.0, dtype=F64))
    lo = gumbel_loglik(torch.tensor([0.0], dtype=F64), torch.tensor([-1.0], dtype=F64), valid)
    assert float(lo) == pytest.approx(-1 - math.exp(-1), abs=1e-12)
    assert math.exp(-1.0 - float(lo)) == pytest.approx(1.4447, abs=1e-4)
    # clamp: eps = 5 -> 3;  an id with log p <= -3 is ignored
    two = gumbel_loglik(torch.tensor([4.0, 0.0], dtype=F64), torch.tensor([-1.0, -3.5], dtype=F64),
                        torch.tensor([True, True]))
    assert float(two) == pytest.approx(-3 - math.exp(-3), abs=1e-12)


def test_hand_soft_step_renormalises_over_stored_set():
    # Stored ids with log pi = [log 0.3, log 0.1, -] (third not in the set): renormalised log p = [log .75, log .25].
    # z = [log .75 + 0.5, log .25 - 0.2] -> eps = [0.5, -0.2] -> ell = mean(-0.5 - e^-0.5, 0.2 - e^0.2)
    cand = torch.tensor([[math.log(0.3), math.log(0.1), -0.7]], dtype=F64)
    z = torch.tensor([[math.log(0.75) + 0.5, math.log(0.25) - 0.2, 0.0]], dtype=F64)
    valid = torch.tensor([[True, True, False]])
    want = ((-0.5 - math.exp(-0.5)) + (0.2 - math.exp(0.2))) / 2
    assert float(soft_step_loglik(cand, z, valid, -1.5, 3.0)[0]) == pytest.approx(want, abs=1e-12)


def soft_batch(seed, B=3, T=4, k=3):
    g = torch.Generator().manual_seed(seed)
    mask = random_mask(g, B, T, holes=False)
    b = make_batch([0.0] * B, None, mask, advantages=torch.randn(B, T, generator=g, dtype=F64) * mask,
                   old_logprobs=-torch.rand(B, T, generator=g, dtype=F64), dtype=F64)
    soft = (torch.rand(B, T, generator=g) < 0.6) & mask
    valid = torch.rand(B, T, k, generator=g) < 0.8
    valid[..., 0] = True
    old_cand = torch.log_softmax(torch.randn(B, T, k, generator=g, dtype=F64), -1)
    z = torch.where(valid, old_cand + torch.randn(B, T, k, generator=g, dtype=F64), 0.0)
    ex = {"soft_mask": soft, "soft_valid": valid, "soft_logits": z, "old_candidate_logprobs": old_cand,
          "candidate_ids": torch.zeros(B, T, k, dtype=torch.long)}
    cand = old_cand + 0.3 * torch.randn(B, T, k, generator=g, dtype=F64)
    lp = b.old_logprobs + 0.2 * torch.randn(B, T, generator=g, dtype=F64)
    return b.replace(extras=ex), cand, lp


def ell_reference(cand, z, valid):
    out = torch.zeros(cand.shape[:2], dtype=F64)
    for i in range(cand.shape[0]):
        for t in range(cand.shape[1]):
            ids = [j for j in range(cand.shape[2]) if valid[i, t, j]]
            norm = math.log(sum(math.exp(float(cand[i, t, j])) for j in ids))
            terms = []
            for j in ids:
                lp = float(cand[i, t, j]) - norm
                if lp > -3:
                    eps = min(max(float(z[i, t, j]) - lp, -1.5), 3.0)
                    terms.append(-eps - math.exp(-eps))
            out[i, t] = sum(terms) / len(terms) if terms else 0.0
    return out


@pytest.mark.parametrize("seed", range(4))
def test_matches_loop_reference(seed):
    b, cand, lp = soft_batch(seed)
    ex = b.extras
    ell = torch.where(ex["soft_mask"], ell_reference(cand, ex["soft_logits"], ex["soft_valid"]), lp)
    ell_old = torch.where(ex["soft_mask"], ell_reference(ex["old_candidate_logprobs"], ex["soft_logits"],
                                                         ex["soft_valid"]), b.old_logprobs)
    r = torch.exp(ell - ell_old)
    A = b.advantages
    want = torch.maximum(-A * r, -A * r.clamp(0.8, 1.2)) * b.response_mask
    out = SoftGRPOLoss()(lp, b.replace(extras={**ex, "candidate_logprobs": cand})).per_token
    assert_close(out, want)


def test_gradcheck_through_candidates_and_tokens():
    b, cand, lp = soft_batch(7)
    fn = SoftGRPOLoss(epsilon=10.0)  # wide clip: the gradient is the plain ratio gradient everywhere
    f = lambda c, l: fn(l, b.replace(extras={**b.extras, "candidate_logprobs": c})).per_token  # noqa: E731
    torch.autograd.gradcheck(f, (cand.clone().requires_grad_(), lp.clone().requires_grad_()))


def test_card_a_discrete_steps_are_ppo_clip():
    b, cand, lp = soft_batch(3)
    ex = {**b.extras, "soft_mask": torch.zeros_like(b.response_mask), "candidate_logprobs": cand}
    assert_close(SoftGRPOLoss()(lp, b.replace(extras=ex)).per_token, PPOClipLoss()(lp, b).per_token)


@pytest.mark.parametrize("kw", [{"epsilon": 0.0}, {"gumbel_min": 3.0}])
def test_validation(kw):
    with pytest.raises(ConfigError, match="loss\\."):
        from_config(SoftGRPOLoss, **kw)
