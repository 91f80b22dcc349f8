"""Rollout hook ``after_score(ctx, batch) -> batch``: each scoring round's batch, right after scoring and before the
shapers and selectors, with the context used for the round; providers chain in pipeline order."""

from __future__ import annotations

import torch

from lmpo.rollout.base import SamplingParams
from lmpo.train.data import PromptStream
from lmpo.pipeline import Pipeline
from lmpo.train.rollouts import RolloutContext, collect

from factories import EchoGenerator, exact_reward


class Tok:
    chat_template = None


class Adder:
    """after_score adds ``delta`` to the rewards and records what it saw."""

    needs = frozenset()

    def __init__(self, delta):
        self.delta, self.seen = delta, []

    def after_score(self, ctx, batch):
        self.seen.append((ctx.generator, batch.rewards.clone()))
        return batch.replace(rewards=batch.rewards + self.delta)


class KeepAbove:
    """A selector that keeps rows whose reward is above 10 (it must see the augmented rewards)."""

    needs = frozenset()

    def __call__(self, batch):
        return batch.rewards > 10


def test_providers_chain_before_the_selectors_with_the_round_context():
    a, b = Adder(10.0), Adder(0.5)
    gen = EchoGenerator()
    ctx = RolloutContext(generator=EchoGenerator(), tokenizer=Tok(), reward_set=exact_reward,
                         pipeline=Pipeline.assemble(selectors=[KeepAbove()], planners=[a, b]),
                         params=SamplingParams(max_new_tokens=2), num_generations=2, train_generator=gen)
    batch, raw, _ = collect(ctx, PromptStream([{"prompt": "k", "answer": "7"}], seed=0), prompts_per_step=1,
                            refill_rounds=0, step=0)
    assert torch.equal(a.seen[0][1], torch.ones(2))  # raw rewards (EchoGenerator answers "7")
    assert torch.equal(b.seen[0][1], torch.full((2,), 11.0))  # a's batch
    assert a.seen[0][0] is gen  # the round's generator (rollout.mode's), which can also generate extra rollouts
    assert batch is not None and torch.equal(batch.rewards, torch.full((2,), 11.5))
    assert torch.equal(raw.rewards, torch.full((2,), 11.5))


def test_kl_in_reward_adds_to_the_process_rewards_already_there():
    """kl.mode=reward adds -beta KL to the token rewards a planner wrote during collection (it used to replace them)."""
    from lmpo.pipeline import KLPenalty, data_plan
    from lmpo.train.prepare import prepare
    from factories import make_batch

    class Echo:
        needs = frozenset()

        def __call__(self, batch):
            return batch.token_rewards.clone()

    class Ref:
        def logprobs(self, batch, mbs):
            return torch.full(batch.response_ids.shape, -1.0)

    p = Pipeline.assemble(advantage=Echo())
    p.kl = KLPenalty(beta=0.5, estimator="k1", in_reward=True)
    p.plan = data_plan(frozenset(), p.kl, 1, 1)
    b = make_batch(rewards=[1.0], mask=[[1, 1]], old_logprobs=[[-0.5, -1.0]],
                   token_rewards=[[0.0, 2.0]])  # a step reward of 2 on token 1
    runner = type("R", (), {"logprobs_entropy_nograd": lambda self, batch, mbs, with_entropy: (batch.old_logprobs, None)})()
    out, metrics = prepare(b, p, runner, Ref(), None)
    # k1 = old - ref = (0.5, 0.0) -> -beta k1 = (-0.25, 0); plus the process rewards (0, 2)
    assert out.advantages.tolist() == [[-0.25, 2.0]]
    assert metrics["reward/kl_penalty"].item() == -0.25
