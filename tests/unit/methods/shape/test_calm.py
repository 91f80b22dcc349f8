"""CALM (arXiv:2409.12798): a judge's subgoal verdicts per transition, paid once per subgoal as turn rewards."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError, DataError
from lmpo.methods.advantage.gigpo import GiGPOAdvantage
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from lmpo.methods.shape.calm import CALMShaper, first_achievements, transitions
from lmpo.models.load import load_model
from factories import from_config, tool_episode_batch


def batch_with_ids(seed=0):
    # row 0: turn 0 = 2 policy + 1 observation token, turn 1 = 1 policy token; row 1: one turn of 2 tokens
    b = tool_episode_batch([[(2, 1), (1, 0)], [(2, 0)]], rewards=[1.0, 0.0], turn_rewards=[[0.0, 1.0], [0.0]])
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 16, b.response_ids.shape, generator=g) * b.response_attn
    return b.replace(response_ids=ids, prompt_ids=torch.tensor([[5], [7]]))


def table(values):
    """A judge that answers ``values[(row, turn)]`` (one probability per subgoal), 0 elsewhere."""
    def judge(trans, subgoals):
        return torch.tensor([values.get((tr.row, tr.turn), [0.0] * len(subgoals)) for tr in trans])
    return judge


def shaper(judge, **kw):
    s = CALMShaper(**kw)
    s.__dict__["_judge"] = judge
    return s


def test_transitions_split_history_action_and_observation():
    b = batch_with_ids()
    r = b.response_ids
    got = {(t.row, t.turn): (t.history, t.action, t.observation) for t in transitions(b)}
    assert got == {(0, 0): ([5], r[0, :2].tolist(), [r[0, 2].item()]),
                   (0, 1): ([5] + r[0, :3].tolist(), [r[0, 3].item()], []),
                   (1, 0): ([7], r[1, :2].tolist(), [])}


def test_a_subgoal_pays_once_at_its_first_achievement():
    # card (b): subgoal 0 flagged at turns 3 and 5 pays only at turn 3; subgoal 1 at turns 1 and 3 pays at turn 1
    ach = torch.zeros(6, 2, dtype=torch.bool)
    ach[3, 0] = ach[5, 0] = ach[1, 1] = ach[3, 1] = True
    got = first_achievements(ach, rows=[0] * 6, turns=list(range(6)), B=1, M=6)
    assert got.tolist() == [[0, 1, 0, 1, 0, 0]]


def test_never_achieved_leaves_the_rewards_as_they_are():
    b = batch_with_ids()
    out = shaper(table({}), subgoals=["1", "2"])(b)  # card (a): a judge that never says "achieved": r~ = r
    assert torch.equal(out.rewards, b.rewards) and torch.equal(out.extras["turn_rewards"], b.extras["turn_rewards"])
    assert out.extras["calm_bonus"].abs().sum() == 0


def test_bonus_by_hand():
    b = batch_with_ids()
    # subgoal A at (0, 0) and again at (0, 1): once, at turn 0; B at (0, 1) and (1, 0); 0.4 is below the threshold
    judge = table({(0, 0): [0.9, 0.4], (0, 1): [0.8, 0.7], (1, 0): [0.1, 0.6]})
    out = shaper(judge, subgoals=["A", "B"], bonus=0.25, threshold=0.5)(b)
    assert out.extras["calm_bonus"].tolist() == [[0.25, 0.25], [0.25, 0.0]]
    assert out.extras["turn_rewards"].tolist() == [[0.25, 1.25], [0.25, 0.0]]
    assert out.rewards.tolist() == [1.5, 0.25]


def test_lm_judge_matches_a_forward_per_transition_and_subgoal():
    b = batch_with_ids()
    s = CALMShaper(judge="tiny:3", subgoals=["1", "22"], template="{subgoal}=", batch_size=2)
    probs = s.scorer()(transitions(b), ["1", "22"])
    model, tok = load_model("tiny:3")
    yes, no = tok.convert_tokens_to_ids("+"), tok.convert_tokens_to_ids("=")
    want = []
    with torch.no_grad():
        for tr in transitions(b):
            row = []
            for q in ("1=", "22="):
                ids = tr.history + tr.action + tr.observation + tok(q, add_special_tokens=False)["input_ids"]
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
                row.append(torch.sigmoid(logits[yes] - logits[no]).item())
            want.append(row)
    assert_close(probs, torch.tensor(want), atol=1e-5, rtol=1e-5)
    thr = float(probs.flatten().sort().values[2])  # strictly above: the three largest probabilities count
    out = CALMShaper(judge="tiny:3", subgoals=["1", "22"], template="{subgoal}=", threshold=thr)(b)
    ach = probs > thr
    by_hand = torch.zeros(2, 2)
    for (i, t), a in zip([(0, 0), (0, 1), (1, 0)], ach):
        for k in range(2):
            earlier = any(ach[n, k] for n, (i2, t2) in enumerate([(0, 0), (0, 1), (1, 0)]) if i2 == i and t2 < t)
            by_hand[i, t] += 0.1 * float(a[k] and not earlier)
    assert_close(out.extras["calm_bonus"], by_hand)


def test_module_function_judge_and_its_errors():
    b = batch_with_ids()
    s = CALMShaper(judge="learning.calm_judge:copy_judge", subgoals=["1", "2"])
    assert s(b).extras["calm_bonus"].shape == (2, 2)
    with pytest.raises(ConfigError, match="could not be imported"):
        CALMShaper(judge="no_such_module:judge")(b)
    with pytest.raises(DataError, match=r"expected finite \(3, 1\)"):
        shaper(lambda trans, g: torch.zeros(2, 1), subgoals=["1"])(b)
    with pytest.raises(ConfigError, match="subgoals"):
        from_config(CALMShaper, subgoals=[])
    with pytest.raises(ConfigError, match="yes_token"):
        CALMShaper(yes_token="yes")(b)
    with pytest.raises(ConfigError, match="template"):
        CALMShaper(subgoals=["open the door"])(b)


def test_gradient_pushes_up_the_credited_turn():
    """The bonus reaches the loss: under GiGPO's turn credit and the clipped surrogate (on-policy), the gradient on
    the log-probs of the turn that achieved a subgoal changes exactly as its advantage does."""
    b = tool_episode_batch([[(1, 1), (1, 0)], [(1, 1), (1, 0)]], group_ids=[0, 0], turn_rewards=[[0.0, 1.0], [0.0, 1.0]])
    shaped = shaper(table({(0, 0): [1.0]}), subgoals=["1"], bonus=0.5)(b)  # row 0's first turn achieved it

    def grad(batch):
        adv = GiGPOAdvantage()(batch)
        lp = torch.zeros(batch.response_ids.shape, requires_grad=True)
        loss = PPOClipLoss()(lp, batch.replace(advantages=adv, old_logprobs=torch.zeros_like(lp))).per_token
        (loss * batch.response_mask).sum().backward()
        return lp.grad, adv

    g0, a0 = grad(b)
    g1, a1 = grad(shaped)
    assert torch.equal(a0, torch.zeros_like(a0))  # identical episodes: no signal without the bonus
    assert a1[0, 0] > 0 and a1[1, 0] < 0  # the credited turn up, its peer down
    assert_close(g1, -a1 * shaped.response_mask)  # d(-A * ratio)/d logp = -A at ratio 1
    assert g1[0, 0] < g0[0, 0]
