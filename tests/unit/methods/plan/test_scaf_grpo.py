"""Scaf-GRPO (arXiv:2510.19807): hints only for entirely failed groups, least revealing first, the first success
replaces one failed rollout; hand-derived GRPO advantages of the rescued group (the card's properties)."""

from __future__ import annotations

import pytest
import torch

from lmpo.batch import RolloutBatch
from lmpo.errors import ConfigError, DataError
from lmpo.methods.advantage.grpo import GRPOAdvantage
from lmpo.methods.plan.scaf_grpo import ScafGRPO, reveal
from lmpo.rollout.base import GenerationOutput, SamplingParams
from lmpo.train.guidance import Guide
from lmpo.train.rollouts import RolloutContext

from factories import exact_reward, from_config


class Tok:
    chat_template = None


class HintStub:
    """Answers a row correctly (its answer is the prompt's first word) only when ``key`` is in the prompt."""

    def __init__(self, key: str):
        self.key, self.seen = key, []

    def generate(self, prompts, params, **_):
        self.seen += prompts
        n = len(prompts)
        done = [p.split()[0] if self.key in p else "x" for p in prompts]
        return GenerationOutput(
            prompt_ids=torch.full((n, 3), 5), prompt_mask=torch.ones(n, 3, dtype=torch.bool),
            response_ids=torch.ones(n, 2, dtype=torch.long), response_attn=torch.ones(n, 2, dtype=torch.bool),
            sampler_logprobs=torch.full((n, 2), -0.5), truncated=torch.zeros(n, dtype=torch.bool), completions=done)

    def sync_weights(self):
        pass


def guide_for(key: str, step: int = 10) -> Guide:
    ctx = RolloutContext(generator=HintStub(key), tokenizer=Tok(), reward_set=exact_reward,
                         params=SamplingParams(max_new_tokens=2), num_generations=4)
    return Guide(ctx, step)


def group_batch(rewards, rows, size=4) -> RolloutBatch:
    B = len(rewards)
    gids = torch.arange(B) // size
    return RolloutBatch(
        prompt_ids=torch.full((B, 2), 5), prompt_mask=torch.ones(B, 2, dtype=torch.bool),
        response_ids=torch.ones(B, 2, dtype=torch.long), response_attn=torch.ones(B, 2, dtype=torch.bool),
        response_mask=torch.ones(B, 2, dtype=torch.bool), group_ids=gids, rewards=torch.tensor(rewards),
        sampler_logprobs=torch.full((B, 2), -1.0), truncated=torch.zeros(B, dtype=torch.bool),
        meta=[{"prompt_key": rows[g]["prompt"], "row": rows[g], "prompt": rows[g]["prompt"]} for g in gids.tolist()])


ROW = {"prompt": "42 please", "answer": "42", "hints": ["H1", "H2", "H3"]}


def test_rescued_group_gets_one_hinted_success_and_grpo_advantages_by_hand():
    g = guide_for("H2")
    out = ScafGRPO().guide(g, group_batch([0.0] * 4, [ROW]))
    # the second hint succeeds: exactly one rollout (the last of the tied failures) is replaced
    assert out.rewards.tolist() == [0.0, 0.0, 0.0, 1.0] and out.extras["guided"].tolist() == [0, 0, 0, 1]
    assert out.extras["guide_tier"].tolist() == [0, 0, 0, 2] and out.extras["off_policy"].tolist() == [0, 0, 0, 0]
    assert out.meta[3]["prompt"] == "42 please\nHint: H2" and out.meta[3]["prompt_key"] == "42 please"
    # the hinted row keeps its own (hinted) prompt tokens and the sampler's log-probs: on-policy for that prompt
    assert torch.all(out.prompt_ids[3][out.prompt_mask[3]] == 5) and torch.all(out.sampler_logprobs[3] == -0.5)
    # GRPO on [0, 0, 0, 1]: mean 1/4, unbiased std sqrt((3 * (1/4)^2 + (3/4)^2) / 3) = 1/2
    adv = GRPOAdvantage(eps=0.0)(out)[:, 0]
    assert torch.allclose(adv, torch.tensor([-0.5, -0.5, -0.5, 1.5]))


def test_hints_are_tried_least_revealing_first_and_stop_at_the_first_success():
    g = guide_for("H2")
    ScafGRPO().guide(g, group_batch([0.0] * 4, [ROW]))
    assert [p.split("Hint: ")[1] for p in g.ctx.generator.seen] == ["H1", "H2"]  # never H3
    assert g.stats == {"guide/hint_samples": 2.0, "guide/rows": 2.0, "guide/stuck_groups": 1.0,
                       "guide/rescued_groups": 1.0}


def test_groups_with_a_success_or_in_the_exemption_period_are_untouched():
    rows = [ROW, {**ROW, "prompt": "7 go", "answer": "7"}]
    b = group_batch([0.0, 1.0, 0.0, 0.0] + [0.0] * 4, rows)
    g = guide_for("H1")
    out = ScafGRPO().guide(g, b)
    assert out.rewards[:4].tolist() == [0.0, 1.0, 0.0, 0.0] and out.extras["guided"][:4].sum() == 0
    assert out.extras["guided"][4:].tolist() == [0, 0, 0, 1]
    early = guide_for("H1", step=2)
    assert ScafGRPO(exempt_steps=3).guide(early, b) is b and early.ctx.generator.seen == []


def test_patience_waits_for_consecutive_failed_visits():
    s = ScafGRPO(patience=2)
    b = group_batch([0.0] * 4, [ROW])
    assert s.guide(guide_for("H1"), b) is b  # first failed visit: not yet plateaued
    assert s.guide(guide_for("H1"), b).extras["guided"].sum() == 1
    s.guide(guide_for("H1"), group_batch([1.0] + [0.0] * 3, [ROW]))  # a success resets the count
    assert s.state["fails"]["42 please"] == 0


def test_no_hint_rescues_keeps_the_zero_advantage_group():
    g = guide_for("never")
    b = group_batch([0.0] * 4, [ROW])
    assert ScafGRPO(tries=2).guide(g, b) is b and len(g.ctx.generator.seen) == 6


def test_hint_ladders():
    assert reveal("372", 3) == ["3", "37", "372"]
    assert reveal("a b c d", 3) == ["a b", "a b c", "a b c d"]
    assert reveal("12", 5) == ["1", "12"]
    s = ScafGRPO()
    tiers = {"solution": ["s1"], "knowledge": ["k1", "k2"], "planning": ["p1"]}
    assert s.ladder({"hints": tiers}) == ["k1", "k2", "p1", "s1"]
    assert s.ladder({"answer": "ab"}) == ["a", "ab"]
    with pytest.raises(DataError, match="neither"):
        s.ladder({"prompt": "q"})
    with pytest.raises(DataError, match="not among"):
        s.ladder({"hints": {"knowlege": ["k"]}})
    with pytest.raises(ConfigError, match="template"):
        from_config(ScafGRPO, template="{prompt} no hint")
