"""EMPG (arXiv:2509.09265): A_mod(i, s) = g(H_{i,s}) A(i) + zeta f(H_{i,s+1}), then re-centred over steps."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.advantage.empg import EMPGAdvantage, step_ids
from lmpo.methods.advantage.grpo import GRPOAdvantage
from factories import from_config, make_batch


def with_steps(b, ent, turns=None, ids=None):
    kw = {"extras": {"entropy": torch.as_tensor(ent, dtype=torch.float32)}}
    if turns is not None:
        kw["turn_ids"] = torch.as_tensor(turns)
    if ids is not None:
        kw["response_ids"] = torch.as_tensor(ids)
    return b.replace(**kw)


def card_batch(**kw):
    # Row 0: reward 1, two steps (turns 0, 1) with token entropies [0.1, 0.3 | 1.0, 1.0] -> H = [0.2, 1.0].
    # Row 1: reward -1, same group, no trained token (it only fixes A(0) = 1 - mean(1, -1) = 1 without std).
    b = make_batch([1.0, -1.0], [0, 0], [[1, 1, 1, 1], [0, 0, 0, 0]])
    return with_steps(b, [[0.1, 0.3, 1.0, 1.0], [5.0, 5.0, 5.0, 5.0]], **kw)


def test_card_worked_example():
    # H~ = [0, 0.8 / (0.8 + 1e-8)] ~ [0, 1]; k = 1: exp(-H~) = [1, e^-1], mean (1 + e^-1)/2 = 0.6839
    # g = [1.4621, 0.5379]; zeta = 0: A_mod = g * 1; zeta = 0.05: step 0 also gets 0.05 * e^-1 = 0.018394.
    e = math.exp(-1.0)
    g0, g1 = 2 / (1 + e), 2 * e / (1 + e)
    b = card_batch(turns=[[0, 0, 1, 1], [0, 0, 0, 0]])
    adv = EMPGAdvantage(k=1.0, zeta=0.0, recenter=False, scale_by_std=False)(b)
    assert_close(adv, torch.tensor([[g0, g0, g1, g1], [0, 0, 0, 0]]), atol=1e-6, rtol=0)
    assert g0 == pytest.approx(1.462, abs=1e-3) and g1 == pytest.approx(0.538, abs=1e-3)
    adv = EMPGAdvantage(k=1.0, zeta=0.05, recenter=False, scale_by_std=False)(b)
    assert_close(adv[0], torch.tensor([g0 + 0.05 * e, g0 + 0.05 * e, g1, g1]), atol=1e-6, rtol=0)
    # re-centring subtracts the mean over the two steps: ((g0 + 0.05 e) + g1) / 2 = 1 + 0.025 e
    adv = EMPGAdvantage(k=1.0, zeta=0.05, recenter=True, scale_by_std=False)(b)
    m = 1 + 0.025 * e
    assert_close(adv[0], torch.tensor([g0 + 0.05 * e - m] * 2 + [g1 - m] * 2), atol=1e-6, rtol=0)


def test_steps_from_newlines_when_no_turn_ids():
    # token 9 is a newline: [5, 9 | 5, 5] -> steps [0, 0, 1, 1], the same split as the turn ids above
    b = card_batch(ids=[[5, 9, 5, 5], [9, 9, 9, 9]])
    assert step_ids(b, (9,))[0].tolist() == [0, 0, 1, 1]
    by_nl = EMPGAdvantage(zeta=0.05, newline_ids=(9,), scale_by_std=False)(b)
    by_turn = EMPGAdvantage(zeta=0.05, scale_by_std=False)(card_batch(turns=[[0, 0, 1, 1], [0, 0, 0, 0]]))
    assert_close(by_nl[0], by_turn[0])
    assert step_ids(b, ())[0].tolist() == [0, 0, 0, 0]  # neither: one step per response


def test_card_property_k0_zeta0_is_grpo():
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        b = make_batch(torch.randn(6, generator=g), [0, 0, 0, 1, 1, 1], torch.rand(6, 5, generator=g) > 0.3)
        b = with_steps(b, torch.rand(6, 5, generator=g) * 2, turns=torch.randint(0, 3, (6, 5), generator=g).sort(-1).values)
        assert_close(EMPGAdvantage(k=0.0, zeta=0.0, recenter=False)(b), GRPOAdvantage()(b))


def test_recentred_mean_is_zero_and_no_gradient():
    g = torch.Generator().manual_seed(7)
    b = make_batch(torch.randn(4, generator=g), [0, 0, 1, 1], [[1, 1, 1], [1, 1, 0], [1, 0, 1], [1, 1, 1]])
    turns = torch.tensor([[0, 0, 1], [0, 1, 1], [0, 1, 2], [0, 0, 0]])
    ent = (torch.rand(4, 3, generator=g) * 2).requires_grad_(True)
    b = b.replace(turn_ids=turns, extras={"entropy": ent})
    adv = EMPGAdvantage()(b)
    assert not adv.requires_grad  # an advantage is a constant of the loss: nothing flows back into the entropies
    sid = step_ids(b, ())
    vals = [adv[i, (sid[i] == s) & b.response_mask[i]][0] for i in range(4) for s in range(3)
            if ((sid[i] == s) & b.response_mask[i]).any()]
    assert abs(float(torch.stack(vals).double().mean())) < 1e-6


def loop_empg(rewards, groups, mask, ent, turns, k, kf, zeta, recenter):
    B, T = len(mask), len(mask[0])
    A = []
    for i in range(B):
        same = [rewards[j] for j in range(B) if groups[j] == groups[i]]
        mu = sum(same) / len(same)
        sd = math.sqrt(sum((r - mu) ** 2 for r in same) / max(1, len(same) - 1)) if len(same) > 1 else 0.0
        A.append((rewards[i] - mu) / (sd + 1e-6))
    steps = {}  # (i, s) -> list of entropies; s = rank of the turn label within row i
    rank = [[0] * T for _ in range(B)]
    for i in range(B):
        r = 0
        for t in range(T):
            if t > 0 and turns[i][t] != turns[i][t - 1]:
                r += 1
            rank[i][t] = r
            if mask[i][t]:
                steps.setdefault((i, r), []).append(ent[i][t])
    H = {key: sum(v) / len(v) for key, v in steps.items()}
    lo, hi = min(H.values()), max(H.values())
    Hn = {key: (h - lo) / (hi - lo + 1e-8) for key, h in H.items()}
    mean_e = sum(math.exp(-k * h) for h in Hn.values()) / len(Hn)
    mod = {}
    for (i, s), h in Hn.items():
        nxt = math.exp(-kf * Hn[(i, s + 1)]) if (i, s + 1) in Hn else 0.0
        mod[(i, s)] = math.exp(-k * h) / mean_e * A[i] + zeta * nxt
    c = sum(mod.values()) / len(mod) if recenter else 0.0
    return torch.tensor([[mod[(i, rank[i][t])] - c if mask[i][t] else 0.0 for t in range(T)] for i in range(B)])


@pytest.mark.parametrize("seed", range(6))
def test_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 6
    rewards = torch.randint(0, 2, (B,), generator=g).float() + 0.1 * torch.randn(B, generator=g)
    groups = torch.tensor([3, 3, 3, 8, 8, 8])
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[:, 0] = True
    ent = torch.rand(B, T, generator=g) * 3
    turns = torch.randint(0, 3, (B, T), generator=g).sort(-1).values * 5 + 2  # arbitrary sorted labels
    b = with_steps(make_batch(rewards, groups, mask), ent, turns=turns)
    fn = EMPGAdvantage(k=1.3, k_future=0.7, zeta=0.2, recenter=seed % 2 == 0)
    ref = loop_empg(rewards.tolist(), groups.tolist(), mask.tolist(), ent.tolist(), turns.tolist(), 1.3, 0.7, 0.2,
                    seed % 2 == 0)
    assert_close(fn(b), ref, atol=1e-5, rtol=1e-5)


def test_without_entropy_returns_grpo_and_config_errors():
    b = make_batch([1.0, 0.0, 2.0], [0, 0, 0], [[1, 1], [1, 0], [1, 1]])
    assert_close(EMPGAdvantage()(b), GRPOAdvantage()(b))
    for kw, key in (({"k": -1.0}, "advantage.k"), ({"zeta": -0.1}, "zeta"), ({"newline_ids": (-1,)}, "newline_ids")):
        with pytest.raises(ConfigError, match=key):
            from_config(EMPGAdvantage, **kw)
    assert EMPGAdvantage(newline_ids=[10]).newline_ids == (10,)
    assert EMPGAdvantage.needs == frozenset({"entropy"})


def test_multi_turn_episode_batch_steps_are_turns_of_policy_tokens():
    """A batch laid out by rollout.mode: episodes: a step is a policy turn; observation tokens (same turn id, never
    trained) and padding do not enter the step entropies, and get no advantage."""
    from factories import episode_batch

    # row 0 (R = 1): turn 0 = 2 tokens (H 0.1, 0.3 -> 0.2), observation (H 50), turn 1 = 1 token (H 1.0);
    # row 1 (R = -1): one turn of 2 tokens (H 0.6, 0.6 -> 0.6), then padding (H 7).
    b = episode_batch([[0.0, 1.0], [-1.0]], tokens=[[2, 1], [2]])
    assert b.turn_ids.tolist() == [[0, 0, 0, 1], [0, 0, 0, 0]]
    ent = [[0.1, 0.3, 50.0, 1.0], [0.6, 0.6, 7.0, 7.0]]
    # steps H = [0.2, 1.0 | 0.6] -> H~ = [0, 1, 0.5]; k = 1: e = [1, e^-1, e^-0.5], g = e / mean(e);
    # A (no std) = [1, -1]; zeta = 0.05: row 0's first step adds 0.05 * e^-1 (its next step has H~ = 1).
    e = [1.0, math.exp(-1.0), math.exp(-0.5)]
    m = sum(e) / 3
    g = [x / m for x in e]
    want = torch.tensor([[g[0] + 0.05 * e[1], g[0] + 0.05 * e[1], 0.0, g[1]], [-g[2], -g[2], 0.0, 0.0]])
    fn = EMPGAdvantage(k=1.0, zeta=0.05, recenter=False, scale_by_std=False)
    assert_close(fn(with_steps(b, ent)), want, atol=1e-6, rtol=0)
    ent_obs = [[0.1, 0.3, -3.0, 1.0], [0.6, 0.6, 0.0, 99.0]]  # other observation / padding entropies: no change
    assert_close(fn(with_steps(b, ent_obs)), want, atol=1e-6, rtol=0)
    # the loop reference on random episode batches (steps from the turn ids over all positions, trained tokens only)
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        rewards = [[float(x) for x in torch.rand(int(k), generator=gen)] for k in torch.randint(1, 4, (6,),
                                                                                                 generator=gen)]
        tokens = [[int(x) for x in torch.randint(1, 3, (len(r),), generator=gen)] for r in rewards]
        eb = episode_batch(rewards, [0, 0, 0, 1, 1, 1], tokens=tokens, obs_tokens=2, pad=1, seed=seed)
        H = torch.rand(eb.response_mask.shape, generator=gen) * 2
        ref = loop_empg(eb.rewards.tolist(), [0, 0, 0, 1, 1, 1], eb.response_mask.tolist(), H.tolist(),
                        eb.turn_ids.tolist(), 1.0, 1.0, 0.05, True)
        assert_close(EMPGAdvantage()(with_steps(eb, H)), ref, atol=1e-5, rtol=1e-5)
