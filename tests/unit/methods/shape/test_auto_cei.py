"""Auto-CEI (arXiv:2410.07627): IDK reward tanh(c2 (n - c1) / 2), initial c1/c2, hill-climbing curriculum on f."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.shape.auto_cei import AutoCEI, count_steps, idk_reward, objective
from factories import from_config, make_batch


def batch_of(rewards, completions):
    b = make_batch(rewards, [0] * len(rewards))
    return b.replace(meta=[{"completion": c} for c in completions])


def steps_text(n, idk=False):
    return "".join(f"step {i}\n" for i in range(n)) + ("I don't know" if idk else "42")


# --------------------------------------------------------------------------- hand cases (the card's)
def test_hand_idk_reward_values():
    # c1 = 13, c2 = 0.4: n = 13 -> tanh(0) = 0; n = 18 -> tanh(0.4 * 5 / 2) = tanh(1) = 0.7616; n = 8 -> -0.7616
    r = idk_reward(torch.tensor([13.0, 18.0, 8.0]), 13.0, 0.4)
    assert_close(r, torch.tensor([0.0, math.tanh(1.0), -math.tanh(1.0)]))
    # the sigmoid form of the paper gives the same numbers: 2 / (1 + e^{-2}) - 1 = tanh(1)
    assert abs(2 / (1 + math.exp(-0.4 * 5)) - 1 - math.tanh(1.0)) < 1e-12


def test_hand_three_way_reward():
    # correct (task reward 1) -> +1; wrong (0) -> -1; IDK after 18 steps with c1 = 13, c2 = 0.4 -> tanh(1).
    # "step i\n" * 17 + "I don't know" = 18 non-empty lines = 18 steps. An IDK that also scored 1 is still IDK.
    b = batch_of([1.0, 0.0, 0.0, 1.0], ["42", "41", steps_text(17, idk=True), "i don't know"])
    out = AutoCEI(c1=13.0, c2=0.4)(b)
    assert count_steps(steps_text(17, idk=True)) == 18
    assert_close(out.rewards, torch.tensor([1.0, -1.0, math.tanh(1.0), math.tanh(0.2 * (1 - 13))]))


def test_hand_initialisation():
    # steps: IDK responses 2 and 4 lines, answers 1 and 1 line -> all steps [2, 4, 1, 1]: mean 2, unbiased std
    # sqrt(((0)^2 + 2^2 + 1 + 1) / 3) = sqrt(2); delta = min(0.2 sqrt 2, 0.5) = 0.2828;
    # c1 = mean IDK steps (3) + delta; c2 = ln 10 / (4 sqrt 2)
    b = batch_of([0, 0, 1, 0], ["a\nI don't know", "a\nb\nc\nI don't know", "7", "8"])
    sh = AutoCEI()
    sh(b)
    s = sh.state_dict()
    assert abs(s["delta"] - 0.2 * math.sqrt(2)) < 1e-6
    assert abs(s["c1"] - (3 + 0.2 * math.sqrt(2))) < 1e-6
    assert abs(s["c2"] - math.log(10) / (4 * math.sqrt(2))) < 1e-6


# --------------------------------------------------------------------------- card properties
def test_objective_limits():
    assert objective(0.8, 0.3, 0.0) == 0.8          # lambda = 0: precision
    assert objective(0.8, 0.3, 1.0) == pytest.approx(0.7)  # lambda = 1: 1 - IDK rate


def test_idk_reward_bounded():
    n = torch.linspace(0, 200, 401)
    r = idk_reward(n, 50.0, 0.05)
    assert (r > -1).all() and (r < 1).all() and (r.diff() > 0).all()


def test_hill_climbing_flips_direction_when_f_drops():
    sh = AutoCEI(c1=10.0, c2=1.0, lam=0.0, update_every=1)
    sh.state["delta"] = 1.0
    good = batch_of([1, 1, 0], ["a", "b", "c"])     # precision 2/3
    bad = batch_of([1, 0, 0], ["a", "b", "c"])      # precision 1/3
    sh(good)
    assert sh.state_dict()["c1"] == 11.0            # first round: +delta
    sh(good)
    assert sh.state_dict()["c1"] == 12.0            # f unchanged: keep going
    sh(bad)
    assert sh.state_dict()["c1"] == 11.0            # f dropped: flip
    fresh = AutoCEI(c1=10.0, c2=1.0, lam=0.0, update_every=1)
    fresh.load_state_dict(sh.state_dict())          # survives resume
    sh(good), fresh(good)
    assert fresh.state_dict() == sh.state_dict()


def test_config_errors():
    for kw, key in (({"lam": 2.0}, "lam"), ({"update_every": 0}, "update_every"), ({"c2": 0.0}, "c2"),
                    ({"idk_phrase": ""}, "idk_phrase")):
        with pytest.raises(ConfigError, match=key):
            from_config(AutoCEI, **kw)


# --------------------------------------------------------------------------- slow reference
@pytest.mark.parametrize("seed", range(4))
def test_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B = 8
    rewards = torch.randint(0, 2, (B,), generator=g).float()
    texts = [steps_text(int(torch.randint(0, 9, (1,), generator=g)), idk=bool(torch.rand(1, generator=g) < 0.4))
             for _ in range(B)]
    out = AutoCEI(c1=4.5, c2=0.7)(batch_of(rewards.tolist(), texts)).rewards
    for i in range(B):
        if "I don't know" in texts[i]:
            n = len([ln for ln in texts[i].split("\n") if ln.strip()])
            ref = 2 / (1 + math.exp(-0.7 * (n - 4.5))) - 1
        else:
            ref = 1.0 if rewards[i] >= 1 else -1.0
        assert abs(out[i].item() - ref) < 1e-6


def test_gradient_of_idk_reward():
    # d/dn tanh(c2 (n - c1) / 2) = (c2 / 2) (1 - tanh^2), checked by float64 gradcheck and analytically
    n = torch.tensor([3.0, 7.5, 12.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: idk_reward(x, 7.0, 0.6), (n,))
    idk_reward(n, 7.0, 0.6).sum().backward()
    t = torch.tanh(0.3 * (n.detach() - 7.0))
    assert_close(n.grad, 0.3 * (1 - t * t))
