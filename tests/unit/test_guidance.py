"""The ``guide`` extension point's machinery (lmpo.train.guidance): guided rows carry their own behaviour log-probs,
mix() swaps or appends them into their groups, and collect() calls the provider once per scoring round."""

from __future__ import annotations

import pytest
import torch

from lmpo.errors import ConfigError, DataError
from lmpo.models.load import load_model
from lmpo.models.logprobs import response_logprobs
from lmpo.pipeline import Pipeline
from lmpo.rollout.base import SamplingParams
from lmpo.rollout.hf import HFGenerator
from lmpo.train.data import PromptStream
from lmpo.train.guidance import Guide, failed_groups, flat_fraction, mix
from lmpo.train.rollouts import RolloutContext, collect

from factories import exact_reward, make_batch


@pytest.fixture(scope="module")
def policy():
    return load_model("tiny")


def make_ctx(policy, pipeline=None, n=2):
    model, tok = policy
    return RolloutContext(generator=HFGenerator(model, tok), tokenizer=tok, reward_set=exact_reward,
                          params=SamplingParams(max_new_tokens=3), num_generations=n,
                          pipeline=pipeline or Pipeline())


def test_data_traces_carry_the_declared_behaviour(policy):
    model, tok = policy
    g = Guide(make_ctx(policy), step=0)
    rows = [{"prompt": "12=", "answer": "12"}, {"prompt": "3=", "answer": "3"}]
    pol = g.traces(rows, ["12", "4"], [7, 9], behaviour="policy")
    # rewards: "12" answers "12=", "4" does not answer "3="
    assert pol.rewards.tolist() == [1.0, 0.0] and pol.group_ids.tolist() == [7, 9]
    # response = the text's tokens + EOS; behaviour = the policy's own log-probs, teacher-forced
    assert pol.response_attn.sum(1).tolist() == [3, 2]
    want, _ = response_logprobs(model, pol.prompt_ids, pol.prompt_mask, pol.response_ids, pol.response_attn)
    assert torch.allclose(pol.sampler_logprobs, torch.where(pol.response_attn, want, 0.0), atol=1e-5)
    assert pol.extras["guided"].tolist() == [1, 1] and pol.extras["off_policy"].tolist() == [1, 1]
    const = g.traces(rows, ["12", "4"], [7, 9], behaviour=0.0, tier=2)
    assert torch.all(const.sampler_logprobs == 0) and const.extras["off_policy"].tolist() == [1, 1]
    assert const.extras["guide_tier"].tolist() == [2, 2] and const.meta[0]["guide"]["behaviour"] == "0.0"
    assert const.meta[1]["prompt_key"] == "3=" and const.meta[1]["row"] is rows[1]
    with pytest.raises(DataError, match="behaviour must be"):
        g.traces(rows, ["1", "2"], [7, 9], behaviour="teachr")


def test_hinted_rows_keep_or_drop_the_hint(policy):
    model, tok = policy
    g = Guide(make_ctx(policy), step=3)
    rows = [{"prompt": "5=", "answer": "5"}]
    torch.manual_seed(0)
    on = g.hinted(rows, ["55 5="], [4], n=3)
    assert on.batch_size == 3 and on.group_ids.tolist() == [4, 4, 4]
    assert tok.decode(on.prompt_ids[0][on.prompt_mask[0]]) == "55 5="  # on-policy for the hinted prompt
    assert on.extras["off_policy"].tolist() == [0, 0, 0] and on.meta[0]["prompt_key"] == "5="
    torch.manual_seed(0)
    off = g.hinted(rows, ["55 5="], [4], n=3, rescore=True)
    assert tok.decode(off.prompt_ids[0][off.prompt_mask[0]]) == "5="  # re-attached to the plain prompt
    assert torch.equal(off.response_ids, on.response_ids)
    # behaviour stays pi(y | hint, q); the plain prompt's log-probs differ
    assert torch.allclose(off.sampler_logprobs, on.sampler_logprobs)
    plain = g.policy_logprobs(off)
    assert not torch.allclose(plain, off.sampler_logprobs, atol=1e-3)
    assert off.extras["off_policy"].tolist() == [1, 1, 1]


def test_teacher_rows_have_the_teachers_logprobs(policy):
    g = Guide(make_ctx(policy), step=0)
    rows = [{"prompt": "5=", "answer": "5"}]
    out = g.teacher("tiny:3", rows, [0], n=2)
    teacher = g.ctx.teachers["tiny:3"].model
    want, _ = response_logprobs(teacher, out.prompt_ids, out.prompt_mask, out.response_ids, out.response_attn)
    assert torch.allclose(out.sampler_logprobs, torch.where(out.response_attn, want, 0.0), atol=1e-4)
    again = g.traces(rows, [out.meta[0]["completion"]], [0], behaviour="teacher:tiny:3")
    assert again.meta[0]["guide"]["source"] == "data" and torch.isfinite(again.sampler_logprobs).all()
    assert out.meta[0]["guide"]["source"] == "teacher:tiny:3"


