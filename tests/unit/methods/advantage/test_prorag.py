"""ProRAG (arXiv:2601.21912): A_{i,t} = A^out_i + beta (p_{i,t} - mu_g) / sigma_g * m_{i,t}."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.advantage.grpo import GRPOAdvantage
from lmpo.methods.advantage.prorag import ProRAGAdvantage, step_scores
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from factories import tool_episode_batch, from_config, make_batch


def test_card_worked_example():
    # one group, R = (2, 0): mean 1, sample std sqrt(2) -> A_out = +-1 / (sqrt 2 + 1e-4); equal step scores -> 0
    b = tool_episode_batch([[(2, 1), (1, 0)], [(1, 0)]], rewards=[2.0, 0.0], turn_rewards=[[0.5, 0.5], [0.5]])
    adv = ProRAGAdvantage(beta=0.3)(b)
    a = 1 / (math.sqrt(2) + 1e-4)
    assert_close(adv[0][b.response_mask[0]], torch.full((3,), a))
    assert_close(adv[1][b.response_mask[1]], torch.full((1,), -a))
    assert torch.all(adv[~b.response_mask] == 0)  # retrieved documents (observations) get 0


def test_step_term_by_hand():
    # one group of 2 episodes, R = (1, 1) -> A_out = 0. Tokens (trained): row 0 turn 0 x2 (score 1), turn 1 x1
    # (score 0); row 1 turn 0 x1 (score 0). mu = 2/4 = 0.5, var = (0.25 * 4) / 4 = 0.25 -> sigma = sqrt(0.25 + 1e-8)
    b = tool_episode_batch([[(2, 1), (1, 0)], [(1, 0)]], rewards=[1.0, 1.0], turn_rewards=[[1.0, 0.0], [0.0]])
    s = math.sqrt(0.25 + 1e-8)
    adv = ProRAGAdvantage(beta=0.5)(b)
    want = torch.zeros(2, 4)
    want[0, :2] = 0.5 * 0.5 / s
    want[0, 3] = -0.5 * 0.5 / s
    want[1, 0] = -0.5 * 0.5 / s
    assert_close(adv, want)
    # explicit PRM scores win over the environment's turn rewards
    b2 = b.replace(extras={**b.extras, "turn_scores": torch.tensor([[0.2, 0.2], [0.2, 0.0]])})
    assert_close(ProRAGAdvantage(beta=0.5)(b2), torch.zeros(2, 4))  # all trained tokens score 0.2: no step term
    assert step_scores(b2)[0].tolist() == pytest.approx([0.2, 0.2, 0.2, 0.2])


def test_card_property_beta0_is_grpo_and_singletons():
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        b = make_batch(torch.randn(6, generator=g), [0, 0, 0, 1, 1, 1], torch.rand(6, 4, generator=g) > 0.3,
                       token_rewards=torch.rand(6, 4, generator=g))
        assert_close(ProRAGAdvantage(beta=0.0)(b), GRPOAdvantage(eps=1e-4)(b.replace(token_rewards=None)))
    # a group with one trained token has sigma = 1: (p - p) / 1 = 0
    b = make_batch([1.0], [0], [[1, 0]], token_rewards=[[3.0, 9.0]])
    assert_close(ProRAGAdvantage()(b), torch.zeros(1, 2))


def loop_prorag(rewards, groups, mask, p, beta):
    B, T = len(mask), len(mask[0])
    out = [[0.0] * T for _ in range(B)]
    for i in range(B):
        same = [j for j in range(B) if groups[j] == groups[i]]
        rs = [rewards[j] for j in same]
        mu_r = sum(rs) / len(rs)
        sd_r = math.sqrt(sum((r - mu_r) ** 2 for r in rs) / (len(rs) - 1)) if len(rs) > 1 else 0.0
        a = (rewards[i] - mu_r) / (sd_r + 1e-4)
        vals = [p[j][t] for j in same for t in range(T) if mask[j][t]]
        mu = sum(vals) / max(1, len(vals))
        sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / max(1, len(vals)) + 1e-8) if len(vals) > 1 else 1.0
        for t in range(T):
            if mask[i][t]:
                out[i][t] = a + beta * (p[i][t] - mu) / sd
    return torch.tensor(out)


@pytest.mark.parametrize("seed", range(6))
def test_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    groups = torch.tensor([2, 2, 2, 6, 6, 6, 6, 4])[torch.randperm(8, generator=g)]
    turns = [[(int(torch.randint(1, 3, (1,), generator=g)), int(torch.randint(0, 2, (1,), generator=g)))
              for _ in range(int(torch.randint(1, 4, (1,), generator=g)))] for _ in range(8)]
    scores = [torch.rand(len(t), generator=g).tolist() for t in turns]
    rewards = torch.randint(0, 3, (8,), generator=g).float()
    b = tool_episode_batch(turns, rewards=rewards, group_ids=groups, turn_rewards=scores)
    p = step_scores(b)
    ref = loop_prorag(rewards.tolist(), groups.tolist(), b.response_mask.tolist(), p.tolist(), 0.7)
    assert_close(ProRAGAdvantage(beta=0.7)(b), ref, atol=1e-5, rtol=1e-5)


def test_gradient_at_the_old_policy_is_minus_the_advantage():
    b = tool_episode_batch([[(2, 1), (1, 0)], [(1, 0)], [(2, 0)]], rewards=[1.0, 0.0, 1.0],
                      turn_rewards=[[1.0, 0.0], [0.0], [0.5]])
    adv = ProRAGAdvantage()(b)
    T = adv.shape[1]
    b = b.replace(advantages=adv, old_logprobs=torch.full((3, T), -1.0))
    lp = torch.full((3, T), -1.0, requires_grad=True)
    PPOClipLoss()(lp, b).per_token.sum().backward()
    assert_close(lp.grad, -adv)


def test_config_errors():
    for kw, key in (({"beta": -0.1}, "advantage.beta"), ({"eps": -1.0}, "advantage.eps")):
        with pytest.raises(ConfigError, match=key):
            from_config(ProRAGAdvantage, **kw)
