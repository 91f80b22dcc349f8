"""GiGPO (arXiv:2505.10978): A = A^E(episode group) + omega * A^S(anchor-state step group), Eqs. 3-8."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.advantage.gigpo import GiGPOAdvantage
from lmpo.methods.advantage.grpo import GRPOAdvantage
from lmpo.methods.aggregate import TokenMean
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from factories import episode_batch, from_config, make_batch

A, B_, C = 11, 22, 33  # observation keys (states)


def per_turn(adv, batch):
    """The advantage of each played turn (its policy tokens all carry the same value)."""
    out = []
    for i in range(batch.batch_size):
        row = []
        for t in range(int(batch.extras["num_turns"][i])):
            v = adv[i][batch.response_mask[i] & (batch.turn_ids[i] == t)]
            assert (v == v[0]).all()
            row.append(float(v[0]))
        out.append(row)
    return out


def test_card_worked_example():
    # Card (b), F_norm = 1, gamma = 1, omega = 1: tau_1 (R = 1) visits s0 then s1, tau_2 (R = 0) only s0.
    # A^E = +0.5 / -0.5; at s0 the step returns are 1 and 0 -> A^S = +0.5 / -0.5 -> +1.0 / -1.0;
    # s1 is visited by tau_1 alone -> A^S = 0 -> +0.5.
    b = episode_batch([[0.0, 1.0], [0.0]], obs_keys=[[A, B_], [A]], tokens=[[2, 1], [3]], pad=1)
    adv = GiGPOAdvantage(gamma=1.0, step_weight=1.0, norm="mean")(b)
    assert per_turn(adv, b) == [[1.0, 0.5], [-1.0]]
    assert (adv[~b.response_mask] == 0).all()  # observation tokens and padding get nothing


def test_hand_case_discount_revisits_and_groups():
    # Group 0: tau_1 keys A B A, rewards 0 0 1 (R 1); tau_2 keys A C, rewards 0 0 (R 0); tau_3 keys A B, rewards
    # 1 0 (R 1). Group 1: tau_4 key A, reward 2 (a group of one). gamma = 0.5:
    # step returns tau_1 [0.25, 0.5, 1], tau_2 [0, 0], tau_3 [1, 0], tau_4 [2].
    # A^E (F = 1): mean 2/3 -> [1/3, -2/3, 1/3]; tau_4 alone -> 0.
    # anchor A in group 0 = {0.25, 1 (tau_1 revisits A), 0, 1}: mean 0.5625 -> -0.3125, 0.4375, -0.5625, 0.4375;
    # anchor B = {0.5, 0}: +-0.25; C and tau_4's A (other group) are alone -> 0.
    b = episode_batch([[0, 0, 1], [0, 0], [1, 0], [2]], [0, 0, 0, 1], obs_keys=[[A, B_, A], [A, C], [A, B_], [A]],
                      tokens=[[1, 2, 1], [2, 2], [1, 1], [2]])
    got = per_turn(GiGPOAdvantage(gamma=0.5)(b), b)
    want = [[1 / 3 - 0.3125, 1 / 3 + 0.25, 1 / 3 + 0.4375], [-2 / 3 - 0.5625, -2 / 3], [1 / 3 + 0.4375, 1 / 3 - 0.25],
            [0.0]]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-6)
    # F_norm = std (Bessel): episode std of [1, 0, 1] = sqrt((1/9 + 4/9 + 1/9) / 2) = sqrt(1/3);
    # anchor A: sum of squared deviations 0.796875 / 3 -> std sqrt(0.265625); anchor B: sqrt(0.125 / 1).
    se, sa, sb = math.sqrt(1 / 3), math.sqrt(0.265625), math.sqrt(0.125)
    got = per_turn(GiGPOAdvantage(gamma=0.5, norm="mean_std", eps=0.0)(b), b)
    want = [[(1 / 3) / se - 0.3125 / sa, (1 / 3) / se + 0.25 / sb, (1 / 3) / se + 0.4375 / sa],
            [(-2 / 3) / se - 0.5625 / sa, (-2 / 3) / se], [(1 / 3) / se + 0.4375 / sa, (1 / 3) / se - 0.25 / sb], [0.0]]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-5)
    # the released code's episode statistics over step rows: weights 3, 2, 2 -> mean 5/7; omega = 0 isolates A^E
    got = per_turn(GiGPOAdvantage(step_weight=0.0, episode_stats="steps")(b), b)
    assert [r[0] for r in got] == pytest.approx([2 / 7, -5 / 7, 2 / 7, 0.0], abs=1e-6)
    # verl-agent's singleton: a group of one keeps its raw return
    assert per_turn(GiGPOAdvantage(step_weight=0.0, singleton="raw")(b), b)[3] == [2.0]


def test_card_property_no_repeated_state_is_episode_grpo():
    # (a) every state distinct -> A^S = 0: with F = std GiGPO is GRPO, with F = 1 Dr. GRPO's centring
    g = torch.Generator().manual_seed(0)
    rewards = [[float(x) for x in torch.rand(int(k), generator=g)] for k in torch.randint(1, 4, (6,), generator=g)]
    keys = [[100 * i + t + 1 for t in range(len(r))] for i, r in enumerate(rewards)]
    b = episode_batch(rewards, [0, 0, 0, 1, 1, 1], obs_keys=keys, pad=2)
    assert_close(GiGPOAdvantage(norm="mean_std")(b), GRPOAdvantage()(b))
    assert_close(GiGPOAdvantage(norm="mean")(b), GRPOAdvantage(scale_by_std=False)(b))
    # single-turn batches (no turn data, no observation keys) too
    s = make_batch([1.0, 0.0, 0.5, 2.0], [0, 0, 0, 1], [3, 2, 1, 2])
    assert_close(GiGPOAdvantage(norm="mean_std")(s), GRPOAdvantage()(s))


def loop_gigpo(turn_rewards, groups, keys, R, gamma, omega, scale, stats, singleton, eps):
    """Eqs. 3-8 with dictionaries, one (episode, step) at a time."""
    B = len(turn_rewards)

    def mean_std(xs):
        m = sum(xs) / len(xs)
        return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)

    AE = []
    for i in range(B):
        members = [j for j in range(B) if groups[j] == groups[i]]
        if len(members) == 1:
            AE.append(R[i] if singleton == "raw" else 0.0)
            continue
        pool = [R[j] for j in members for _ in range(len(turn_rewards[j]) if stats == "steps" else 1)]
        m, s = mean_std(pool)
        AE.append((R[i] - m) / (s + eps) if scale else R[i] - m)
    G = []
    for r in turn_rewards:
        G.append([sum(gamma ** (k - t) * r[k] for k in range(t, len(r))) for t in range(len(r))])
    anchors = {}
    for i in range(B):
        for t, k in enumerate(keys[i]):
            anchors.setdefault((groups[i], k), []).append(G[i][t])
    out = []
    for i in range(B):
        row = []
        for t, k in enumerate(keys[i]):
            pool = anchors[(groups[i], k)]
            if len(pool) == 1:
                a_s = 0.0
            else:
                m, s = mean_std(pool)
                a_s = (G[i][t] - m) / (s + eps) if scale else G[i][t] - m
            row.append(AE[i] + omega * a_s)
        out.append(row)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_matches_loop_reference(seed):
    rng = random.Random(seed)
    B = 9
    groups = [rng.choice([4, 9, 2]) for _ in range(B)]
    turn_rewards = [[rng.choice([0.0, 0.5, 1.0, -0.2]) for _ in range(rng.randint(1, 4))] for _ in range(B)]
    keys = [[rng.choice([A, B_, C]) for _ in r] for r in turn_rewards]  # few states: many repeats
    tokens = [[rng.randint(1, 3) for _ in r] for r in turn_rewards]
    R = [sum(r) + rng.choice([0.0, 0.3]) for r in turn_rewards]  # an outcome that need not equal the turn sum
    b = episode_batch(turn_rewards, groups, obs_keys=keys, tokens=tokens, rewards=R, pad=rng.randint(0, 2),
                      max_turns=5)
    for gamma, omega, norm, stats, single in ((0.95, 1.0, "mean", "trajectories", "zero"),
                                              (0.7, 0.5, "mean_std", "steps", "raw"),
                                              (1.0, 2.0, "mean_std", "trajectories", "zero")):
        fn = GiGPOAdvantage(step_weight=omega, gamma=gamma, norm=norm, episode_stats=stats, singleton=single)
        ref = loop_gigpo(turn_rewards, groups, keys, R, gamma, omega, norm == "mean_std", stats, single, 1e-6)
        got = per_turn(fn(b), b)
        for g, w in zip(got, ref):
            assert g == pytest.approx(w, abs=1e-5)


def test_identical_states_in_other_groups_do_not_mix():
    b = episode_batch([[1.0], [0.0], [5.0], [5.0]], [0, 0, 1, 1], obs_keys=[[A], [A], [A], [A]])
    got = per_turn(GiGPOAdvantage(gamma=1.0)(b), b)
    assert got == [[1.0], [-1.0], [0.0], [0.0]]  # group 1's equal returns leave group 0's anchor untouched


def test_gradient_through_the_clipped_loss_prefers_the_better_action_at_a_shared_state():
    # Two episodes of one group answer the same state s0 with actions 0 and 1 (one token each), then the first
    # earns 1. With gamma = 1, F = 1, omega = 1 the advantages are +1 / -1 (card example). A one-state softmax
    # policy with logits z: token_mean of the clipped loss at ratio 1 = -(1 * log p0 - 1 * log p1) / 2, so
    # d/dz0 = -((1 - p0) + p0) / 2 = -1/2 and d/dz1 = +1/2 for any z.
    b = episode_batch([[1.0], [0.0]], obs_keys=[[A], [A]])
    adv = GiGPOAdvantage(gamma=1.0)(b)
    z = torch.tensor([0.3, -0.8], dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(z, -1)
    lp = torch.stack([logp[0], logp[1]])[:, None]
    batch = b.replace(advantages=adv, old_logprobs=lp.detach().float())
    out = PPOClipLoss(epsilon=0.2)(lp, batch)
    agg = TokenMean()
    agg(out.per_token, batch.response_mask, agg.normaliser(batch.response_mask, 1)).backward()
    assert_close(z.grad, torch.tensor([-0.5, 0.5], dtype=torch.float64), atol=1e-6, rtol=0)
    assert not adv.requires_grad


def test_bad_hyper_parameters_name_the_key():
    for kw, key in (({"gamma": 1.5}, "advantage.gamma"), ({"norm": "std"}, "advantage.norm"),
                    ({"step_weight": -1.0}, "step_weight"), ({"episode_stats": "x"}, "episode_stats")):
        with pytest.raises(ConfigError, match=key):
            from_config(GiGPOAdvantage, **kw)
