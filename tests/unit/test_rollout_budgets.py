"""Collection hooks that make groups grow: per-row length limits in the HF sampler, per-prompt generation counts
(unequal groups), per-sample plans (budget sub-groups), truncated-prefix scoring, prioritised prompt sampling."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lmpo import ops
from lmpo.errors import DataError
from lmpo.methods.advantage.grpo import GRPOAdvantage
from lmpo.models import build_tiny_model, build_tiny_tokenizer
from lmpo.rollout import HFGenerator, SamplingParams
from lmpo.rollout.base import GenerationOutput
from lmpo.train.data import PromptStream, prompt_key
from lmpo.pipeline import Pipeline
from lmpo.train.rollouts import RolloutContext, collect, score

EOS = 1


def no_eos(model, at: dict[int, int] | None = None):
    """Forbid EOS everywhere except row -> step pairs in ``at`` (EOS certain there)."""
    calls = {"n": 0}

    def hook(module, args, logits):
        step, bias = calls["n"], torch.zeros_like(logits)
        calls["n"] += 1
        bias[:, EOS] = -100.0
        for row, s in (at or {}).items():
            if s == step:
                bias[row, EOS] = 200.0
        return logits + bias

    return model.lm_head.register_forward_hook(hook)


def test_hf_per_row_length_limits():
    model, tok = build_tiny_model(seed=0), build_tiny_tokenizer()
    handle = no_eos(model, {3: 0})
    try:
        out = HFGenerator(model, tok).generate(["1=", "2=", "3=", "4="], SamplingParams(max_new_tokens=9),
                                               max_new_tokens=[1, 3, 5, 4])
    finally:
        handle.remove()
    assert out.response_ids.shape[1] == 5  # the widest limit, not params.max_new_tokens
    assert out.response_attn.sum(1).tolist() == [1, 3, 5, 1]  # row 3 stopped at its EOS
    assert out.truncated.tolist() == [True, True, True, False]
    assert (out.response_ids[~out.response_attn] == tok.pad_token_id).all()
    assert (out.sampler_logprobs[~out.response_attn] == 0).all()
    with pytest.raises(DataError, match="one limit"):
        HFGenerator(model, tok).generate(["1="], SamplingParams(), max_new_tokens=[0])


def test_hf_per_row_limits_equal_to_params_match_default():
    model, tok = build_tiny_model(seed=0), build_tiny_tokenizer()
    torch.manual_seed(3)
    a = HFGenerator(model, tok).generate(["1=", "22="], SamplingParams(max_new_tokens=4))
    torch.manual_seed(3)
    b = HFGenerator(model, tok).generate(["1=", "22="], SamplingParams(max_new_tokens=4), max_new_tokens=[4, 4])
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.truncated, b.truncated)


class ScriptGenerator:
    """Completion i is "123" for every row; records prompts and per-row limits."""

    def __init__(self, tok):
        self.tok, self.seen, self.limits = tok, [], None

    def generate(self, prompts, params, max_new_tokens=None):
        self.seen += prompts
        self.limits = max_new_tokens
        n = len(prompts)
        ids = torch.tensor([self.tok.convert_tokens_to_ids(c) for c in "123"]).repeat(n, 1)
        return GenerationOutput(
            prompt_ids=torch.zeros(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1, dtype=torch.bool),
            response_ids=ids, response_attn=torch.ones(n, 3, dtype=torch.bool), sampler_logprobs=torch.zeros(n, 3),
            truncated=torch.zeros(n, dtype=torch.bool), completions=["123"] * n)

    def sync_weights(self):
        pass


def length_reward(prompts, completions, columns):
    r = torch.tensor([float(len(c)) for c in completions])
    return r, r[:, None]


def make_ctx(planners=(), selectors=(), n=2):
    tok = build_tiny_tokenizer()
    return RolloutContext(generator=ScriptGenerator(tok), tokenizer=tok, reward_set=length_reward,
                          pipeline=Pipeline.assemble(selectors=list(selectors), planners=list(planners)),
                          params=SamplingParams(max_new_tokens=3), num_generations=n)


ROWS = [{"prompt": f"{i}=", "answer": str(i)} for i in range(4)]


def test_score_variable_group_sizes_counts_and_ids():
    batch = score(make_ctx(), ROWS[:3], [1, 3, 2], SamplingParams(max_new_tokens=3), group_offset=10)
    assert batch.batch_size == 6
    assert batch.group_ids.tolist() == [10, 11, 11, 11, 12, 12]
    assert [m["prompt_key"] for m in batch.meta] == ["0=", "1=", "1=", "1=", "2=", "2="]
    with pytest.raises(DataError, match="generation count"):
        score(make_ctx(), ROWS[:2], [1, 0], SamplingParams())


def test_group_ops_on_unequal_groups_match_a_loop():
    g = torch.Generator().manual_seed(0)
    gid = torch.tensor([4, 9, 9, 9, 2, 2, 7, 7, 7, 7, 7])[torch.randperm(11, generator=g)]
    r = torch.randn(11, generator=g, dtype=torch.float64)
    for i in range(11):
        members = r[gid == gid[i]]
        assert_close(ops.group_mean(r, gid)[i], members.mean())
        assert_close(ops.group_std(r, gid)[i], members.std() if len(members) > 1 else torch.tensor(0.0, dtype=r.dtype))
        assert_close(ops.group_count(gid)[i], torch.tensor(float(len(members))))
    batch = score(make_ctx(), ROWS[:3], [1, 3, 2], SamplingParams(max_new_tokens=3))
    batch = batch.replace(rewards=torch.tensor([5.0, 1.0, 2.0, 6.0, 0.0, 4.0]))
    # GRPO over groups {5}, {1, 2, 6}, {0, 4}: 0; (1-3)/2.6458, (2-3)/2.6458, (6-3)/2.6458; -2/2.8284, 2/2.8284
    # (unbiased stds sqrt(14/2) and sqrt(8/1); the singleton's 0/(0 + eps) = 0)
    s1, s2 = 7.0**0.5 + 1e-6, 8.0**0.5 + 1e-6
    want = torch.tensor([0.0, -2 / s1, -1 / s1, 3 / s1, -2 / s2, 2 / s2])
    assert_close(GRPOAdvantage(eps=1e-6)(batch)[:, 0], want)


class Planner:
    needs = frozenset()

    def plan_group(self, n):
        return [{"max_new_tokens": 1 + j, "prompt_suffix": f"<{j}>", "tags": {"budget": 1.0 + j}} for j in range(n)]

    def prefix_budgets(self):
        return [1, 2, 5]

    def allocate(self, keys, n):
        return [1 + i for i in range(len(keys))]


def test_collect_uses_allocation_plans_and_prefix_scores():
    data = [{"prompt": "5=", "answer": "5"}, {"prompt": "6=", "answer": "6"}]
    ctx = make_ctx([Planner()], n=4)
    batch, raw, stats = collect(ctx, PromptStream(data, seed=0), prompts_per_step=2, refill_rounds=0, step=1)
    assert raw.batch_size == 3 and torch.unique(raw.group_ids, return_counts=True)[1].tolist() == [1, 2]
    assert stats["rollout/group_size_max"] == 2.0
    assert raw.extras["budget"].tolist() == [1.0, 1.0, 2.0]
    assert ctx.generator.limits == [1, 1, 2]  # capped at rollout.max_new_tokens = 3
    assert [p[-3:] for p in ctx.generator.seen] == ["<0>", "<0>", "<1>"]
    # "123" truncated to 1, 2 and 5 (whole) tokens scores 1, 2, 3 characters
    assert raw.extras["prefix_rewards"].tolist() == [[1.0, 2.0, 3.0]] * 3


def test_two_components_with_one_hook_is_an_error():
    from lmpo.errors import ConfigError

    with pytest.raises(ConfigError, match="allocate"):
        collect(make_ctx([Planner(), Planner()]), PromptStream(ROWS, 0), 2, 0, 1)


def test_prompt_stream_weighted_take_is_seeded_resumable_and_respects_zero_weights():
    rows = [{"prompt": f"{i}="} for i in range(6)]
    w = lambda keys: [0.0 if k in ("0=", "3=") else 1.0 for k in keys]  # noqa: E731
    s = PromptStream(rows, seed=1)
    drawn = [r["prompt"] for _ in range(20) for r in s.take(3, weights=w)]
    assert "0=" not in drawn and "3=" not in drawn and len(set(drawn)) == 4
    s1 = PromptStream(rows, seed=1)
    s1.take(2, weights=w)
    s2 = PromptStream(rows, seed=1)
    s2.load_state_dict(s1.state_dict())
    assert s1.take(3, weights=w) == s2.take(3, weights=w)
    assert s1.take(2, weights=lambda keys: None) == s2.take(2)  # None = no preference: the permutation
    with pytest.raises(DataError, match="weights"):
        s.take(1, weights=lambda keys: [-1.0] * len(keys))
    assert prompt_key({"prompt": "p", "id": 7}) == "7" and prompt_key({"prompt": [{"role": "user", "content": "x"}]})
