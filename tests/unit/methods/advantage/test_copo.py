"""COPO (arXiv:2508.04138, reconstructed): entropy-gated blend of the local GRPO and the global prompt advantage."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.advantage.copo import COPOAdvantage
from lmpo.methods.advantage.grpo import GRPOAdvantage
from factories import from_config, make_batch, random_batch


def sig(x):
    return 1 / (1 + math.exp(-x))


# Hand case (the card's example): prompt A all correct [1, 1], prompt B half correct [1, 0]; answers = outcomes.
#   entropy: A has one answer -> H = 0 -> w_A = sigmoid(10 (0 - 0.5)) = sigmoid(-5)
#            B has two answers 50/50 -> H = log 2 / log 2 = 1 -> w_B = sigmoid(5)
#   local: A -> 0; B -> +-0.5 / std([1, 0]) = +-0.5 / 0.70711 = +-0.70711
#   global: g = (1, 0.5), mean 0.75, sample std sqrt(2 * 0.25^2 / 1) = 0.35355 -> A^glob = (+0.70711, -0.70711)
#   A = w A^loc + (1 - w) A^glob
def test_hand_card_example():
    adv = COPOAdvantage(eps=0.0)(make_batch([1.0, 1.0, 1.0, 0.0], [0, 0, 1, 1], T=1))[:, 0]
    s = 1 / math.sqrt(2)
    wa, wb = sig(-5), sig(5)
    exp = [(1 - wa) * s, (1 - wa) * s, wb * s - (1 - wb) * s, -wb * s - (1 - wb) * s]
    assert_close(adv, torch.tensor(exp))
    assert exp[0] > 0.70  # the all-correct prompt is still reinforced (GRPO gives it 0)


def test_hand_answer_text_gate():
    # gate from the completions' answers: ["<answer>7</answer>", "7 ", "7", "7"] -> one answer -> H = 0;
    # ["1", "2", "1", "2"] -> H = log 2 / log 4 = 0.5 -> w = sigmoid(0) = 0.5
    b = make_batch([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0], [0] * 4 + [1] * 4, T=1)
    texts = ["<answer>7</answer>", "7 ", "7", "7", "1", "2", "1", "2"]
    b = b.replace(meta=[{"prompt": "p", "completion": t} for t in texts])
    w = COPOAdvantage().gate(b)
    assert_close(w, torch.tensor([sig(-5)] * 4 + [0.5] * 4))


@pytest.mark.parametrize("seed", range(4))
def test_property_blend_of_grpo_and_global(seed):
    b = random_batch(seed, discrete_rewards=True)
    comp = COPOAdvantage()
    a_loc, a_glob = comp.local_global(b)
    assert_close(a_loc, GRPOAdvantage()(b)[:, 0].to(a_loc.dtype), check_dtype=False)
    w = comp.gate(b)
    assert_close(comp(b)[:, 0], w * a_loc + (1 - w) * a_glob)


def test_property_uniform_groups_get_signed_global_signal():
    # all-correct and all-wrong groups: GRPO gives 0, COPO pushes them apart (+ for correct, - for wrong)
    b = make_batch([1.0] * 3 + [0.0] * 3 + [1.0, 0.0, 1.0], [0] * 3 + [1] * 3 + [2] * 3, T=1)
    adv = COPOAdvantage()(b)[:, 0]
    assert torch.all(GRPOAdvantage()(b)[:6] == 0)
    assert torch.all(adv[:3] > 0.5) and torch.all(adv[3:6] < -0.5)


def test_single_prompt_and_equal_rewards_finite():
    assert torch.equal(COPOAdvantage()(make_batch([1.0, 1.0], [0, 0], T=2)), torch.zeros(2, 2))


def test_bad_config():
    with pytest.raises(ConfigError, match="advantage.kappa"):
        from_config(COPOAdvantage, kappa=0.0)
    with pytest.raises(ConfigError, match="advantage.h0"):
        from_config(COPOAdvantage, h0=1.5)


# --------------------------------------------------------------------------- loop reference
def loop_copo(R, groups, mask, kappa=10.0, h0=0.5, eps=1e-6):
    B = len(R)
    gids = sorted(set(groups))
    mem = {q: [R[i] for i in range(B) if groups[i] == q] for q in gids}
    g = {q: sum(v) / len(v) for q, v in mem.items()}
    gv = [g[q] for q in gids]
    gm = sum(gv) / len(gv)
    gs = math.sqrt(sum((x - gm) ** 2 for x in gv) / (len(gv) - 1)) if len(gv) > 1 else None
    out = []
    for i in range(B):
        v = mem[groups[i]]
        n = len(v)
        s = math.sqrt(sum((x - g[groups[i]]) ** 2 for x in v) / (n - 1)) if n > 1 else 0.0
        loc = (R[i] - g[groups[i]]) / (s + eps)
        glob = (g[groups[i]] - gm) / (gs + eps) if gs is not None else 0.0
        h = -sum(v.count(x) / n * math.log(v.count(x) / n) for x in set(v))
        h = h / math.log(n) if n > 1 else 0.0
        w = sig(kappa * (h - h0))
        a = w * loc + (1 - w) * glob
        out.append([a if mask[i][t] else 0.0 for t in range(len(mask[0]))])
    return torch.tensor(out)


@pytest.mark.parametrize("seed", range(10))
def test_matches_loop_reference(seed):
    b = random_batch(seed, discrete_rewards=seed % 2 == 0)
    exp = loop_copo(b.rewards.tolist(), b.group_ids.tolist(), b.response_mask.tolist())
    assert_close(COPOAdvantage()(b), exp, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- gradient
def test_gradcheck_float64():
    # distinct rewards: the gate is locally constant, so the Jacobian is w J_loc + (1 - w) J_glob
    R = torch.tensor([0.9, 0.1, 0.3, 0.6, 0.8, 0.45, 0.2, 0.05], dtype=torch.float64)
    g = [0, 0, 0, 1, 1, 2, 2, 2]
    mask = torch.ones(8, 1, dtype=torch.bool)

    def f(r):
        return COPOAdvantage()(make_batch(r, g, mask, dtype=torch.float64))[:, 0]

    assert torch.autograd.gradcheck(f, (R.clone().requires_grad_(True),))


def test_jacobian_analytic():
    # two prompts of two distinct rewards each: H = 1 -> w = sigmoid(5) on every row (locally constant), so
    #   dA/dR = w J_loc + (1 - w) J_glob with, for a z-score z_i = (x_i - m)/(s + eps) over n values (s unbiased),
    #   dz_i/dx_j = (delta_ij - 1/n)/(s + eps) - d_i d_j / ((n - 1) s (s + eps)^2);
    #   J_loc: that formula inside each pair (0 across prompts); J_glob: that formula over g = (g_0, g_1) times
    #   dg_p/dR_j = 1/2 for j in prompt p.
    R = torch.tensor([0.9, 0.1, 0.3, 0.6], dtype=torch.float64)
    groups = [0, 0, 1, 1]
    mask = torch.ones(4, 1, dtype=torch.bool)
    eps = 1e-6

    def zjac(x):
        n, s, d = x.numel(), x.std(), x - x.mean()
        eye = torch.eye(n, dtype=x.dtype)
        return (eye - 1.0 / n) / (s + eps) - d[:, None] * d[None, :] / ((n - 1) * s * (s + eps) ** 2)

    J = torch.autograd.functional.jacobian(
        lambda r: COPOAdvantage(eps=eps)(make_batch(r, groups, mask, dtype=torch.float64))[:, 0], R)
    J_loc = torch.zeros(4, 4, dtype=torch.float64)
    J_loc[:2, :2], J_loc[2:, 2:] = zjac(R[:2]), zjac(R[2:])
    g = torch.stack([R[:2].mean(), R[2:].mean()])
    member = torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]], dtype=torch.float64)  # dg_p / dR_j
    J_glob = (zjac(g) @ member)[[0, 0, 1, 1]]
    w = sig(5)
    assert_close(J, w * J_loc + (1 - w) * J_glob)
