"""FoR trajectory balance (arXiv:2406.05673): L = (log Z + log P_F(tau) - log R(x))^2, log P_F = sum of token log-probs.

Per-token output: L_i on each of row i's tokens, so the seq_mean_token_mean aggregator gives mean_i L_i and
d mean_i L_i / d logp_{i,t} = 2 (log Z + log P_F_i - log R_i) / B.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.aggregate import SeqMeanTokenMean
from lmpo.methods.loss.flow_of_reasoning import FlowOfReasoningTB
from factories import from_config, make_batch

F64 = torch.float64


def inputs(logprobs, rewards, mask=None, groups=None):
    lp = torch.tensor(logprobs, dtype=F64)
    b = make_batch(rewards, groups, mask if mask is not None else [[1] * lp.shape[1]] * lp.shape[0], dtype=F64)
    return b, (lp * b.response_mask).requires_grad_(True)


def test_hand_case_learned_log_z():
    # rewards (1, 0), R = (100, 0.001); log Z = 1.
    # row 0: log P_F = -1 - 2 = -3; residual = 1 - 3 - log 100 = -2 - 4.60517 = -6.60517; L = 43.62827
    # row 1: log P_F = -0.5 (second token padded); residual = 1 - 0.5 - log 0.001 = 0.5 + 6.90776 = 7.40776
    b, lp = inputs([[-1.0, -2.0], [-0.5, -9.0]], [1.0, 0.0], [[1, 1], [1, 0]])
    loss = FlowOfReasoningTB(log_z_init=1.0)
    out = loss(lp, b)
    r0, r1 = 1 - 3 - math.log(100), 1 - 0.5 - math.log(0.001)
    assert_close(out.per_token.detach(), torch.tensor([[r0**2, r0**2], [r1**2, 0.0]], dtype=F64))
    agg = SeqMeanTokenMean()
    total = agg(out.per_token, b.response_mask, agg.normaliser(b.response_mask, 2))
    assert_close(total.detach(), torch.tensor((r0**2 + r1**2) / 2, dtype=F64))
    total.backward()
    assert_close(lp.grad, torch.tensor([[r0, r0], [r1, 0.0]], dtype=F64))  # 2 resid / B with B = 2
    # the learned log Z: one Adam step (first step moves by lr * sign(mean grad)); mean grad = r0 + r1 > 0
    assert loss.state["pending_n"] == 2 and loss.state["pending_grad"] == pytest.approx(2 * (r0 + r1))
    loss.after_optimizer_step()
    assert loss.state["log_z"] == pytest.approx(1.0 - 0.1) and loss.state["pending_n"] == 0


def test_learned_log_z_converges_to_the_partition_function():
    # Fixed log P_F (a frozen policy): the TB optimum is log Z = mean_i (log R_i - log P_F_i).
    b, lp = inputs([[-1.0], [-2.0], [-3.0]], [1.0, 0.0, 1.0])
    loss = FlowOfReasoningTB(log_z_lr=0.05)
    for _ in range(3000):
        loss(lp.detach(), b)
        loss.after_optimizer_step()
    want = (2 * math.log(100) + math.log(0.001) + 6.0) / 3
    assert loss.state["log_z"] == pytest.approx(want, abs=1e-3)


def test_card_vargrad_zero_iff_policy_proportional_to_reward():
    # card (1): log P_F = [-2, -3], log R = [0, -1] -> zeta = [-2, -2] -> loss 0 (batch log Z).
    loss = FlowOfReasoningTB(log_z="batch", success_reward=1.0, fail_reward=math.exp(-1))
    b, lp = inputs([[-2.0], [-3.0]], [1.0, 0.0])
    out = loss(lp, b)
    assert_close(out.per_token.detach(), torch.zeros(2, 1, dtype=F64))
    b, lp = inputs([[-2.0], [-2.5]], [1.0, 0.0])  # not proportional: zeta = [-2, -1.5], mean -1.75 -> 0.0625 each
    assert_close(loss(lp, b).per_token.detach(), torch.full((2, 1), 0.0625, dtype=F64))


def test_card_constant_shift_of_log_r_is_absorbed_by_batch_log_z():
    # card (3): multiplying every R by c (adding log c to every log R) leaves the VarGrad loss unchanged.
    b, lp = inputs([[-1.0, -0.3], [-2.0, -0.1], [-0.2, -0.4]], [1.0, 0.0, 0.5], groups=[0, 0, 0])
    a = FlowOfReasoningTB(log_z="batch")(lp, b).per_token
    c = FlowOfReasoningTB(log_z="batch", success_reward=300.0, fail_reward=0.003)(lp, b).per_token
    assert_close(a, c)


def test_card_higher_reward_pushes_its_log_pf_up():
    # card (2): raising R of row 0 (reward 0 -> 1) makes the descent direction on its log P_F more positive.
    def push(r0):
        b, lp = inputs([[-1.0], [-1.0]], [r0, 0.0])
        FlowOfReasoningTB(log_z_init=0.0)(lp, b).per_token.sum().backward()
        return -lp.grad[0, 0].item()

    assert push(1.0) > push(0.0)


def test_groups_are_separate_in_batch_mode_and_slow_reference():
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(6, 3, generator=g, dtype=F64)
    rewards = torch.rand(6, generator=g, dtype=F64).tolist()
    groups = [0, 1, 0, 1, 1, 0]
    b, lp = inputs(lp.tolist(), rewards, [[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 1, 0]], groups)
    loss = FlowOfReasoningTB(log_z="batch")
    out = loss(lp, b).per_token
    want = torch.zeros_like(out)
    zeta = []
    for i in range(6):
        n = int(b.response_mask[i].sum())
        zeta.append(sum(lp[i, t].item() for t in range(n)) - math.log(0.001 + (100 - 0.001) * rewards[i]))
    for i in range(6):
        members = [j for j in range(6) if groups[j] == groups[i]]
        mean = sum(zeta[j] for j in members) / len(members)
        for t in range(int(b.response_mask[i].sum())):
            want[i, t] = (zeta[i] - mean) ** 2
    assert_close(out.detach(), want)


def test_gradcheck_float64():
    b, lp = inputs([[-1.0, -0.5], [-0.2, -0.7]], [1.0, 0.25], [[1, 1], [1, 0]])
    for mode in ("learned", "batch"):
        def f(x, mode=mode):
            return FlowOfReasoningTB(log_z=mode, log_z_init=0.3)(x, b).per_token
        assert torch.autograd.gradcheck(f, (lp,))


def test_state_round_trip_and_bad_params():
    loss = FlowOfReasoningTB()
    b, lp = inputs([[-1.0]], [1.0])
    loss(lp, b)
    loss.after_optimizer_step()
    other = FlowOfReasoningTB()
    other.load_state_dict(loss.state_dict())
    assert other.state == loss.state
    with pytest.raises(ConfigError, match="fail_reward"):
        from_config(FlowOfReasoningTB, fail_reward=200.0)
    with pytest.raises(ConfigError, match="log_z"):
        from_config(FlowOfReasoningTB, log_z="learnt")
