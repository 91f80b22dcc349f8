"""AMPO (arXiv:2510.02227): the mixed loss by hand (dual clip on policy tokens, -A f(pi/mu) on teacher tokens), its
gradient, and the guidance rules of the card: no injection into solved groups, top-k by comprehension, rewards of
injected rows at least 1."""

from __future__ import annotations

import math

import pytest
import torch

from lmpo.batch import RolloutBatch
from lmpo.methods.advantage.grpo import GRPOAdvantage
from lmpo.methods.loss.ampo import AMPOLoss, reasoning_of
from lmpo.models.load import load_model
from lmpo.rollout.base import SamplingParams
from lmpo.rollout.hf import HFGenerator
from lmpo.train.guidance import Guide
from lmpo.train.rollouts import RolloutContext

from factories import exact_reward, token_loss_inputs


def mixed_inputs(logr, adv, off_rows, sampler):
    b, lp = token_loss_inputs(logr, adv, old=-1.0)
    B = b.batch_size
    marks = torch.tensor([float(i in off_rows) for i in range(B)])
    return b.replace(sampler_logprobs=torch.as_tensor(sampler, dtype=torch.float64), extras={"off_policy": marks}), lp


def test_loss_by_hand():
    # row 0 on-policy, ratio 1, A = 1: -1 per token. row 1 off-policy: pi = exp(-1 + log(0.5 e)) = 0.5, mu = 1
    # (sampler log-prob 0), A = 2: none -> -2 * 0.5 = -1; p_div_p (gamma 0.1) -> -2 * 0.5 / 0.6 = -5/3.
    logr = [[0.0, 0.0], [math.log(0.5 * math.e)] * 2]
    b, lp = mixed_inputs(logr, [1.0, 2.0], {1}, [[-1.0, -1.0], [0.0, 0.0]])
    out = AMPOLoss()(lp, b)
    assert torch.allclose(out.per_token, torch.tensor([[-1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64))
    shaped = AMPOLoss(shaping="p_div_p")(lp, b)
    assert torch.allclose(shaped.per_token[1], torch.full((2,), -5 / 3, dtype=torch.float64))
    # dual clip on a policy token: A = -1, ratio e^2 = 7.39 -> PPO gives 7.39, bounded by -A c = 3
    b2, lp2 = mixed_inputs([[2.0, 0.0]], [-1.0], set(), [[-1.0, -1.0]])
    assert torch.allclose(AMPOLoss()(lp2, b2).per_token, torch.tensor([[3.0, 1.0]], dtype=torch.float64))
    # unmarked batches are all on-policy (plain dual-clip PPO)
    b3 = b2.replace(extras={})
    assert torch.allclose(AMPOLoss()(lp2, b3).per_token, torch.tensor([[3.0, 1.0]], dtype=torch.float64))


@pytest.mark.parametrize("shaping", ["none", "p_div_p", "sqrt"])
def test_teacher_token_gradient(shaping):
    # d/dlogp of -A f(p) with p = pi/mu = exp(logp): none -A p; p_div_p -A gamma p / (p + gamma)^2; sqrt -A sqrt(p) / 2
    logr = [[-0.3, 0.4]]
    b, lp = mixed_inputs(logr, [1.5], {0}, [[0.0, 0.0]])
    AMPOLoss(shaping=shaping)(lp, b).per_token.sum().backward()
    p = lp.detach().exp()
    want = {"none": -1.5 * p, "p_div_p": -1.5 * 0.1 * p / (p + 0.1) ** 2, "sqrt": -1.5 * p.sqrt() / 2}[shaping]
    assert torch.allclose(lp.grad, want)


def test_reasoning_of():
    assert reasoning_of("so 3+4 = 7, answer 7", "7") == "so 3+4 = 7, answer "
    assert reasoning_of("no number", "7") == "no number"


class ScoredGuide(Guide):
    """The real Guide (tiny model) with the comprehension probabilities fixed by the candidate's text."""

    PROBS = {"11": 0.2, "22": 0.7, "33": 0.1, "44": 0.5}

    def answer_prob(self, rows, contexts, answers):
        return torch.tensor([self.PROBS.get(c, 0.0) for c in contexts])


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def guide(tiny):
    model, tok = tiny
    ctx = RolloutContext(generator=HFGenerator(model, tok), tokenizer=tok, reward_set=exact_reward,
                         params=SamplingParams(max_new_tokens=3), num_generations=8)
    return ScoredGuide(ctx, step=0)


def group(rewards, size):
    B = len(rewards)
    row = {"prompt": "5=", "answer": "5", "teacher_solutions": ["11", "22", "33", "44"]}
    gids = torch.arange(B) // size
    return RolloutBatch(
        prompt_ids=torch.full((B, 2), 6), prompt_mask=torch.ones(B, 2, dtype=torch.bool),
        response_ids=torch.full((B, 2), 4), response_attn=torch.ones(B, 2, dtype=torch.bool),
        response_mask=torch.ones(B, 2, dtype=torch.bool), group_ids=gids, rewards=torch.tensor(rewards),
        sampler_logprobs=torch.full((B, 2), -1.0), reward_components=torch.tensor(rewards)[:, None],
        truncated=torch.zeros(B, dtype=torch.bool),
        meta=[{"prompt_key": "5=", "row": row, "prompt": "5="} for _ in range(B)])


def test_failed_group_gets_the_top_k_teachers_by_comprehension(tiny):
    g = guide(tiny)
    out = AMPOLoss(k=2, verify=False).guide(g, group([0.0] * 8, 8))
    # scores [0.2, 0.7, 0.1, 0.5] -> teachers #2 ("22") and #4 ("44"), in that order, replace the last failures
    assert [m.get("completion") for m in out.meta[6:]] == ["44", "22"]
    assert out.extras["guided"].tolist() == [0] * 6 + [1, 1] and out.extras["off_policy"][6:].tolist() == [1, 1]
    # the traces do not answer "5=", yet the injected rows count as correct (the code raises them to 1)
    assert out.rewards.tolist() == [0.0] * 6 + [1.0, 1.0]
    assert torch.all(out.sampler_logprobs[6:] == 0)  # declared behaviour: probability 1
    assert GRPOAdvantage()(out)[:, 0].abs().sum() > 0  # the group now has a learning signal


def test_the_pool_keeps_verified_traces_only():
    g = guide(tiny=load_model("tiny"))
    b = group([0.0] * 4, 4)
    b.meta[0]["row"]["teacher_solutions"].append("5")  # the only correct trace for "5="
    try:
        out = AMPOLoss(k=2).guide(g, b)
    finally:
        b.meta[0]["row"]["teacher_solutions"].pop()
    assert [m.get("completion") for m in out.meta] == [None, None, None, "5"] and out.rewards.tolist()[3] == 1.0
    assert g.stats["guide/pool_rejected"] == 4.0
    assert AMPOLoss().guide(guide(load_model("tiny")), b) is b  # no correct trace: nothing injected


def test_solved_groups_are_not_guided_unless_hybrid_or_always(tiny):
    b = group([1.0] + [0.0] * 3, 4)
    assert AMPOLoss(verify=False).guide(guide(tiny), b) is b
    assert AMPOLoss(strategy="always", verify=False).guide(guide(tiny), b).extras["guided"].sum() == 2
    assert AMPOLoss(strategy="hybrid", hybrid_p=1.0, verify=False).guide(guide(tiny), b).extras["guided"].sum() == 2
    # k is capped by the number of failed rollouts
    one_failed = group([1.0, 1.0, 1.0, 0.0], 4)
    out = AMPOLoss(strategy="always", k=3, verify=False).guide(guide(tiny), one_failed)
    assert out.extras["guided"].tolist() == [0, 0, 0, 1]
