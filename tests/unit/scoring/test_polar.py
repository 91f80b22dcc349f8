"""POLAR (arXiv:2507.05197): the pre-training triples' construction (card test 1), the Bradley-Terry values of the
card (test 2), the reward = the discriminator on prompt + reference + separator, a missing reference."""

from __future__ import annotations

import math

import pytest
import torch

from lmpo.errors import RewardError
from lmpo.registry import REWARDS
from lmpo.rewards.polar import polar_pairs, toy_policy_sample
from lmpo.train.scorer_stage import rm_loss


def test_triples_pair_the_references_policy_against_another():
    rows = polar_pairs(200, seed=3, length=2, policies=4, noise=0.0)
    for r in rows:
        d, ref = r["prompt"][:2], r["prompt"][3:5]
        assert r["policy"] != r["other"]
        shift = lambda k: "".join(str((int(c) + k) % 10) for c in d)  # noqa: E731
        assert ref == r["chosen"] == shift(r["policy"]) and r["rejected"] == shift(r["other"])
    assert polar_pairs(5, seed=1) == polar_pairs(5, seed=1)


def test_noise_replaces_digits_at_its_rate():
    import random

    rng = random.Random(0)
    samples = [toy_policy_sample(rng, "0" * 10, 0, 0.5) for _ in range(200)]
    changed = sum(c != "0" for s in samples for c in s) / 2000
    assert changed == pytest.approx(0.5 * 0.9, abs=0.04)  # a random digit is "0" again 1 time in 10


def test_card_bradley_terry_values():
    # r+ = 2, r- = 0: log(1 + e^-2) = 0.1269; swapped: log(1 + e^2) = 2.1269
    assert rm_loss(torch.tensor([2.0]), torch.tensor([0.0]), 0.0, None).item() == pytest.approx(math.log1p(math.exp(-2)), abs=1e-6)
    assert rm_loss(torch.tensor([0.0]), torch.tensor([2.0]), 0.0, None).item() == pytest.approx(2.1269, abs=1e-4)


def test_reward_is_the_discriminator_on_prompt_reference_and_reply():
    polar = REWARDS.build("polar", where="rewards[0]", path="tiny", separator=" ")
    rm = REWARDS.build("reward_model", where="rewards[1]", path="tiny")
    got = polar(["3=", "4="], ["3", "5"], answer=["3", "4"])
    assert got == pytest.approx(rm(["3=3 ", "4=4 "], ["3", "5"]), abs=1e-6)
    with pytest.raises(RewardError, match='"answer" column'):
        polar(["3="], ["3"])
