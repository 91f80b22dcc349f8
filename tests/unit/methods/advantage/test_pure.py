"""PURE min-form credit (arXiv:2504.15275): softmin-weighted process rewards, leave-one-out baselines, returns."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.batch import RolloutBatch
from lmpo.config import load_config
from lmpo.errors import ConfigError, DataError
from lmpo.methods.advantage.pure import PUREAdvantage, softmin_transform
from lmpo.methods.aggregate import TokenMean
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from lmpo.pipeline import build_pipeline, require

from factories import from_config, random_full_batch, step_batch, with_extras

F64 = torch.float64


def test_card_example_weights_and_min_form_returns():
    # r = (0.8, -0.5, 0.9), two tokens per step, one reply (baseline 0), no VR. tau = 0.1: softmax(-8, 5, -9) ->
    # w = (e^-13, 1, e^-14) / (1 + e^-13 + e^-14) ~ (2.3e-6, 0.999997, 8.3e-7) (the card's numbers).
    b = step_batch([[(0.8, 2), (-0.5, 2), (0.9, 2)]])
    z = 1 + math.exp(-13) + math.exp(-14)
    w = [math.exp(-13) / z, 1 / z, math.exp(-14) / z]
    assert w[0] == pytest.approx(2.26e-6, rel=1e-2) and w[2] == pytest.approx(8.3e-7, rel=1e-2)
    rs = [0.8 * w[0], -0.5 * w[1], 0.9 * w[2]]
    adv = PUREAdvantage(vr_coef=0.0)(b)[0].double()
    g = [sum(rs), sum(rs), rs[1] + rs[2], rs[1] + rs[2], rs[2], rs[2]]
    assert_close(adv, torch.tensor(g, dtype=F64), atol=1e-7, rtol=0)
    # tau -> 0: returns (-0.5, -0.5, 0) per step (the min of the future step rewards while the worst lies ahead);
    # sum-form (gamma 1) would give (1.2, 0.4, 0.9)
    adv0 = PUREAdvantage(temperature=1e-3, vr_coef=0.0)(b)[0]
    assert_close(adv0, torch.tensor([-0.5, -0.5, -0.5, -0.5, 0.0, 0.0]), atol=1e-6, rtol=0)


def test_token_and_step_baselines_and_vr_by_hand():
    # Row A: steps 0.5 (1 token), 0.5 (2 tokens): equal scores -> w = 1/2 each, r* = (0.25, 0.25), sum 0.5, L = 3.
    # Row B: one step -1 (2 tokens; T = 3, one pad): r* = -1, L = 2.
    # token baseline: b_A = -1 / 2 = -0.5, b_B = 0.5 / 3 = 1/6. A: (0.25 + 0.5 * 1, 0.25 + 0.5 * 2) = (0.75, 1.25)
    # on tokens 0, 2 -> G_A = (2.0, 1.25, 1.25); B: -1 - 2/6 = -4/3 on token 1 -> G_B = (-4/3, -4/3, 0).
    rows = [[(0.5, 1), (0.5, 2)], [(-1.0, 2)]]
    b = step_batch(rows, rewards=[1.0, 0.0])
    assert_close(PUREAdvantage(vr_coef=0.0)(b).double(), torch.tensor([[2.0, 1.25, 1.25], [-4 / 3, -4 / 3, 0.0]],
                                                                      dtype=F64), atol=1e-6, rtol=0)
    # VR (coef 1): v_A = 1 - 0 = 1 on A's last token, v_B = 0 - 1 = -1 on B's last token
    assert_close(PUREAdvantage(vr_coef=1.0)(b).double(), torch.tensor([[3.0, 2.25, 2.25], [-7 / 3, -7 / 3, 0.0]],
                                                                      dtype=F64), atol=1e-6, rtol=0)
    # step baseline: b_A = mean over B of (sum r* / K) = -1, b_B = 0.5 / 2 = 0.25:
    # A: (1.25, 1.25) -> G = (2.5, 1.25, 1.25); B: -1.25 -> G = (-1.25, -1.25, 0)
    assert_close(PUREAdvantage(vr_coef=0.0, baseline="step")(b).double(),
                 torch.tensor([[2.5, 1.25, 1.25], [-1.25, -1.25, 0.0]], dtype=F64), atol=1e-6, rtol=0)


def test_other_token_rewards_pass_through_untransformed():
    # a KL term of 0.1 on token 0 (kl.mode: reward adds it to token_rewards) joins the returns as it is
    extra = torch.tensor([[0.1, 0.0, 0.0, 0.0, 0.0, 0.0]])
    b0 = step_batch([[(0.8, 2), (-0.5, 2), (0.9, 2)]])
    b1 = step_batch([[(0.8, 2), (-0.5, 2), (0.9, 2)]], token_rewards=extra)
    d = PUREAdvantage(vr_coef=0.0)(b1) - PUREAdvantage(vr_coef=0.0)(b0)
    assert_close(d, torch.tensor([[0.1, 0, 0, 0, 0, 0]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", range(5))
def test_min_form_return_lies_between_min_and_max_step_reward(seed):
    # the card's property: for any tau, sum_k w_k r_k (the first token's return, no baseline) is in [min r, max r]
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(6, 5, generator=g, dtype=F64) * 2 - 1
    live = torch.arange(5)[None] < torch.randint(1, 6, (6, 1), generator=g)
    for tau in (1e-3, 0.1, 1.0, 100.0):
        s = softmin_transform(r, live, tau).sum(-1)
        lo = torch.where(live, r, torch.inf).amin(-1)
        hi = torch.where(live, r, -torch.inf).amax(-1)
        assert bool(((s >= lo - 1e-12) & (s <= hi + 1e-12)).all())


def reference(b: RolloutBatch, tau: float, baseline: str, vr: float) -> torch.Tensor:
    """Loop reference written from the paper's formulas and the code's baseline description."""
    B, T = b.response_mask.shape
    out = torch.zeros(B, T, dtype=F64)
    rstar, L, K = {}, {}, {}
    for i in range(B):
        n = int(b.extras["num_steps"][i])
        r = [float(b.extras["step_rewards"][i, k]) for k in range(n)]
        e = [math.exp(-x / tau) for x in r]
        rstar[i] = [x * y / sum(e) for x, y in zip(r, e)]
        L[i], K[i] = float(b.response_mask[i].sum()), max(n, 1)
    for i in range(B):
        others = [j for j in range(B) if j != i and b.group_ids[j] == b.group_ids[i]]
        u = [0.0] * T
        n = int(b.extras["num_steps"][i])
        for k in range(n):
            if baseline == "token":
                base = sum(sum(rstar[j]) for j in others) / sum(L[j] for j in others) if others else 0.0
                ntok = sum(1 for t in range(T) if b.response_mask[i, t] and int(b.turn_ids[i, t]) == k)
                val = rstar[i][k] - base * ntok
            else:
                base = sum(sum(rstar[j]) / K[j] for j in others) / len(others) if others else 0.0
                val = rstar[i][k] - base
            u[int(b.extras["step_ends"][i, k])] += val
        for t in range(T):
            if b.response_mask[i, t]:
                u[t] += float(b.token_rewards[i, t]) - sum(
                    float(b.extras["step_rewards"][i, k]) for k in range(n) if int(b.extras["step_ends"][i, k]) == t)
        if vr and b.response_mask[i].any():
            last = max(t for t in range(T) if b.response_mask[i, t])
            mean_o = sum(float(b.rewards[j]) for j in others) / len(others) if others else float(b.rewards[i])
            u[last] += vr * (float(b.rewards[i]) - mean_o)
        for t in range(T):
            out[i, t] = sum(u[t:]) if b.response_mask[i, t] else 0.0
    return out


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("baseline", ["token", "step"])
def test_matches_loop_reference(seed, baseline):
    b = with_extras(random_full_batch(seed=seed, T=7), {"step_rewards"}, seed=seed)
    kl = torch.randn(b.response_mask.shape, generator=torch.Generator().manual_seed(seed)) * 0.05 * b.response_mask
    b = b.replace(token_rewards=b.token_rewards + kl)
    for tau, vr in ((0.1, 1.0), (0.7, 0.0)):
        got = PUREAdvantage(temperature=tau, baseline=baseline, vr_coef=vr)(b)
        assert_close(got.double(), reference(b, tau, baseline, vr), atol=1e-5, rtol=1e-5)


def test_gradient_through_the_clipped_loss():
    # one token per step, one reply, steps 0.3 and -0.6 with tau 1e-3 -> returns (-0.6, -0.6): both tokens get
    # advantage -0.6. Softmax policy over two actions per position with logits z (same z at both positions, both
    # take action 0): token_mean loss at ratio 1 = -(A log p0 + A log p0) / 2 = -A log p0, so
    # d/dz0 = -A (1 - p0) and d/dz1 = -A (-p1) = A p1, with A = -0.6.
    b = step_batch([[(0.3, 1), (-0.6, 1)]])
    adv = PUREAdvantage(temperature=1e-3, vr_coef=0.0)(b)
    assert_close(adv, torch.tensor([[-0.6, -0.6]]), atol=1e-5, rtol=0)
    z = torch.tensor([0.2, -0.4], dtype=F64, requires_grad=True)
    logp = torch.log_softmax(z, -1)
    lp = logp[0].expand(1, 2)
    batch = b.replace(advantages=adv, old_logprobs=lp.detach().float())
    out = PPOClipLoss(epsilon=0.2)(lp, batch)
    agg = TokenMean()
    agg(out.per_token, batch.response_mask, agg.normaliser(batch.response_mask, 2)).backward()
    p = torch.softmax(z.detach(), -1)
    A = float(adv[0, 0])
    assert_close(z.grad, torch.tensor([-A * (1 - p[0]), A * p[1]], dtype=F64), atol=1e-6, rtol=1e-5)


def test_config_errors():
    with pytest.raises(ConfigError, match="temperature"):
        from_config(PUREAdvantage, temperature=0.0)
    with pytest.raises(ConfigError, match="baseline"):
        from_config(PUREAdvantage, baseline="tok")
    cfg = load_config("configs/tiny.yaml", ["method=pure"])
    assert build_pipeline(cfg).hook  # the preset's planner provides step_rewards
    with pytest.raises(ConfigError, match="process_credit"):
        load_config("configs/tiny.yaml", ["method=pure", "planners=[]"])
    with pytest.raises(DataError, match="step_rewards"):
        require(random_full_batch(), PUREAdvantage(), "advantage")