def test_mix_replaces_the_lowest_reward_rows_or_appends():
    b = make_batch([0.0, 1.0, 0.0, 0.0, 0.0], group_ids=[0, 0, 0, 1, 1], T=2)
    gd = make_batch([1.0, 1.0], group_ids=[0, 1], T=3)
    gd = gd.replace(extras={"guided": torch.ones(2), "off_policy": torch.ones(2), "guide_tier": torch.ones(2)})
    out = mix(b, gd)
    # group 0: the lowest rewards are rows 0 and 2 (0.0); the last of the tie (row 2) is replaced
    assert out.rewards.tolist() == [0.0, 1.0, 1.0, 0.0, 1.0]
    assert out.extras["guided"].tolist() == [0, 0, 1, 0, 1] and out.response_ids.shape[1] == 3
    grown = mix(b, gd, replace=False)
    assert grown.group_ids.tolist() == [0, 0, 0, 0, 1, 1, 1] and grown.extras["guided"].tolist() == [0, 0, 0, 1, 0, 0, 1]
    with pytest.raises(DataError, match="no unguided row"):
        mix(b, make_batch([1.0] * 3, group_ids=[1, 1, 1], T=2))
    with pytest.raises(DataError, match="not in the batch"):
        mix(b, make_batch([1.0], group_ids=[5], T=2))
    assert failed_groups(b) == [1] and flat_fraction(b) == 0.5


class RescueAll:
    """A provider: every failed group gets the reference answer as a data trace (policy behaviour)."""

    needs = frozenset()

    def __init__(self):
        self.calls = 0

    def guide(self, guide, batch):
        self.calls += 1
        groups = guide.failed_groups(batch)
        if not groups:
            return batch
        rows = guide.rows_of(batch, groups)
        return guide.mix(batch, guide.traces(rows, [r["answer"] for r in rows], groups))


def test_collect_calls_the_provider_and_reports_fail_fractions(policy):
    rescue = RescueAll()
    ctx = make_ctx(policy, Pipeline.assemble(planners=[rescue]), n=3)
    data = [{"prompt": f"{i}{i}=", "answer": f"{i}{i}"} for i in range(4)]
    torch.manual_seed(1)
    batch, raw, stats = collect(ctx, PromptStream(data, seed=0), prompts_per_step=4, refill_rounds=0, step=0)
    assert rescue.calls == 1
    # the random tiny model never answers "ii": every group failed, each got one guided (correct) row
    assert stats["rollout/all_fail_frac"] == 1.0 and stats["rollout/flat_frac"] == 1.0
    assert raw.rewards.sum() == 0 and "guided" not in raw.extras  # the raw batch is the policy's own rollouts
    assert batch.extras["guided"].sum() == 4 and batch.rewards.sum() == 4 and batch.batch_size == 12
    assert stats["guide/rows"] == 4 and stats["guide/flat_frac_after"] == 0.0


def test_one_guide_provider_per_run():
    with pytest.raises(ConfigError, match="'guide'"):
        Pipeline.assemble(planners=[RescueAll(), RescueAll()])


def test_guidance_cannot_combine_with_per_row_collection_data():
    from lmpo.config import load_config

    # found when the config is loaded, before anything is generated
    with pytest.raises(ConfigError, match="rollout.mode='reference'"):
        load_config("configs/tiny.yaml", ["method=rl_plus", "rollout.mode=reference"])
    with pytest.raises(ConfigError, match="plan_group"):
        load_config("configs/tiny.yaml", ["method=scaf_grpo", "advantage.name=hbpo"])


class CountRows:
    """An after_score provider: records the rows it sees and adds a per-row extra."""

    needs = frozenset()

    def __init__(self):
        self.seen = []

    def after_score(self, ctx, batch):
        self.seen.append(batch.extras.get("guided"))
        return batch.replace(extras={**batch.extras, "seen": torch.ones(batch.batch_size)})


def test_after_score_sees_the_guided_rows(policy):
    rescue, counter = RescueAll(), CountRows()
    ctx = make_ctx(policy, Pipeline.assemble(planners=[rescue, counter]), n=3)
    data = [{"prompt": f"{i}{i}=", "answer": f"{i}{i}"} for i in range(2)]
    torch.manual_seed(1)
    batch, raw, _ = collect(ctx, PromptStream(data, seed=0), prompts_per_step=2, refill_rounds=0, step=0)
    assert counter.seen[0].sum() == 2 and batch.extras["seen"].sum() == 6  # guided rows augmented too
    assert "guided" not in raw.extras  # the step's reward metrics stay on the policy's own rollouts
