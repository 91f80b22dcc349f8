"""The ``guide`` extension point's contract over every registered provider (lmpo.train.guidance), and proof that it
can fail: a deliberately broken provider is registered for the duration of a test and must be caught.

Contract, on a real scoring round of the tiny model over ``guided_copy`` rows (every guidance column present):
- the returned batch passes the collect stage's checks (groups of the batch, contiguous) and carries the markers;
- the policy's own rows that stay are unchanged (same meta object, reward and behaviour log-probs);
- every guided row is marked (``guided`` 1, ``meta["guide"]``), keeps its group's prompt key and row, has finite
  behaviour log-probs that are 0 off the mask, and a finite reward;
- a second call on the same input gives a batch of the same shape (guidance is a function of the round, not of
  leftovers from the first call, beyond declared state).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import lmpo.methods  # noqa: F401  (registers components)
from lmpo.methods.base import GuidanceSource
from lmpo.models.load import load_model
from lmpo.registry import ADVANTAGES, LOSSES, PLANNERS, SELECTORS, SHAPERS
from lmpo.rollout.base import SamplingParams
from lmpo.rollout.hf import HFGenerator
from lmpo.tasks import build_task
from lmpo.train.guidance import Guide, run_guide
from lmpo.train.rollouts import RolloutContext, score

from contracts import test_components as kinds
from factories import exact_reward

KINDS = (ADVANTAGES, LOSSES, SELECTORS, SHAPERS, PLANNERS)


def providers():
    return [(reg, n) for reg in KINDS for n in reg.names() if isinstance(kinds.build(reg, n), GuidanceSource)
            and callable(getattr(kinds.build(reg, n), "guide", None))]


@pytest.fixture(scope="module")
def round_():
    model, tok = load_model("tiny")
    ctx = RolloutContext(generator=HFGenerator(model, tok), tokenizer=tok, reward_set=exact_reward,
                         params=SamplingParams(max_new_tokens=3), num_generations=4)
    rows = build_task("guided_copy", num_train=3, num_eval=0, seed=2).train
    torch.manual_seed(0)
    raw = score(ctx, rows, 4, ctx.params, group_offset=10)
    raw = raw.replace(rewards=raw.rewards.clone().index_fill_(0, torch.tensor([0]), 1.0))  # one solved group
    return ctx, raw


def check_guide(comp, ctx, raw) -> None:
    torch.manual_seed(1)
    out = run_guide(comp.guide, Guide(ctx, step=1000), raw)
    ids = {id(m): i for i, m in enumerate(raw.meta)}
    key_of = {g: m["prompt_key"] for g, m in zip(raw.group_ids.tolist(), raw.meta)}
    for i, m in enumerate(out.meta):
        g = int(out.group_ids[i])
        if out.extras["guided"][i] == 0:
            assert id(m) in ids, f"row {i}: an unguided row that is not one of the policy's rows"
            j = ids[id(m)]
            assert float(out.rewards[i]) == float(raw.rewards[j]), "the policy's rows must keep their rewards"
            n = int(raw.response_attn[j].sum())
            assert torch.equal(out.sampler_logprobs[i, :n], raw.sampler_logprobs[j, :n]), \
                "the policy's rows must keep their behaviour log-probs"
        else:
            assert "guide" in m and m["prompt_key"] == key_of[g], f"guided row {i} must be marked and keep its key"
            lp = out.sampler_logprobs[i]
            assert torch.isfinite(lp).all() and torch.all(lp[~out.response_attn[i]] == 0), \
                f"guided row {i}: behaviour log-probs must be finite and 0 off the mask"
            assert torch.isfinite(out.rewards[i])
    torch.manual_seed(1)
    again = run_guide(comp.guide, Guide(ctx, step=1000), raw)
    assert again.batch_size == out.batch_size


@pytest.mark.parametrize("reg,name", providers(), ids=lambda x: getattr(x, "kind", x))
def test_guide_contract(reg, name, round_):
    check_guide(kinds.build(reg, name), *round_)


def test_every_guidance_method_is_covered():
    assert {"scaf_grpo", "ampo", "rl_plus", "icpo", "int"} <= {n for _, n in providers()}


# --------------------------------------------------------------------------- the contract can fail
@contextlib.contextmanager
def registered(reg, cls):
    name = f"broken_{cls.__name__.lower()}"
    reg.register(name, paper="a deliberately broken component", arxiv="none")(cls)
    try:
        yield name
    finally:
        reg._entries.pop(name)


@dataclass(frozen=True)
class RewardRewritingGuide:  # "guides" by raising the policy's own rewards
    needs: ClassVar[frozenset[str]] = frozenset()

    def guide(self, guide, batch):
        return batch.replace(rewards=batch.rewards + 1.0)


@dataclass(frozen=True)
class UnmarkedTraceGuide:  # swaps a data trace in without marking it guided
    needs: ClassVar[frozenset[str]] = frozenset()

    def guide(self, guide, batch):
        g = int(batch.group_ids[0])
        row = guide.rows_of(batch, [g])
        out = guide.mix(batch, guide.traces(row, [row[0]["answer"]], [g]))
        return out.replace(extras={**out.extras, "guided": torch.zeros(out.batch_size)})


@pytest.mark.parametrize("cls", [RewardRewritingGuide, UnmarkedTraceGuide])
def test_broken_providers_are_caught(cls, round_):
    with registered(PLANNERS, cls) as name:
        with pytest.raises(AssertionError):
            check_guide(kinds.build(PLANNERS, name), *round_)
