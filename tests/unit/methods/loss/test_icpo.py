"""ICPO (arXiv:2510.26519): the card's properties (GRPO when nothing is guided, the reject filter, the annealing),
the shaped off-policy term and its gradient by hand, and in-context rollouts re-attached to the plain query."""

from __future__ import annotations

import math

import pytest
import torch

from lmpo.batch import RolloutBatch
from lmpo.errors import ConfigError
from lmpo.methods.loss.icpo import ICPOLoss
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from lmpo.models.load import load_model
from lmpo.rollout.base import GenerationOutput, SamplingParams
from lmpo.train.guidance import Guide
from lmpo.train.rollouts import RolloutContext

from factories import exact_reward, from_config, token_loss_inputs


def test_unguided_batches_get_exactly_the_clipped_grpo_loss():
    logr = torch.tensor([[0.5, -0.1], [0.0, -0.6]], dtype=torch.float64)
    b, lp = token_loss_inputs(logr, [1.0, -2.0])
    assert torch.allclose(ICPOLoss()(lp, b).per_token, PPOClipLoss(epsilon=0.2)(lp, b).per_token)


def test_in_context_tokens_by_hand_and_gradient():
    # pi_theta(. | q) = 0.3, behaviour pi_old(. | D, q) = 0.6 -> x = 0.5, f = 0.5 / 0.6; A = 1 -> loss -5/6
    logr = torch.full((1, 2), math.log(0.3) + 1.0, dtype=torch.float64)  # old = -1
    b, lp = token_loss_inputs(logr, [1.0], extras={"off_policy": torch.ones(1)})
    b = b.replace(sampler_logprobs=torch.full((1, 2), math.log(0.6), dtype=torch.float64))
    out = ICPOLoss()(lp, b)
    assert torch.allclose(out.per_token, torch.full((1, 2), -5 / 6, dtype=torch.float64))
    out.per_token.sum().backward()
    # d/dlogp of -A x / (x + g) = -A g x / (x + g)^2
    assert torch.allclose(lp.grad, torch.full((1, 2), -0.1 * 0.5 / 0.6 ** 2, dtype=torch.float64))


def test_annealing_is_non_increasing_and_ends_at_zero():
    loss = ICPOLoss(alpha0=0.5, anneal_steps=10)
    vals = [loss.alpha(t) for t in range(15)]
    assert vals[0] == 0.5 and vals[5] == 0.25 and all(a >= b for a, b in zip(vals, vals[1:])) and vals[10:] == [0.0] * 5
    with pytest.raises(ConfigError, match="demo_template"):
        from_config(ICPOLoss, demo_template="{prompt}")


class SevenStub:
    """Always answers "7"; records the prompts (so the test sees the demonstrations)."""

    def __init__(self):
        self.seen = []

    def generate(self, prompts, params, **_):
        self.seen += prompts
        n = len(prompts)
        return GenerationOutput(
            prompt_ids=torch.full((n, 9), 4), prompt_mask=torch.ones(n, 9, dtype=torch.bool),
            response_ids=torch.full((n, 2), 10), response_attn=torch.ones(n, 2, dtype=torch.bool),
            sampler_logprobs=torch.full((n, 2), -0.25), truncated=torch.zeros(n, dtype=torch.bool),
            completions=["7"] * n)

    def sync_weights(self):
        pass


def test_reject_sampling_keeps_only_verified_in_context_rollouts():
    _, tok = load_model("tiny")
    ctx = RolloutContext(generator=SevenStub(), tokenizer=tok, reward_set=exact_reward,
                         params=SamplingParams(max_new_tokens=2), num_generations=2)
    rows = [{"prompt": f"{a}=", "answer": a, "solution": a} for a in ("7", "8", "7")]
    B = 6
    batch = RolloutBatch(
        prompt_ids=torch.full((B, 2), 6), prompt_mask=torch.ones(B, 2, dtype=torch.bool),
        response_ids=torch.full((B, 2), 4), response_attn=torch.ones(B, 2, dtype=torch.bool),
        response_mask=torch.ones(B, 2, dtype=torch.bool), group_ids=torch.arange(B) // 2,
        rewards=torch.zeros(B), sampler_logprobs=torch.full((B, 2), -1.0), reward_components=torch.zeros(B, 1),
        truncated=torch.zeros(B, dtype=torch.bool), meta=[{"prompt_key": rows[i // 2]["prompt"], "row": rows[i // 2]}
                                                          for i in range(B)])
    loss = ICPOLoss(alpha0=0.5, anneal_steps=4, demo_template="{prompt}{solution} ")
    out = loss.guide(Guide(ctx, step=2), batch)
    # ICL rewards [1, 0, 1] -> 2 kept (groups 0 and 2), each with the bonus alpha(2) = 0.25
    assert out.extras["guided"].tolist() == [0, 1, 0, 0, 0, 1]
    assert out.rewards.tolist() == [0.0, 1.25, 0.0, 0.0, 0.0, 1.25]
    # the demonstrations are the other rows' solutions; the query comes last
    assert ctx.generator.seen[0] == "8=8 7=7 7="
    # re-attached to the plain query; behaviour = the in-context sampler's log-probs
    kept = out.select(torch.tensor([1]))
    assert tok.decode(kept.prompt_ids[0][kept.prompt_mask[0]]) == "7=" and torch.all(kept.sampler_logprobs == -0.25)
    assert kept.extras["off_policy"].tolist() == [1.0]
