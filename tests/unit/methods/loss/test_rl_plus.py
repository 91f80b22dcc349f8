"""RL-PLUS (arXiv:2508.00222): the card's MIS ratios and exploration weights by hand, the on-policy-only baseline
(hand case and a loop reference), the loss without external rows (plain -A r), the gradient on external tokens,
and the guidance: one external trace per group with the policy's log-probs as behaviour."""

from __future__ import annotations

import math

import pytest
import torch

from lmpo.batch import RolloutBatch
from lmpo.errors import DataError
from lmpo.methods.loss.rl_plus import RLPlusAdvantage, RLPlusLoss
from lmpo.models.load import load_model
from lmpo.models.logprobs import response_logprobs
from lmpo.rollout.base import SamplingParams
from lmpo.rollout.hf import HFGenerator
from lmpo.train.guidance import Guide
from lmpo.train.rollouts import RolloutContext

from factories import exact_reward, make_batch, random_batch, token_loss_inputs


def test_mis_ratio_and_exploration_weight_by_hand():
    loss = RLPlusLoss()
    lp = torch.log(torch.tensor([0.2, 0.9, 1.0]))
    old = torch.log(torch.tensor([0.2, 0.1, 1e-12]))
    # 0.2 / (0.75 * 0.2 + 0.25) = 0.5; 0.9 / (0.075 + 0.25) = 2.769...; pi_old -> 0 bounds the ratio by 1 / 0.25 = 4
    assert torch.allclose(loss.mis_ratio(lp, old), torch.tensor([0.5, 0.9 / 0.325, 4.0]), atol=1e-6)
    # exploration weights (1 - pi)^0.5: pi = 0.99 -> 0.1, pi = 0.19 -> 0.9 (an already likely token gets 9x less)
    logr = torch.log(torch.tensor([[0.99, 0.19]], dtype=torch.float64)) + 1.0  # old = -1 in token_loss_inputs
    b, lpx = token_loss_inputs(logr, [1.0], old=-1.0, extras={"off_policy": torch.ones(1)})
    out = loss(lpx, b)
    r = loss.mis_ratio(lpx.detach(), b.old_logprobs)
    assert torch.allclose(out.per_token, -r * torch.tensor([[0.1, 0.9]], dtype=torch.float64))


def test_without_external_rows_it_is_unclipped_grpo_without_std():
    b = make_batch([0.0, 1.0, 1.0, 1.0], group_ids=[0, 0, 1, 1], T=2)
    adv = RLPlusAdvantage()(b)
    assert torch.allclose(adv[:, 0], torch.tensor([-0.5, 0.5, 0.0, 0.0]))
    logr = torch.tensor([[0.3, -0.2], [0.1, 0.0]], dtype=torch.float64)
    bb, lp = token_loss_inputs(logr, [2.0, -1.0])
    assert torch.allclose(RLPlusLoss()(lp, bb).per_token, -torch.tensor([[2.0], [-1.0]], dtype=torch.float64) * logr.exp())
    clipped = RLPlusLoss(epsilon=0.2)(lp, bb).per_token  # optional clip: max(-A r, -A clip(r))
    assert torch.isclose(clipped[0, 0], torch.tensor(-2.0 * 1.2, dtype=torch.float64))


def test_baseline_uses_on_policy_rows_only():
    # group 0: on-policy rewards 0, 1, 0 and an external row with 1 -> mean_on = 1/3
    b = make_batch([0.0, 1.0, 0.0, 1.0, 0.5, 0.5], group_ids=[0, 0, 0, 0, 1, 1], T=1)
    b = b.replace(extras={"off_policy": torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])})
    adv = RLPlusAdvantage()(b)[:, 0]
    # group 1 has only external rows: the mean of all its rows
    assert torch.allclose(adv, torch.tensor([-1 / 3, 2 / 3, -1 / 3, 2 / 3, 0.0, 0.0]))


@pytest.mark.parametrize("seed", range(4))
def test_baseline_matches_a_loop_reference(seed):
    b = random_batch(seed)
    g = torch.Generator().manual_seed(seed)
    off = (torch.rand(b.batch_size, generator=g) < 0.3).float()
    b = b.replace(extras={"off_policy": off})
    want = torch.zeros(b.batch_size)
    for i in range(b.batch_size):
        same = [j for j in range(b.batch_size) if b.group_ids[j] == b.group_ids[i]]
        on = [j for j in same if off[j] == 0] or same
        want[i] = b.rewards[i] - sum(float(b.rewards[j]) for j in on) / len(on)
    got = RLPlusAdvantage()(b)
    assert torch.allclose(got, torch.where(b.response_mask, want[:, None], 0.0), atol=1e-6)


def test_external_token_gradient():
    # l = -A w r_mis with w detached and r_mis = pi / (0.75 pi_old + 0.25): dl/dlogp = -A w r_mis
    logr = torch.tensor([[-0.4, 0.2]], dtype=torch.float64)
    b, lp = token_loss_inputs(logr, [1.5], old=-0.7, extras={"off_policy": torch.ones(1)})
    RLPlusLoss()(lp, b).per_token.sum().backward()
    p = lp.detach().exp()
    r = p / (0.75 * math.exp(-0.7) + 0.25)
    assert torch.allclose(lp.grad, -1.5 * (1 - p) ** 0.5 * r)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def test_guide_adds_one_external_trace_per_group_with_policy_behaviour(tiny):
    model, tok = tiny
    ctx = RolloutContext(generator=HFGenerator(model, tok), tokenizer=tok, reward_set=exact_reward,
                         params=SamplingParams(max_new_tokens=3), num_generations=3)
    rows = [{"prompt": "12=", "answer": "12", "solution": "12"}, {"prompt": "3=", "answer": "3", "solution": "4"}]
    B = 6
    batch = RolloutBatch(
        prompt_ids=torch.full((B, 3), 6), prompt_mask=torch.ones(B, 3, dtype=torch.bool),
        response_ids=torch.full((B, 2), 4), response_attn=torch.ones(B, 2, dtype=torch.bool),
        response_mask=torch.ones(B, 2, dtype=torch.bool), group_ids=torch.tensor([0, 0, 0, 1, 1, 1]),
        rewards=torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0]), sampler_logprobs=torch.full((B, 2), -1.0),
        reward_components=torch.zeros(B, 1), truncated=torch.zeros(B, dtype=torch.bool),
        meta=[{"prompt_key": rows[i // 3]["prompt"], "row": rows[i // 3]} for i in range(B)])
    out = RLPlusLoss().guide(Guide(ctx, 0), batch)
    assert out.extras["off_policy"].tolist() == [0, 0, 1, 0, 0, 1]  # the lowest-reward row of each group
    assert out.rewards.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]  # "12" answers 12=, "4" does not answer 3=
    ext = out.select(torch.tensor([2, 5]))
    want, _ = response_logprobs(model, ext.prompt_ids, ext.prompt_mask, ext.response_ids, ext.response_attn)
    assert torch.allclose(ext.sampler_logprobs, torch.where(ext.response_attn, want, 0.0), atol=1e-5)
    with pytest.raises(DataError, match="no external solution column 'sol'"):
        RLPlusLoss(column="sol").guide(Guide(ctx, 0), batch)
