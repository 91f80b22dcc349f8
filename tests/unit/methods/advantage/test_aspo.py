"""ASPO (arXiv:2508.19201): A'_i = A_i + clip(delta z_i, -k|A_i|, k|A_i|) on correct, tool-using responses."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError, DataError
from lmpo.methods.advantage.aspo import ASPOAdvantage, first_tool_position
from lmpo.methods.advantage.grpo import GRPOAdvantage
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from factories import tool_episode_batch, from_config, make_batch


def with_pos(b, pos):
    return b.replace(extras={**b.extras, "first_tool_pos": torch.tensor(pos, dtype=torch.float32)})


def test_card_worked_example():
    # Dr. GRPO base (no std): rewards (1, 1, 1, -3) -> mean 0 -> A = (1, 1, 1, -3).
    # Eligible: rows 0-2 (correct, called at tokens 100 / 500 / 900); row 3 called a tool but is wrong.
    # mean p = 500, sample std = sqrt((400^2 + 0 + 400^2) / 2) = 400 -> z = (-1, 0, 1)
    # delta = -2: b = (2, 0, -2); k = 0.7, |A| = 1: clipped to (0.7, 0, -0.7) -> A' = (1.7, 1.0, 0.3); row 3 keeps -3.
    b = with_pos(make_batch([1.0, 1.0, 1.0, -3.0], [0, 0, 0, 0], T=2), [100, 500, 900, 200])
    adv = ASPOAdvantage(delta=-2.0, k=0.7, scale_by_std=False)(b)
    assert_close(adv, torch.tensor([[1.7, 1.7], [1.0, 1.0], [0.3, 0.3], [-3.0, -3.0]]))
    # unclipped bias: k = 0.9 bounds at 0.9, delta = -0.5 gives b = (0.5, 0, -0.5) inside the bound
    adv = ASPOAdvantage(delta=-0.5, k=0.9, scale_by_std=False)(b)
    assert_close(adv[:, 0], torch.tensor([1.5, 1.0, 0.5, -3.0]))


def test_positions_from_episode_turns():
    # row 0: turn 0 (2 policy + 1 obs tokens) calls a tool -> last policy token of turn 0 at index 1, turn 0
    # row 1: turn 0 answers (no call), turn 1 (tokens 3..4) calls -> index 4, turn 1; row 2: never calls -> -1
    b = tool_episode_batch([[(2, 1), (1, 0)], [(2, 1), (2, 1), (1, 0)], [(3, 0)]],
                      turn_tool_calls=[[1, 0], [0, 2, 0], [0]], rewards=[1.0, 1.0, 1.0])
    assert first_tool_position(b, "token").tolist() == [1.0, 4.0, -1.0]
    assert first_tool_position(b, "turn").tolist() == [0.0, 1.0, -1.0]
    assert first_tool_position(make_batch([1.0], T=2)) is None  # no tool data at all


def test_episode_batch_end_to_end_by_hand():
    # Group of 4 episodes, rewards (1, 1, 1, 0), GRPO: mean 0.75, sample std 0.5 -> A = (0.5, 0.5, 0.5, -1.5) (eps 1e-6)
    # first calls (turn): row 0 turn 0, row 1 turn 1, row 2 turn 2, row 3 turn 0 (wrong: not eligible)
    # z over rows 0-2 = (-1, 0, 1); delta -2 -> (2, 0, -2), clipped at 0.7 * 0.5 = 0.35 -> A' = (0.85, 0.5, 0.15)
    turns = [[(1, 1), (1, 1), (1, 0)]] * 4
    calls = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]]
    b = tool_episode_batch(turns, rewards=[1.0, 1.0, 1.0, 0.0], turn_tool_calls=calls)
    adv = ASPOAdvantage(position="turn")(b)
    a = 0.5 / (1 + 2e-6)
    want = torch.tensor([a + 0.7 * a, a, a - 0.7 * a, -3 * a])
    assert_close(adv[:, 0], want, atol=1e-5, rtol=0)
    assert torch.all(adv[~b.response_mask] == 0)  # observation tokens are never trained
    # the token positions (1, 3, 4) are not evenly spaced: z = (p - 8/3) / std, std = sqrt(((5/3)^2+(1/3)^2+(4/3)^2)/2)
    p = torch.tensor([0.0, 2.0, 4.0])  # last policy token of turns 0 / 1 / 2 in a (1, 1)-per-turn layout
    z = (p - p.mean()) / p.std()
    bias = (-2.0 * z).clamp(-0.7 * a, 0.7 * a)
    assert_close(ASPOAdvantage(position="token")(b)[:3, 0], a + bias, atol=1e-5, rtol=0)


def test_card_property_sign_kept_and_delta_zero_is_grpo():
    g = torch.Generator().manual_seed(0)
    for seed in range(5):
        rewards = torch.randint(0, 3, (12,), generator=g).float() / 2  # 0, 0.5, 1
        b = with_pos(make_batch(rewards, torch.arange(3).repeat_interleave(4), T=3),
                     torch.where(torch.rand(12, generator=g) > 0.3, torch.randint(0, 50, (12,), generator=g).float(),
                                 torch.tensor(-1.0)).tolist())
        base = GRPOAdvantage()(b)
        for delta in (-2.0, -25.0, 3.0):
            adv = ASPOAdvantage(delta=delta, k=0.9, correct_threshold=0.5)(b)
            assert torch.all(torch.sign(adv) == torch.sign(base)), seed
            assert torch.all((adv - base).abs() <= 0.9 * base.abs() + 1e-6)
        assert_close(ASPOAdvantage(delta=0.0)(b), base)
    # groups with < 2 eligible responses or equal positions are left unshaped
    b = with_pos(make_batch([1.0, 0.0, 1.0, 1.0, 0.0], [0, 0, 1, 1, 1], T=1), [5, 3, 7, 7, 1])
    assert_close(ASPOAdvantage()(b), GRPOAdvantage()(b))


def loop_aspo(rewards, groups, pos, delta, k, thr):
    B = len(rewards)
    A = []
    for i in range(B):
        same = [rewards[j] for j in range(B) if groups[j] == groups[i]]
        mu = sum(same) / len(same)
        sd = math.sqrt(sum((r - mu) ** 2 for r in same) / (len(same) - 1)) if len(same) > 1 else 0.0
        A.append((rewards[i] - mu) / (sd + 1e-6) if sd + 1e-6 > 0 else 0.0)
    out = list(A)
    for g in set(groups):
        el = [i for i in range(B) if groups[i] == g and rewards[i] >= thr and pos[i] >= 0]
        if len(el) < 2:
            continue
        mu = sum(pos[i] for i in el) / len(el)
        sd = math.sqrt(sum((pos[i] - mu) ** 2 for i in el) / (len(el) - 1))
        if sd == 0:
            continue
        for i in el:
            b = delta * (pos[i] - mu) / sd
            out[i] = A[i] + max(-k * abs(A[i]), min(k * abs(A[i]), b))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B = 10
    groups = torch.tensor([4, 4, 4, 4, 9, 9, 9, 2, 2, 2])[torch.randperm(B, generator=g)]
    rewards = torch.randint(0, 3, (B,), generator=g).float() / 2
    pos = torch.where(torch.rand(B, generator=g) > 0.25, torch.randint(0, 40, (B,), generator=g).float(),
                      torch.tensor(-1.0))
    mask = torch.rand(B, 4, generator=g) > 0.3
    mask[:, 0] = True
    b = with_pos(make_batch(rewards, groups, mask), pos.tolist())
    ref = loop_aspo(rewards.tolist(), groups.tolist(), pos.tolist(), -1.3, 0.6, 0.5)
    adv = ASPOAdvantage(delta=-1.3, k=0.6, correct_threshold=0.5)(b)
    assert_close(adv, torch.tensor(ref)[:, None] * mask, atol=1e-5, rtol=1e-5)


def test_gradient_of_the_clipped_loss_carries_the_shaped_advantage():
    # At theta = theta_old the PPO-clip loss per token is -A' * ratio, so d loss / d logprob = -A' (analytic).
    b = with_pos(make_batch([1.0, 1.0, 1.0, -3.0], [0, 0, 0, 0], T=2), [100, 500, 900, 200])
    adv = ASPOAdvantage(delta=-2.0, k=0.7, scale_by_std=False)(b)
    b = b.replace(advantages=adv, old_logprobs=torch.full((4, 2), -1.0, dtype=torch.float64))
    lp = torch.full((4, 2), -1.0, dtype=torch.float64, requires_grad=True)
    PPOClipLoss()(lp, b).per_token.sum().backward()
    assert_close(lp.grad, -adv.double())
    assert not adv.requires_grad


def test_config_errors_and_require_code_pass():
    for kw, key in (({"k": 1.0}, "advantage.k"), ({"k": -0.1}, "advantage.k"), ({"position": "step"}, "position")):
        with pytest.raises(ConfigError, match=key):
            from_config(ASPOAdvantage, **kw)
    turns = [[(1, 1), (1, 0)]] * 3
    b = tool_episode_batch(turns, rewards=[1.0, 1.0, 1.0], turn_tool_calls=[[1, 0], [0, 1], [1, 0]],
                      invalid_tool_calls=[0, 0, 1])
    # without the gate rows 0, 2 (turn 0) and 1 (turn 1) are eligible but the group's rewards are equal (A = 0): the
    # bias is clipped to 0. Give the group a wrong member so A != 0:
    b = tool_episode_batch(turns + [[(1, 0)]], rewards=[1.0, 1.0, 1.0, 0.0], turn_tool_calls=[[1, 0], [0, 1], [1, 0], [0]],
                      invalid_tool_calls=[0, 0, 1, 0])
    plain = ASPOAdvantage(position="turn")(b)[:, 0]
    gated = ASPOAdvantage(position="turn", require_code_pass=True)(b)[:, 0]
    base = GRPOAdvantage()(b)[:, 0]
    assert plain[2] > base[2] and gated[2] == base[2]  # row 2's invalid call makes it ineligible under the gate
    assert plain[1] < base[1]
    with pytest.raises(DataError, match="invalid_tool_calls"):
        ASPOAdvantage(require_code_pass=True)(with_pos(make_batch([1.0, 0.0], T=1), [1, 2]))
