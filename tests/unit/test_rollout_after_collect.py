"""Rollout hook ``after_collect(ctx, batch)``: every component that has it sees each scoring round's raw batch once,
after collection, with the plain sampler (not rollout.mode's generator) as ``ctx.generator``."""

from __future__ import annotations

import torch

from lmpo.rollout.base import SamplingParams
from lmpo.train.data import PromptStream
from lmpo.pipeline import Pipeline
from lmpo.train.rollouts import RolloutContext, collect

from factories import EchoGenerator, exact_reward


class Tok:
    chat_template = None


class Recorder:
    """Records what the hook receives; its selector keeps only groups whose prompt starts with "k"."""

    needs = frozenset()

    def __init__(self, keep_prefix="k"):
        self.keep_prefix, self.calls = keep_prefix, []

    def __call__(self, batch):
        return torch.tensor([m["row"]["prompt"].startswith(self.keep_prefix) for m in batch.meta])

    def after_collect(self, ctx, batch):
        self.calls.append((ctx.generator, [m["row"]["prompt"] for m in batch.meta], batch.rewards.clone()))


class Shaper:
    """Adds 5 to every reward (the hook must see the raw rewards)."""

    needs = frozenset()

    def __call__(self, batch):
        return batch.replace(rewards=batch.rewards + 5)


def make_ctx(selectors, shapers=(), train_generator=None, planners=()):
    return RolloutContext(generator=EchoGenerator(), tokenizer=Tok(), reward_set=exact_reward,
                          pipeline=Pipeline.assemble(selectors=selectors, shapers=list(shapers), planners=planners),
                          params=SamplingParams(max_new_tokens=2), num_generations=2, train_generator=train_generator)


def test_hook_sees_every_round_raw_once_with_the_plain_sampler():
    # half the prompts are filtered by the selector (not "k..."), so collection needs refill rounds
    data = [{"prompt": p, "answer": "7"} for p in ["k0", "d1", "k2", "d3"]]
    rec = Recorder()
    train_gen = EchoGenerator()
    # listed twice (as selector and planner): still called once per round
    ctx = make_ctx([rec], shapers=[Shaper()], train_generator=train_gen, planners=[rec])
    batch, raw, stats = collect(ctx, PromptStream(data, seed=0), prompts_per_step=2, refill_rounds=3, step=0)
    rounds = int(stats["rollout/refill_rounds"]) + 1
    assert len(rec.calls) == rounds >= 2  # a refill round happened
    # the plain sampler, not rollout.mode's generator (which produced the training rollouts)
    assert all(gen is ctx.generator for gen, _, _ in rec.calls)
    assert len(train_gen.seen) == stats["rollout/generated"] and ctx.generator.seen == []
    # raw rewards (EchoGenerator answers "7" == answer -> 1.0), before the +5 shaper
    assert all(torch.equal(r, torch.ones(len(r))) for _, _, r in rec.calls)
    assert rec.calls[0][1] == [m["row"]["prompt"] for m in raw.meta]  # the first call gets the first round's batch
    seen = [p for _, ps, _ in rec.calls for p in ps]
    assert len(seen) == stats["rollout/generated"]


def test_every_component_with_the_hook_is_called():
    data = [{"prompt": "k0", "answer": "7"}]
    a, b = Recorder(), Recorder()
    ctx = make_ctx([a, b])
    collect(ctx, PromptStream(data, seed=0), prompts_per_step=1, refill_rounds=0, step=0)
    assert len(a.calls) == len(b.calls) == 1
