"""CLPO (arXiv:2509.25004): accuracy buckets, policy rewrites queued through inject_prompts, resume.

CLPO is a selector that keeps every row and only changes which prompts are sampled: it has no differentiable
output, so there is no gradient check here (the contracts check it returns a (B,) bool keep mask).
The policy is replaced by a stub rewriter (string templates) so every queued row can be derived by hand.
"""

from __future__ import annotations

import re

import pytest
import torch

from lmpo.errors import ConfigError
from lmpo.methods.select.clpo import CLPO, MODE_KEY
from lmpo.rollout.base import GenerationOutput, SamplingParams
from factories import from_config, make_batch, random_groups


def with_rows(rewards, group_ids, rows_per_group, components=None):
    b = make_batch(rewards, group_ids)
    gids = torch.as_tensor(group_ids).tolist()
    meta = [{"prompt": rows_per_group[g]["prompt"], "completion": "", "row": rows_per_group[g]} for g in gids]
    comps = torch.as_tensor(components if components is not None else rewards, dtype=torch.float32)
    comps = comps.reshape(len(gids), -1)
    return b.replace(meta=meta, reward_components=comps)


class StubPolicy:
    """Rewrite requests ("...Problem: q") are answered by ``rewrites[q]``; a solve request for problem p is answered
    by ``answers.get(p, "?")``. Records every prompt."""

    def __init__(self, rewrites, answers=None):
        self.rewrites, self.answers, self.seen = rewrites, answers or {}, []

    def generate(self, prompts, params, **_):
        self.seen.append(list(prompts))
        outs = [self.rewrites[p.split("Problem: ")[-1]] if "Problem: " in p else self.answers.get(p, "?")
                for p in prompts]
        n = len(prompts)
        return GenerationOutput(
            prompt_ids=torch.zeros(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1, dtype=torch.bool),
            response_ids=torch.ones(n, 1, dtype=torch.long), response_attn=torch.ones(n, 1, dtype=torch.bool),
            sampler_logprobs=torch.zeros(n, 1), truncated=torch.zeros(n, dtype=torch.bool), completions=outs)


class Tok:
    chat_template = None


class Ctx:
    def __init__(self, policy):
        self.generator, self.tokenizer, self.system_prompt = policy, Tok(), None
        self.params = SamplingParams(max_new_tokens=3)

    @staticmethod
    def reward_set(prompts, completions, columns):  # exact match against the row's (original) answer
        r = torch.tensor([float(c == a) for c, a in zip(completions, columns["answer"])])
        return r, r[:, None]


def card_batch():
    # the card's case: G = 8 rollouts with 0, 2, 5, 8 correct -> Acc 0, 0.25, 0.625, 1
    rewards = [0.0] * 8 + [1, 1] + [0.0] * 6 + [1] * 5 + [0.0] * 3 + [1] * 8
    rows = [{"prompt": p, "answer": a} for p, a in [("qa", "1"), ("qb", "2"), ("qc", "3"), ("qd", "4")]]
    return with_rows(rewards, [g for g in range(4) for _ in range(8)], rows), rows


# --------------------------------------------------------------------------- hand cases (the card's)
def test_hand_buckets_card_case():
    # (tau_hard, tau_med) = (0.25, 0.75): 0 <= 0.25 hard; 0.25 <= 0.25 hard (inclusive); 0.25 < 0.625 <= 0.75 medium;
    # 1 > 0.75 solved
    b, _ = card_batch()
    sel = CLPO(tau_hard=0.25, tau_med=0.75)
    acc = sel.accuracy(b)
    assert acc[::8].tolist() == [0.0, 0.25, 0.625, 1.0]
    assert sel.buckets(acc[::8]) == ["hard", "hard", "medium", "solved"]
    assert sel(b).tolist() == [True] * 32  # every rollout is trained on


def test_hand_rewrites_queued_with_original_answer():
    # hard qa, qb -> simplify; medium qc -> diversify; solved qd -> not asked. The stub policy rewrites qa -> "sa"
    # (solved by the policy: answer "1"), qb -> "sb" (policy answers "?" -> unverified, dropped), qc -> "dc" (solved).
    b, rows = card_batch()
    pol = StubPolicy({"qa": "sa", "qb": "sb", "qc": " dc \n"}, answers={"sa": "1", "dc": "3"})
    sel = CLPO(verify_samples=2)
    sel.after_collect(Ctx(pol), b)
    asks = pol.seen[0]
    assert len(asks) == 3
    assert asks[0] == sel.simplify_template.format(prompt="qa") and asks[1] == sel.simplify_template.format(prompt="qb")
    assert asks[2] == sel.diversify_template.format(prompt="qc")
    assert pol.seen[1] == ["sa", "sa", "sb", "sb", "dc", "dc"]  # 2 verification answers per rewrite
    queued = sel.inject_prompts(4)  # inject_frac 0.5 -> at most 2 of 4
    assert queued == [{"prompt": "sa", "answer": "1", MODE_KEY: "simplify"},
                      {"prompt": "dc", "answer": "3", MODE_KEY: "diversify"}]


# --------------------------------------------------------------------------- the card's properties
def test_rewrite_keeps_every_other_column_unchanged():
    row = {"prompt": "What is 2+3?", "answer": "\\boxed{5}", "id": 7, "meta": {"src": "x"}}
    sel = CLPO()
    new = sel.rewrite_row(row, "simplify", "  Add 2 and 3.  ")
    assert new["answer"] == row["answer"] and new["meta"] == row["meta"] and new["prompt"] == "Add 2 and 3."
    assert new["id"] != row["id"] and row["prompt"] == "What is 2+3?"  # the source row is untouched
    assert sel.rewrite_row(row, "simplify", "What is 2+3? ") is None and sel.rewrite_row(row, "simplify", " ") is None


