"""POAD's BAD backup (arXiv:2405.15821): the card's worked example, a hand-derived two-action case, an independent
loop over actions, the telescoping property (lambda = 1: every token of an action gets the action's return), and
the single-action reduction to GAE with gamma = 1."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lmpo import ops
from lmpo.methods.advantage.gae import GAEAdvantage, dense_rewards, gae
from lmpo.methods.advantage.poad import POADAdvantage

from factories import make_batch, random_batch


def with_values(batch, values, turn_ids=None):
    b = batch.replace(extras={**batch.extras, "values": torch.as_tensor(values, dtype=torch.float32)})
    return b if turn_ids is None else b.replace(turn_ids=torch.as_tensor(turn_ids))


def test_card_example_no_discount_inside_an_action():
    # one action of 3 tokens, r = 1 at its end, terminal, gamma 0.9, lambda 1, V = 0:
    # BAD: (1, 1, 1); token-level GAE discounts every token: (0.81, 0.9, 1)
    b = with_values(make_batch([1.0], mask=[[1, 1, 1]]), [[0.0, 0.0, 0.0]])
    assert_close(POADAdvantage(gamma=0.9, lam=1.0, whiten=False).advantages_returns(b)[0], torch.tensor([[1.0] * 3]))
    assert_close(GAEAdvantage(gamma=0.9, lam=1.0, whiten=False).advantages_returns(b)[0],
                 torch.tensor([[0.81, 0.9, 1.0]]))


def test_hand_derived_two_actions():
    # tokens: action 0 = (t0, t1), its observation t2 (masked, same turn id), action 1 = (t3); outcome 1 at t3.
    # V = (0.2, 0.4, 9, 0.5), gamma 0.9, lambda 0.5.
    #   t3 (end):            delta = 1 - 0.5 = 0.5                              A3 = 0.5
    #   t1 (action boundary): delta = 0.9*0.5 - 0.4 = 0.05                      A1 = 0.05 + 0.9*0.5*0.5 = 0.275
    #   t0 (inside action 0): delta = 0.4 - 0.2 = 0.2 (no discount, no reward)   A0 = 0.2 + 0.5*0.275 = 0.3375
    #   returns = A + V = (0.5375, 0.675, 0, 1.0)
    b = with_values(make_batch([1.0], mask=[[1, 1, 0, 1]]), [[0.2, 0.4, 9.0, 0.5]], [[0, 0, 0, 1]])
    adv, ret = POADAdvantage(gamma=0.9, lam=0.5, whiten=False).advantages_returns(b)
    assert_close(adv, torch.tensor([[0.3375, 0.275, 0.0, 0.5]]))
    assert_close(ret, torch.tensor([[0.5375, 0.675, 0.0, 1.0]]))


def slow_bad(rewards, values, mask, actions, gamma, lam):
    """The card's two cases written per token over the trained tokens of each row, in Python floats."""
    B, T = mask.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        idx = [t for t in range(T) if mask[i, t]]
        gae_next, v_next = 0.0, 0.0
        for k in reversed(range(len(idx))):
            t = idx[k]
            boundary = k == len(idx) - 1 or int(actions[i, idx[k + 1]]) != int(actions[i, t])
            r, v = float(rewards[i, t]), float(values[i, t])
            if boundary:
                delta = r + gamma * v_next - v
                gae_t = delta + gamma * lam * gae_next
            else:
                delta = r + v_next - v
                gae_t = delta + lam * gae_next
            out[i, t] = gae_t
            gae_next, v_next = gae_t, v
    return out


def random_turns(b, seed):
    g = torch.Generator().manual_seed(seed)
    steps = (torch.rand(b.response_mask.shape, generator=g) < 0.35).long()
    return steps.cumsum(-1)  # non-decreasing action ids per row


@pytest.mark.parametrize("seed", range(5))
def test_matches_slow_reference(seed):
    b = random_batch(seed, T=8, token_rewards=True, holes=True)
    g = torch.Generator().manual_seed(100 + seed)
    b = with_values(b, torch.randn(b.response_mask.shape, generator=g), random_turns(b, seed))
    gamma, lam = 0.5 + 0.5 * float(torch.rand((), generator=g)), float(torch.rand((), generator=g))
    adv, ret = POADAdvantage(gamma=gamma, lam=lam, whiten=False).advantages_returns(b)
    ref = slow_bad(dense_rewards(b), b.extras["values"], b.response_mask, b.turn_ids, gamma, lam)
    assert_close(adv.double(), ref, atol=1e-5, rtol=1e-5)
    assert_close(ret, ops.zero_outside(adv + b.extras["values"], b.response_mask))


def test_lambda_one_gives_every_token_its_actions_return():
    # lambda = 1: A_j + V_j telescopes to the action-level return r_t + gamma (r_{t+1} + ...) for every token j of
    # action t, whatever the critic says inside the action (no reward inside the action: KL off)
    b = random_batch(3, T=8, holes=False)
    b = with_values(b, torch.randn(b.response_mask.shape, generator=torch.Generator().manual_seed(1)),
                    random_turns(b, 3))
    _, ret = POADAdvantage(gamma=0.8, lam=1.0, whiten=False).advantages_returns(b)
    m, turns = b.response_mask, b.turn_ids
    for i in range(m.shape[0]):
        n_actions_after = {}
        ids = [int(turns[i, t]) for t in range(m.shape[1]) if m[i, t]]
        for a in set(ids):
            n_actions_after[a] = len({x for x in ids if x > a})
        for t in range(m.shape[1]):
            if m[i, t]:
                expect = 0.8 ** n_actions_after[int(turns[i, t])] * float(b.rewards[i])
                assert abs(float(ret[i, t]) - expect) < 1e-5


def test_one_action_is_gae_with_gamma_one():
    b = random_batch(5, T=6, token_rewards=True)
    b = with_values(b, torch.randn(b.response_mask.shape, generator=torch.Generator().manual_seed(2)))
    a1 = POADAdvantage(gamma=0.7, lam=0.9)(b)  # no turn_ids: the reply is one action, gamma never applies
    a2 = GAEAdvantage(gamma=1.0, lam=0.9)(b)
    assert_close(a1, a2)
    adv, _ = gae(dense_rewards(b), b.extras["values"], b.response_mask, 1.0, 0.9)
    assert_close(POADAdvantage(gamma=0.3, lam=0.9, whiten=False)(b), adv)
