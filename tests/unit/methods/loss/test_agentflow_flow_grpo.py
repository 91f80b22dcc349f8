"""Flow-GRPO of AgentFlow (arXiv:2510.05592): (1/G) sum_i (1/T_i) sum_t (1/|a_t|) sum_k clipped surrogate."""

from __future__ import annotations

import random

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.advantage.grpo import GRPOAdvantage
from lmpo.methods.aggregate import SeqMeanTokenMean
from lmpo.methods.loss.agentflow_flow_grpo import AgentFlowFlowGRPOLoss, turn_weights
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from factories import episode_batch, from_config, make_batch

F64 = torch.float64


def objective(loss_fn, lp, batch):
    """The loss as the trainer reduces it with the preset's aggregator (seq_mean_token_mean)."""
    agg = SeqMeanTokenMean()
    out = loss_fn(lp, batch).per_token
    return agg(out, batch.response_mask, agg.normaliser(batch.response_mask, 1))


def prepared(b, logr=None, seed=0):
    """Episode batch with GRPO advantages, old log-probs and leaf log-probs at log-ratio ``logr`` (0: ratio 1)."""
    g = torch.Generator().manual_seed(seed)
    old = (-torch.rand(b.response_mask.shape, generator=g, dtype=F64) - 0.1) * b.response_mask
    logr = torch.zeros_like(old) if logr is None else logr
    b = b.replace(advantages=GRPOAdvantage()(b).double(), old_logprobs=old)
    return b, (old + logr * b.response_mask).requires_grad_(True)


def test_hand_gradient_each_turn_is_one_unit():
    # Row 0: turns of 2 and 1 policy tokens (an observation token between), R = 1; row 1: one turn of 3 tokens,
    # R = 0. GRPO: A = +-0.5 / 0.70711 = +-0.70711 (std of [1, 0] with Bessel). At ratio 1 the objective is
    # -(1/2) sum_i (1/T_i) sum_t (1/|a_t|) sum_k A_i rho, so d/d logp of a token = -A_i / (2 T_i |a_t|):
    # row 0 turn 0: -0.70711 / (2*2*2) = -0.08839; row 0 turn 1: -0.70711 / (2*2*1) = -0.17678;
    # row 1: +0.70711 / (2*1*3) = 0.11785. (GRPO's token mean would give -0.70711/6 = -0.11785 to all of row 0.)
    b, lp = prepared(episode_batch([[0.0, 1.0], [0.0]], tokens=[[2, 1], [3]]))
    objective(AgentFlowFlowGRPOLoss(), lp, b).backward()
    a = 2 ** -0.5
    want = torch.tensor([[-a / 8, -a / 8, 0.0, -a / 4], [a / 6, a / 6, a / 6, 0.0]], dtype=F64)
    assert_close(lp.grad, want, atol=1e-5, rtol=0)
    assert turn_weights(b).tolist() == [[0.75, 0.75, 0.0, 1.5], [1.0, 1.0, 1.0, 0.0]]


def test_card_properties():
    # (a) every turn of a trajectory has the trajectory's GRPO advantage (the broadcast)
    b = episode_batch([[0.0, 1.0, 0.0], [0.5], [0.0, 0.0]], tokens=[[1, 2, 1], [2], [1, 3]], pad=1)
    adv = GRPOAdvantage()(b)
    for i in range(3):
        vals = adv[i][b.response_mask[i]]
        assert (vals == vals[0]).all()
    # (b) one turn per trajectory: exactly GRPO's clipped loss, off-policy ratios included
    g = torch.Generator().manual_seed(1)
    one = make_batch([1.0, 0.0, 0.3], [0, 0, 0], [3, 2, 4], old_logprobs=-torch.rand(3, 4, generator=g))
    one = one.replace(advantages=GRPOAdvantage()(one))
    lp = one.old_logprobs + 0.4 * torch.randn(3, 4, generator=g)
    ours, ppo = AgentFlowFlowGRPOLoss(epsilon_high=0.2)(lp, one), PPOClipLoss(epsilon=0.2)(lp, one)
    assert_close(ours.per_token, ppo.per_token)
    # (c) a 4-turn and a 1-turn trajectory weigh the same: at ratio 1 each row's total |gradient| is |A_i| / G
    b, lp = prepared(episode_batch([[1.0, 0.0, 0.0, 0.0], [0.0]], tokens=[[1, 3, 2, 1], [2]]))
    objective(AgentFlowFlowGRPOLoss(), lp, b).backward()
    per_row = lp.grad.abs().sum(-1)
    assert_close(per_row, b.advantages.abs().amax(-1) / 2)
    assert (lp.grad[~b.response_mask] == 0).all()  # observation tokens are never trained


def loop_objective(lp, old, adv, mask, turns, eps_low, eps_high):
    """The paper's objective, one trajectory, turn and token at a time (negated: a loss)."""
    B, T = mask.shape
    total = 0.0
    rows = 0
    for i in range(B):
        units = {}
        for k in range(T):
            if mask[i, k]:
                rho = torch.exp(lp[i, k] - old[i, k])
                a = adv[i, k]
                units.setdefault(int(turns[i, k]), []).append(-torch.minimum(rho * a, rho.clamp(1 - eps_low,
                                                                                                  1 + eps_high) * a))
        if not units:
            continue
        rows += 1
        total = total + sum(sum(u) / len(u) for u in units.values()) / len(units)
    return total / max(rows, 1)


@pytest.mark.parametrize("seed", range(6))
def test_matches_loop_reference_value_and_gradient(seed):
    rng = random.Random(seed)
    B = 7
    turn_rewards = [[rng.choice([0.0, 1.0]) for _ in range(rng.randint(1, 4))] for _ in range(B)]
    tokens = [[rng.randint(1, 3) for _ in r] for r in turn_rewards]
    b = episode_batch(turn_rewards, [i % 2 for i in range(B)], tokens=tokens, obs_tokens=rng.randint(1, 2),
                      pad=rng.randint(0, 2), seed=seed)
    g = torch.Generator().manual_seed(seed)
    b, lp = prepared(b, logr=0.5 * torch.randn(b.response_mask.shape, generator=g, dtype=F64), seed=seed)
    fn = AgentFlowFlowGRPOLoss(epsilon=0.2, epsilon_high=0.3)
    got = objective(fn, lp, b)
    (g1,) = torch.autograd.grad(got, lp)
    lp2 = lp.detach().clone().requires_grad_(True)
    ref = loop_objective(lp2, b.old_logprobs, b.advantages, b.response_mask, b.turn_ids, 0.2, 0.3)
    (g2,) = torch.autograd.grad(ref, lp2)
    assert_close(got, ref, atol=1e-6, rtol=1e-6)
    assert_close(g1, g2, atol=1e-6, rtol=1e-6)


def test_float64_gradcheck_and_config_errors():
    b, lp = prepared(episode_batch([[1.0, 0.0], [0.0, 0.0, 1.0]], tokens=[[2, 1], [1, 1, 2]]),
                     logr=torch.full((2, 6), 0.05, dtype=F64))
    assert torch.autograd.gradcheck(lambda x: objective(AgentFlowFlowGRPOLoss(), x, b), (lp,))
    for kw, key in (({"epsilon": -0.1}, "loss.epsilon"), ({"epsilon_high": -1.0}, "loss.epsilon_high")):
        with pytest.raises(ConfigError, match=key):
            from_config(AgentFlowFlowGRPOLoss, **kw)
