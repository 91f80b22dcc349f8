"""ADORA (arXiv:2602.10019): GRPO advantage re-weighted per group by the length-advantage criterion."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.advantage.adora import ADORAAdvantage
from lmpo.methods.advantage.grpo import GRPOAdvantage
from factories import from_config, make_batch, random_batch


# Hand case (card test a): rewards [2, 2, 0, 0] with tau_R = 1, so P = {0, 1}, N = {2, 3}.
#   lengths [100, 120, 300, 300]: max_P L = 120 <= mean_N L = 300 -> TDS -> A = 0.1 * GRPO
#   lengths [400, 120, 300, 300]: 400 > 300 -> TAS -> A = GRPO
#   GRPO: mean 1, deviations [1, 1, -1, -1], unbiased std sqrt(4/3) -> A = +-sqrt(3)/2
def test_hand_card_example():
    comp = ADORAAdvantage(reward_threshold=1.0, eps=0.0)
    a = math.sqrt(3) / 2
    adv = comp(make_batch([2.0, 2, 0, 0], None, [100, 120, 300, 300], T=400))
    assert_close(adv[:, 0], 0.1 * torch.tensor([a, a, -a, -a]))
    adv = comp(make_batch([2.0, 2, 0, 0], None, [400, 120, 300, 300], T=400))
    assert_close(adv[:, 0], torch.tensor([a, a, -a, -a]))


def test_hand_all_wrong_and_all_right():
    # (card test b) all wrong: P empty -> TAS, and GRPO gives 0; all right: N empty -> TAS, GRPO 0
    comp = ADORAAdvantage()
    b = make_batch([0.0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1], [1, 2, 3, 3, 2, 1], T=3)
    assert torch.equal(comp(b), torch.zeros(6, 3))
    assert comp.tas(b.rewards, torch.tensor([1.0, 2, 3, 3, 2, 1]), b.group_ids, None).all()


def test_hand_v2_length_reshaping():
    # rewards [1, 1, 0, 0], lengths [4, 2, 1, 1]: max_P 4 > mean_N 1 -> TAS. |P| = 2 >= (1 - 0.5) * 4 -> easy:
    #   l~ = (L - 2)/(4 - 2) = [1, 0] on the correct rows -> R -= 0.5 (2 l~ - 1) = [-0.5, +0.5] -> R = [0.5, 1.5, 0, 0]
    #   GRPO: mean 0.5, deviations [0, 1, -0.5, -0.5], unbiased var 1.5/3 = 0.5 -> A = [0, sqrt 2, -1/sqrt 2, -1/sqrt 2]
    comp = ADORAAdvantage(length_beta=0.5, eps=0.0)
    adv = comp(make_batch([1.0, 1, 0, 0], None, [4, 2, 1, 1], T=4))[:, 0]
    s = math.sqrt(2)
    assert_close(adv, torch.tensor([0.0, s, -1 / s, -1 / s]))
    # a hard group: [1, 1, 0, 0, 0], |P| = 2 < 0.5 * 5 -> R += 0.5 (2 l~ - 1) = [+0.5, -0.5] -> R = [1.5, 0.5, 0, 0, 0]
    adv = comp(make_batch([1.0, 1, 0, 0, 0], None, [4, 2, 1, 1, 1], T=4))[:, 0]
    exp = GRPOAdvantage(eps=0.0)(make_batch([1.5, 0.5, 0, 0, 0], None, T=1))[:, 0]
    assert_close(adv, exp)


def test_property_truncated_excluded_from_negatives():
    # correct length 2, wrong lengths 4 (truncated) and 1: mean_N = 2.5 >= 2 -> TDS (A = 0.1 GRPO);
    # leaving the truncated one out of N: mean_N = 1 < 2 -> TAS (A = GRPO)
    b = make_batch([1.0, 0, 0], None, [2, 4, 1], T=4, truncated=[False, True, False])
    grpo = GRPOAdvantage()(b)
    assert_close(ADORAAdvantage()(b), 0.1 * grpo)
    assert_close(ADORAAdvantage(exclude_truncated=True)(b), grpo)


def test_stage_window_and_state():
    # active only for the 2nd call (start_step = 1, end_step = 2); the call counter is checkpointed state
    b = make_batch([2.0, 2, 0, 0], None, [100, 120, 300, 300], T=400)
    grpo = GRPOAdvantage()(b)
    comp = ADORAAdvantage(reward_threshold=1.0, start_step=1, end_step=2)
    assert_close(comp(b), grpo)
    state = comp.state_dict()
    assert state == {"step": 1}
    assert_close(comp(b), 0.1 * grpo)
    resumed = ADORAAdvantage(reward_threshold=1.0, start_step=1, end_step=2)
    resumed.load_state_dict(state)
    assert_close(resumed(b), 0.1 * grpo)
    assert_close(comp(b), grpo)
    assert_close(resumed(b), grpo)


def test_bad_config():
    with pytest.raises(ConfigError, match="advantage.attenuation"):
        from_config(ADORAAdvantage, attenuation=-0.1)
    with pytest.raises(ConfigError, match="advantage.difficulty_p"):
        from_config(ADORAAdvantage, difficulty_p=0.7)
    with pytest.raises(ConfigError, match="advantage.start_step"):
        from_config(ADORAAdvantage, start_step=5, end_step=2)


# --------------------------------------------------------------------------- loop reference
def loop_adora(R, groups, mask, lam=0.1, tau=0.0, eps=1e-6):
    B, T = len(R), len(mask[0])
    L = [sum(mask[i]) for i in range(B)]
    out = []
    for i in range(B):
        mem = [j for j in range(B) if groups[j] == groups[i]]
        pos = [j for j in mem if R[j] > tau]
        neg = [j for j in mem if R[j] <= tau]
        tas = not pos or not neg or max(L[j] for j in pos) > sum(L[j] for j in neg) / len(neg)
        w = 1.0 if tas else lam
        vals = [R[j] for j in mem]
        m = sum(vals) / len(vals)
        s = math.sqrt(sum((x - m) ** 2 for x in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        a = w * (R[i] - m) / (s + eps)
        out.append([a if mask[i][t] else 0.0 for t in range(T)])
    return torch.tensor(out)


@pytest.mark.parametrize("seed", range(10))
def test_matches_loop_reference(seed):
    b = random_batch(seed, T=6)
    got = ADORAAdvantage(reward_threshold=0.0)(b)
    exp = loop_adora(b.rewards.tolist(), b.group_ids.tolist(), b.response_mask.tolist())
    assert_close(got, exp, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- gradient
def test_jacobian_analytic():
    # group 0 is TDS (w = 0.1), group 1 TAS (w = 1); w is locally constant, so dA/dR = w_g J_GRPO with
    #   J_GRPO_ij = (delta_ij - 1/n)/s - d_i d_j / ((n - 1) s^3) inside a group (eps = 0)
    R = torch.tensor([0.9, 0.8, 0.1, 0.2, 0.7, 0.3, 0.1])
    groups = [0, 0, 0, 0, 1, 1, 1]
    lengths = [1, 1, 3, 3, 4, 1, 1]

    def f(r):
        return ADORAAdvantage(eps=0.0)(make_batch(r, groups, lengths, T=4))[:, 0]

    J = torch.autograd.functional.jacobian(f, R)
    exp = torch.zeros(7, 7)
    for rows, w in ((slice(0, 4), 0.1), (slice(4, 7), 1.0)):
        x = R[rows]
        n, s, d = x.numel(), x.std(), x - x.mean()
        exp[rows, rows] = w * ((torch.eye(n) - 1.0 / n) / s - d[:, None] * d[None, :] / ((n - 1) * s**3))
    assert_close(J, exp)


def test_gradcheck_float64_with_reshaping():
    R = torch.tensor([0.9, 0.8, 0.1, 0.2, 0.7, 0.6, 0.1], dtype=torch.float64)
    groups = [0, 0, 0, 0, 1, 1, 1]
    lengths = [4, 2, 1, 1, 4, 2, 3]

    def f(r):
        return ADORAAdvantage(length_beta=0.5)(make_batch(r, groups, lengths, T=4, dtype=torch.float64))[:, 0]

    assert torch.autograd.gradcheck(f, (R.clone().requires_grad_(True),))
