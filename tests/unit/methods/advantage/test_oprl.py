"""OPRL / iStar (arXiv:2509.19199): implicit step rewards of a PRM trained online by trajectory DPO."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError, DataError
from lmpo.methods.advantage.grpo import GRPOAdvantage
from lmpo.methods.advantage.oprl import OPRLAdvantage, dpo_pair_loss, implicit_step_rewards, step_advantages
from factories import from_config, tool_episode_batch


def episodes(seed=0, rewards=(1.0, 0.0, 0.0, 1.0)):
    # two groups of two; row 0: turn 0 = 2 policy + 1 observation token, turn 1 = 1 policy token; others likewise
    b = tool_episode_batch([[(2, 1), (1, 0)], [(1, 1), (2, 0)], [(2, 0)], [(1, 1), (1, 0)]], rewards=list(rewards),
                           group_ids=[0, 0, 1, 1])
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 16, b.response_ids.shape, generator=g) * b.response_attn
    lp = -torch.rand(b.response_ids.shape, generator=g) * b.response_mask
    return b.replace(response_ids=ids, prompt_ids=torch.tensor([[5], [7], [6], [9]]), sampler_logprobs=lp)


def test_step_rewards_by_hand_and_their_sum_is_the_sequence_log_ratio():
    b = episodes()
    prm = torch.zeros_like(b.sampler_logprobs)
    prm[0, :4] = torch.tensor([-0.1, -0.2, -9.0, -0.3])  # token 2 is an observation: never counted
    r = implicit_step_rewards(prm, b.sampler_logprobs, b, 2, beta=0.5)
    old = b.sampler_logprobs[0]
    assert_close(r[0], 0.5 * torch.stack([(-0.1 - old[0]) + (-0.2 - old[1]), -0.3 - old[3]]).double())
    # card (b): the step rewards add up to beta x (log pi_phi(tau) - log pi_old(tau)) over the action tokens
    seq = ((prm - b.sampler_logprobs) * b.response_mask).sum(-1).double()
    assert_close(r.sum(-1), 0.5 * seq)


def test_dpo_pair_loss_by_hand():
    s = torch.tensor([0.3, -0.2, 0.1, 0.4])
    loss, pairs = dpo_pair_loss(s, torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([0, 0, 1, 1]), beta=2.0)
    want = (-math.log(1 / (1 + math.exp(-2.0 * 0.5))) - math.log(1 / (1 + math.exp(-2.0 * 0.3)))) / 2
    assert pairs == 2 and abs(loss.item() - want) < 1e-6
    loss, pairs = dpo_pair_loss(s, torch.ones(4), torch.tensor([0, 0, 1, 1]), beta=2.0)
    assert pairs == 0 and loss.item() == 0  # ties: no pair, no update


def test_step_advantages_pool_a_groups_played_steps():
    r = torch.tensor([[1.0, 3.0], [2.0, 0.0]], dtype=torch.float64)
    z = step_advantages(r, torch.tensor([2, 1]), torch.tensor([0, 0]), eps=0.0)
    pool = torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)  # row 1's second step was not played
    want = (pool - pool.mean()) / pool.std(unbiased=False)
    assert_close(z, torch.tensor([[want[0], want[1]], [want[2], 0.0]], dtype=torch.float64))


def test_prm_equal_to_the_sampler_gives_the_episode_advantage():
    """Card (a): pi_phi = pi_old -> every step reward is 0 and the advantage is GRPO's."""
    b = episodes()
    oprl = OPRLAdvantage(prm="tiny:3", update="none")
    b = b.replace(sampler_logprobs=oprl.prm_logprobs(b, grad=False) * b.response_mask)
    assert_close(oprl(b), GRPOAdvantage(eps=oprl.eps)(b), atol=1e-5, rtol=0)


def test_advantage_adds_omega_times_the_z_scored_step_rewards():
    b = episodes()
    oprl = OPRLAdvantage(prm="tiny:3", update="none", step_weight=0.5, beta=0.05)
    lp = oprl.prm_logprobs(b, grad=False)
    r = implicit_step_rewards(lp, b.sampler_logprobs, b, 2, 0.05)
    z = torch.zeros(4, 2)
    for rows in ([0, 1], [2, 3]):  # each group's played steps, z-scored together
        cells = [(i, t) for i in rows for t in range(int(b.extras["num_turns"][i]))]
        v = torch.tensor([r[i, t].item() for i, t in cells])
        for (i, t), x in zip(cells, (v - v.mean()) / (v.std(unbiased=False) + oprl.eps)):
            z[i, t] = x
    want = GRPOAdvantage(eps=oprl.eps)(b) + 0.5 * z.gather(1, b.turn_ids.clamp(0, 1)) * b.response_mask
    assert_close(oprl(b), want, atol=1e-5, rtol=1e-5)


def test_dpo_step_raises_the_better_trajectorys_implicit_reward():
    """The PRM's gradient: one AdamW step (large learning rate) moves the better episode's log-ratio up relative to
    the worse one's in each group, and the update counter and checkpoint state follow."""
    b = episodes()
    oprl = OPRLAdvantage(prm="tiny:3", learning_rate=1e-2, update="after")

    def margins():
        lp = oprl.prm_logprobs(b, grad=False)
        s = ((lp - b.sampler_logprobs) * b.response_mask).sum(-1)
        return torch.stack([s[0] - s[1], s[3] - s[2]])

    before = margins()
    oprl(b)
    after = margins()
    assert (after > before).all(), (before, after)
    state = oprl.state_dict()
    assert state["updates"] == 1
    fresh = OPRLAdvantage(prm="tiny:3", learning_rate=1e-2)
    fresh.load_state_dict(state)
    assert_close(fresh.prm_logprobs(b, grad=False), oprl.prm_logprobs(b, grad=False))
    with pytest.raises(DataError, match="expected"):
        fresh.load_state_dict({"prm": {}})


def test_gradient_of_the_dpo_loss_by_hand():
    """d/ds_i of -log sigma(beta (s_+ - s_-)) = -beta sigma(-beta (s_+ - s_-)) on tau+, the opposite on tau-."""
    s = torch.tensor([0.3, -0.2], requires_grad=True)
    loss, _ = dpo_pair_loss(s, torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), beta=2.0)
    loss.backward()
    g = 2.0 / (1 + math.exp(2.0 * 0.5))
    assert_close(s.grad, torch.tensor([-g, g]))


def test_errors():
    big = episodes()
    big = big.replace(response_ids=big.response_ids + 40 * big.response_attn)
    with pytest.raises(DataError, match="vocabulary"):
        OPRLAdvantage()(big)
    with pytest.raises(ConfigError, match="update"):
        from_config(OPRLAdvantage, update="sometimes")
    with pytest.raises(ConfigError, match="beta"):
        from_config(OPRLAdvantage, beta=0.0)
