"""r-to-Q* (arXiv:2404.12358): per-token implicit rewards beta (log pi - log pi_ref) as credit; they sum to DPO's
sequence implicit reward."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lmpo.batch import PreferenceBatch
from lmpo.methods.advantage.grpo import GRPOAdvantage
from lmpo.methods.advantage.r2q import ImplicitQCredit, token_implicit_rewards
from lmpo.methods.base import PairLogps
from lmpo.methods.preference.dpo import implicit_rewards
from factories import from_config, make_batch, random_mask

F64 = torch.float64


def batch(rewards, groups, mask, lp, ref):
    return make_batch(rewards, groups, mask, dtype=F64).replace(sampler_logprobs=lp, ref_logprobs=ref)


def test_hand_case_token_and_to_go():
    # beta = 0.5; log pi - log pi_ref = [0.2, -0.4, 1.0] on a 3-token response, [0.6, pad] on a 1-token one:
    #   token credit: [0.1, -0.2, 0.5] and [0.3, 0]; to go: [0.4, 0.3, 0.5] and [0.3, 0].
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    ref = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -9.0, -9.0]], dtype=F64)
    lp = ref + torch.tensor([[0.2, -0.4, 1.0], [0.6, 5.0, 5.0]], dtype=F64)  # garbage on padding
    b = batch([1.0, 0.0], [0, 1], mask, lp, ref)
    tok = from_config(ImplicitQCredit, beta=0.5, base=None)(b)
    assert_close(tok, torch.tensor([[0.1, -0.2, 0.5], [0.3, 0.0, 0.0]], dtype=torch.float32))
    togo = from_config(ImplicitQCredit, beta=0.5, base=None, credit="to_go")(b)
    assert_close(togo, torch.tensor([[0.4, 0.3, 0.5], [0.3, 0.0, 0.0]], dtype=torch.float32))


@pytest.mark.parametrize("seed", range(4))
def test_card_sum_equals_the_sequence_dpo_reward(seed):
    g = torch.Generator().manual_seed(seed)
    mask_c, mask_r = random_mask(g, 5, 6, holes=False), random_mask(g, 5, 6, holes=False)
    lp_c, lp_r, ref_c, ref_r = (-torch.rand(5, 6, generator=g, dtype=F64) * m for m in (mask_c, mask_r) * 2)
    pb = PreferenceBatch(torch.zeros(5, 1, dtype=torch.long), torch.zeros(5, 6, dtype=torch.long), mask_c,
                         torch.zeros(5, 6, dtype=torch.long), mask_r)
    chosen, rejected = implicit_rewards(pb, PairLogps(lp_c, lp_r), PairLogps(ref_c, ref_r), 0.3)
    assert_close(token_implicit_rewards(lp_c, ref_c, mask_c, 0.3).sum(-1), chosen)
    assert_close(token_implicit_rewards(lp_r, ref_r, mask_r, 0.3).sum(-1), rejected)
    # and the to-go credit at the first token is the whole sequence reward
    b = batch([0.0] * 5, list(range(5)), mask_c, lp_c, ref_c)
    togo = from_config(ImplicitQCredit, beta=0.3, base=None, credit="to_go")(b)
    assert_close(togo[:, 0].double(), chosen, rtol=1e-6, atol=1e-6)


def test_card_shared_prefix_gets_identical_credit():
    # y_w and y_l share their first 2 tokens (same log-probs there): equal credit on the prefix, so the DPO margin
    # depends only on the differing suffix.
    mask = torch.ones(2, 4, dtype=torch.bool)
    ref = torch.tensor([[-1.0, -0.5, -2.0, -1.0], [-1.0, -0.5, -0.1, -3.0]], dtype=F64)
    lp = torch.tensor([[-0.8, -0.9, -1.0, -0.2], [-0.8, -0.9, -0.7, -2.0]], dtype=F64)
    c = from_config(ImplicitQCredit, beta=0.2, base=None)(batch([1.0, 0.0], [0, 0], mask, lp, ref))
    assert_close(c[0, :2], c[1, :2])
    margin = c[0].sum() - c[1].sum()
    assert margin.item() == pytest.approx(0.2 * ((-1.0 + 2.0 - 0.2 + 1.0) - (-0.7 + 0.1 - 2.0 + 3.0)), abs=1e-6)


def test_base_advantage_is_added():
    g = torch.Generator().manual_seed(7)
    mask = random_mask(g, 6, 4)
    ref = -torch.rand(6, 4, generator=g, dtype=F64) * mask
    lp = -torch.rand(6, 4, generator=g, dtype=F64) * mask
    b = batch(torch.randn(6, generator=g, dtype=F64), [0, 0, 0, 1, 1, 1], mask, lp, ref)
    out = from_config(ImplicitQCredit, beta=0.1, coef=0.5)(b)
    expect = GRPOAdvantage()(b).double() + 0.5 * token_implicit_rewards(lp, ref, mask, 0.1)
    assert_close(out.double(), expect, rtol=1e-6, atol=1e-6)
    assert from_config(ImplicitQCredit).needs == {"ref_logprobs"}
