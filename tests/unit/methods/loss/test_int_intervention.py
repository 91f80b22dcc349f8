"""InT (arXiv:2601.14209): the card's properties (the SFT target is the prefix before t* plus the intervention and
nothing after; "No error" adds nothing), the proposer's parsing, the loss by hand and its gradient."""

from __future__ import annotations

import torch

from lmpo.batch import RolloutBatch
from lmpo.methods.loss.int_intervention import InTLoss, parse_intervention, splice
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from lmpo.models.load import load_model
from lmpo.rollout.base import GenerationOutput, SamplingParams
from lmpo.train.guidance import Guide
from lmpo.train.rollouts import RolloutContext

from factories import exact_reward, token_loss_inputs


def test_target_keeps_steps_before_the_error_and_the_intervention_only():
    steps = ["s1", "s2", "s3", "s4", "s5"]
    assert splice(steps, 3, "fix", "\n") == "s1\ns2\nfix"  # t* = 3: steps 1-2, the fix, none of 3..5
    assert splice(steps, 1, "fix", "\n") == "fix"
    assert parse_intervention("The first error is in Step 3: 2+2=4 hence", 5) == (3, "2+2=4 hence")
    assert parse_intervention("No error", 5) is None
    assert parse_intervention("step 9: x", 5) is None and parse_intervention("Step 2:   ", 5) is None


def test_loss_by_hand_and_gradient():
    # row 0: a policy rollout (clip surrogate); row 1: an intervention (NLL): loss = -logp, gradient -sft_coef
    logr = torch.tensor([[0.1, -0.2], [0.3, 0.4]], dtype=torch.float64)
    b, lp = token_loss_inputs(logr, [1.0, 5.0], old=-1.0, extras={"off_policy": torch.tensor([0.0, 1.0])})
    out = InTLoss(sft_coef=0.5)(lp, b)
    ppo = PPOClipLoss(epsilon=0.2)(lp, b).per_token
    assert torch.allclose(out.per_token[0], ppo[0])
    assert torch.allclose(out.per_token[1], -0.5 * (logr[1] - 1.0))
    out.per_token.sum().backward()
    assert torch.allclose(lp.grad[1], torch.full((2,), -0.5, dtype=torch.float64))


class Proposer:
    """The proposer answers with ``reply``; ``model`` (the tiny policy) scores the intervention rows."""

    def __init__(self, reply, model):
        self.reply, self.seen, self.model = reply, [], model

    def generate(self, prompts, params, **_):
        self.seen += prompts
        n = len(prompts)
        return GenerationOutput(
            prompt_ids=torch.full((n, 2), 4), prompt_mask=torch.ones(n, 2, dtype=torch.bool),
            response_ids=torch.full((n, 2), 4), response_attn=torch.ones(n, 2, dtype=torch.bool),
            sampler_logprobs=torch.zeros(n, 2), truncated=torch.zeros(n, dtype=torch.bool), completions=[self.reply] * n)

    def sync_weights(self):
        pass


def batch_of(completions, rewards):
    row = {"prompt": "1+2+3=", "answer": "6", "solution": "1+2=3 3+3=6"}
    B = len(rewards)
    return RolloutBatch(
        prompt_ids=torch.full((B, 2), 6), prompt_mask=torch.ones(B, 2, dtype=torch.bool),
        response_ids=torch.full((B, 2), 4), response_attn=torch.ones(B, 2, dtype=torch.bool),
        response_mask=torch.ones(B, 2, dtype=torch.bool), group_ids=torch.zeros(B, dtype=torch.long),
        rewards=torch.tensor(rewards), sampler_logprobs=torch.full((B, 2), -1.0), reward_components=torch.zeros(B, 1),
        truncated=torch.zeros(B, dtype=torch.bool),
        meta=[{"prompt_key": row["prompt"], "row": row, "completion": c} for c in completions])


def guide_with(reply):
    model, tok = load_model("tiny")
    ctx = RolloutContext(generator=Proposer(reply, model), tokenizer=tok, reward_set=exact_reward,
                         params=SamplingParams(max_new_tokens=16), num_generations=2)
    return Guide(ctx, step=0)


def test_failed_rollout_gets_an_intervention_row():
    g = guide_with("Step 2: 3+3=6")
    b = batch_of(["1+2=3 3+3=7 7", "6"], [0.0, 1.0])
    out = InTLoss(step_sep=" ").guide(g, b)
    # the proposer saw the problem, the numbered attempt and the reference
    assert "Step 1: 1+2=3\nStep 2: 3+3=7\nStep 3: 7" in g.ctx.generator.seen[0] and "1+2=3 3+3=6" in g.ctx.generator.seen[0]
    assert out.batch_size == 3 and out.extras["off_policy"].tolist() == [0, 0, 1]
    assert out.meta[2]["completion"] == "1+2=3 3+3=6" and out.meta[2]["guide"]["source"] == "intervention"
    assert out.group_ids.tolist() == [0, 0, 0]


def test_no_error_and_solved_groups_add_nothing():
    b = batch_of(["1+2=3\n3+3=7"], [0.0])
    assert InTLoss().guide(guide_with("No error"), b) is b
    solved = batch_of(["6"], [1.0])
    g = guide_with("Step 1: 6")
    assert InTLoss().guide(g, solved) is solved and g.ctx.generator.seen == []