def test_all_solved_reduces_to_grpo():
    # every group solved (Acc = 1 > tau_med): keep everything, never call the policy, queue nothing
    rows = [{"prompt": "q", "answer": "1"}, {"prompt": "r", "answer": "2"}]
    b = with_rows([1.0] * 6, [0, 0, 0, 1, 1, 1], rows)
    pol = StubPolicy({})
    sel = CLPO()
    sel.after_collect(Ctx(pol), b)
    assert sel(b).all() and pol.seen == [] and sel.inject_prompts(100) == []


def test_accuracy_reads_the_verifier_not_shaped_rewards():
    # shaped rewards are 0.3 everywhere, the first reward component (the verifier) says 1, 0, 0, 0 -> Acc 0.25 (hard)
    rows = [{"prompt": "q", "answer": "1"}]
    b = with_rows([0.3] * 4, [0] * 4, rows, components=[[1.0, 9], [0, 9], [0, 9], [0, 9]])
    assert CLPO().accuracy(b).tolist() == [0.25] * 4


def test_rewritten_rows_are_not_rewritten_again():
    rows = [{"prompt": "sa", "answer": "1", MODE_KEY: "simplify"}, {"prompt": "q", "answer": "1"}]
    b = with_rows([0.0] * 4, [0, 0, 1, 1], rows)
    assert [(r["prompt"], m) for r, m in CLPO().requests(b)] == [("q", "simplify")]


def test_queue_survives_resume():
    b, _ = card_batch()
    sel = CLPO(verify_samples=0)
    sel.after_collect(Ctx(StubPolicy({"qa": "sa", "qb": "sb", "qc": "dc"})), b)
    first = sel.inject_prompts(2)  # one of 3
    state = sel.state_dict()
    fresh = CLPO(verify_samples=0)
    fresh.load_state_dict(state)
    assert first == [{"prompt": "sa", "answer": "1", MODE_KEY: "simplify"}]
    assert fresh.inject_prompts(4) == sel.inject_prompts(4) == [
        {"prompt": "sb", "answer": "2", MODE_KEY: "simplify"}, {"prompt": "dc", "answer": "3", MODE_KEY: "diversify"}]
    assert fresh.state_dict() == sel.state_dict()


def test_max_queue_keeps_newest():
    b, _ = card_batch()
    sel = CLPO(verify_samples=0, max_queue=2, inject_frac=1.0)
    sel.after_collect(Ctx(StubPolicy({"qa": "sa", "qb": "sb", "qc": "dc"})), b)
    assert [r["prompt"] for r in sel.inject_prompts(10)] == ["sb", "dc"]


@pytest.mark.parametrize("kw, key", [
    (dict(tau_hard=0.8, tau_med=0.5), "tau_hard"), (dict(tau_hard=-0.1), "tau_hard"), (dict(tau_med=1.5), "tau_med"),
    (dict(simplify_template="no slot"), "simplify_template"), (dict(rewrites_per_prompt=0), "rewrites_per_prompt"),
    (dict(inject_frac=1.5), "inject_frac"), (dict(verify_samples=-1), "verify_samples"),
    (dict(rewrite_max_new_tokens=0), "rewrite_max_new_tokens")])
def test_bad_config(kw, key):
    with pytest.raises(ConfigError, match=re.escape(f"selectors[0].{key} must")):
        from_config(CLPO, **kw)


# --------------------------------------------------------------------------- loop reference
def reference(rewards, group_ids, tau_hard, tau_med, thr):
    acc, bucket = [], []
    for i in range(len(rewards)):
        same = [j for j in range(len(rewards)) if group_ids[j] == group_ids[i]]
        a = sum(1.0 for j in same if rewards[j] >= thr) / len(same)
        acc.append(a)
        bucket.append("hard" if a <= tau_hard else ("medium" if a <= tau_med else "solved"))
    return acc, bucket


@pytest.mark.parametrize("seed", range(20))
def test_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    gids = random_groups(g, max_groups=6, max_size=8)
    rewards = torch.rand(gids.numel(), generator=g).round(decimals=1)
    tau_hard, tau_med = sorted(torch.rand(2, generator=g).tolist())
    thr = float(torch.rand(1, generator=g))
    rows = {int(k): {"prompt": f"q{int(k)}", "answer": "a"} for k in gids.unique()}
    b = with_rows(rewards.tolist(), gids.tolist(), rows)
    sel = CLPO(tau_hard=tau_hard, tau_med=tau_med, correct_threshold=thr, rewrites_per_prompt=2)
    acc, bucket = reference(rewards.tolist(), gids.tolist(), tau_hard, tau_med, thr)
    torch.testing.assert_close(sel.accuracy(b), torch.tensor(acc, dtype=torch.float64), rtol=0, atol=1e-12)
    assert sel.buckets(sel.accuracy(b)) == bucket
    want, seen = [], set()
    for i, gid in enumerate(gids.tolist()):  # groups in first-appearance order, each asked twice unless solved
        if gid not in seen and bucket[i] != "solved":
            want += [(f"q{gid}", "simplify" if bucket[i] == "hard" else "diversify")] * 2
        seen.add(gid)
    assert [(r["prompt"], m) for r, m in sel.requests(b)] == want
