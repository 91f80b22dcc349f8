"""Rollout hooks for adaptive prompt streams: ``inject_prompts`` (component-made prompts first), ``response_prefix``
rows (the policy continues a partial solution, scored as prefix + continuation) and ``meta[i]["row"]``."""

from __future__ import annotations

import torch

from lmpo.rollout.base import SamplingParams
from lmpo.train.data import PromptStream
from lmpo.pipeline import Pipeline
from lmpo.train.rollouts import InjectingStream, RolloutContext, collect

from factories import EchoGenerator, exact_reward


class Injector:
    needs = frozenset()

    def __init__(self, rows):
        self.rows = list(rows)

    def inject_prompts(self, n):
        out, self.rows = self.rows[:n], self.rows[n:]
        return out

    def __call__(self, batch):
        return torch.ones(batch.batch_size, dtype=torch.bool)


class Tok:
    chat_template = None


def ctx_with(selectors):
    return RolloutContext(generator=EchoGenerator(), tokenizer=Tok(), reward_set=exact_reward,
                          pipeline=Pipeline.assemble(selectors=selectors), params=SamplingParams(max_new_tokens=2),
                          num_generations=2)


def test_injected_prompts_come_first_then_the_stream():
    data = [{"prompt": f"d{i}=", "answer": "7"} for i in range(5)]
    stream = PromptStream(data, seed=0)
    inj = Injector([{"prompt": "x=", "answer": "17", "response_prefix": "1"}])
    ctx = ctx_with([inj])
    batch, raw, _ = collect(ctx, stream, prompts_per_step=3, refill_rounds=0, step=1)
    # one injected prompt + 2 from the data set, 2 generations each
    assert [m["row"]["prompt"] for m in raw.meta][::2][0] == "x="
    assert len({m["row"]["prompt"] for m in raw.meta}) == 3
    assert stream.state_dict()["pos"] == 2  # the stream gave only the 2 rows the injector did not
    # the prefix was appended to the prompt text and the reward scored prefix + continuation "1" + "7" == "17"
    assert ctx.generator.seen[0] == "x=1"
    assert raw.rewards[:2].tolist() == [1.0, 1.0]


def test_no_hook_leaves_the_stream_unwrapped():
    stream = PromptStream([{"prompt": "a", "answer": "b"}], seed=0)
    assert InjectingStream.wrap(stream, Pipeline.assemble(selectors=[object()]).calls("inject_prompts")) is stream
    inj = InjectingStream.wrap(stream, [Injector([{"prompt": "z", "answer": "b"}] * 5).inject_prompts])
    assert [r["prompt"] for r in inj.take(3)] == ["z", "z", "z"]
