"""ReMax (arXiv:2310.10505 Eq. 6): A_t = G_t - r(x, greedy reply); the greedy replies are made in after_collect."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import DataError
from lmpo.methods.advantage.remax import ReMaxAdvantage
from lmpo.rollout.base import SamplingParams
from factories import EchoGenerator, exact_reward, make_batch


class GreedyCheck(EchoGenerator):
    """Answers "7" and records whether it was asked to decode greedily."""

    def __init__(self):
        super().__init__()
        self.params: list[SamplingParams] = []

    def generate(self, prompts, params, **kw):
        self.params.append(params)
        return super().generate(prompts, params, **kw)


class Ctx:
    def __init__(self, gen):
        self.generator, self.params = gen, SamplingParams(max_new_tokens=5)
        self.reward_set = staticmethod(exact_reward)


def collected(rewards, prompts, answers, lengths, T):
    b = make_batch(rewards, list(range(len(rewards))), lengths, T=T)
    b.meta = [{"prompt": p, "prompt_key": p, "row": {"prompt": p, "answer": a}} for p, a in zip(prompts, answers)]
    return b


def test_hand_with_given_baselines():
    # R = [1, 0, 0.5], baselines [0.5, 0.5, 1], lengths [2, 1, 2], T = 2: A = R - b on valid tokens
    b = make_batch([1.0, 0.0, 0.5], [0, 0, 1], [2, 1, 2], T=2)
    b = b.replace(extras={"reward_baselines": torch.tensor([0.5, 0.5, 1.0])})
    assert_close(ReMaxAdvantage()(b), torch.tensor([[0.5, 0.5], [-0.5, 0.0], [-0.5, -0.5]]))
    # token rewards enter the return to go: G_t = R + sum_{s >= t} r_s
    b2 = b.replace(token_rewards=torch.tensor([[-0.1, -0.2], [0.3, 9.0], [0.0, 0.0]]))
    assert_close(ReMaxAdvantage()(b2), torch.tensor([[0.2, 0.3], [-0.2, 0.0], [-0.5, -0.5]]))


def test_after_collect_decodes_each_prompt_once_greedily_and_scores_it():
    # prompts x, x, y: the greedy reply "7" is right for x (answer 7) and wrong for y -> b(x) = 1, b(y) = 0
    gen = GreedyCheck()
    adv = ReMaxAdvantage()
    b = collected([1.0, 0.0, 1.0], ["x", "x", "y"], ["7", "7", "3"], [1, 1, 1], 1)
    adv.after_collect(Ctx(gen), b)
    assert gen.seen == ["x", "y"] and all(p.is_greedy for p in gen.params)
    assert gen.params[0].max_new_tokens == 5
    assert_close(adv(b)[:, 0], torch.tensor([0.0, -1.0, 1.0]))
    ReMaxAdvantage(greedy_max_new_tokens=2).after_collect(Ctx(gen), b)
    assert gen.params[-1].max_new_tokens == 2


def test_card_property_unbiased_baseline_removes_the_shared_part():
    # the gradient weight is R - r(greedy): a prompt whose greedy reply is already right pushes only the samples
    # that beat it (none with 0/1 rewards) and pushes down the wrong ones; a baseline independent of the sample
    # leaves E[A grad log pi] unchanged: on a two-armed bandit the exact expectation equals d E[R]/d p
    p = 0.3
    total = 0.0
    for y, prob in ((0, p), (1, 1 - p)):
        R = 1.0 if y == 0 else 0.0
        b = make_batch([R], [0], T=1).replace(extras={"reward_baselines": torch.tensor([1.0])})  # greedy picks arm 0
        A = ReMaxAdvantage()(b)[0, 0].item()
        total += prob * A * (1 / p if y == 0 else -1 / (1 - p))
    assert abs(total - 1.0) < 1e-6  # d/dp E[R] = d/dp p = 1


def test_missing_baseline_for_a_collected_prompt_is_an_error():
    adv = ReMaxAdvantage()
    adv.after_collect(Ctx(EchoGenerator()), collected([1.0], ["x"], ["7"], [1], 1))
    with pytest.raises(DataError, match="remax.*greedy baseline"):
        adv(collected([1.0], ["z"], ["7"], [1], 1))


def test_batch_without_prompts_uses_a_zero_baseline():
    b = make_batch([2.0, -1.0], [0, 1], [1, 2], T=2)
    assert_close(ReMaxAdvantage()(b), torch.tensor([[2.0, 0.0], [-1.0, -1.0]]))
