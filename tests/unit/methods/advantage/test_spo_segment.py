"""SPO-chain (arXiv:2505.23564): cut points, MC values at segment cuts, telescoping segment advantages, prob mask."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from lmpo.batch import RolloutBatch
from lmpo.errors import ConfigError
from lmpo.methods.advantage.spo_segment import SPOSegmentAdvantage, cut_points, segment_advantages
from lmpo.methods.aggregate import TokenMean
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from lmpo.models.tiny import build_tiny_tokenizer
from lmpo.rollout.base import GenerationOutput, SamplingParams

from factories import from_config, random_full_batch

F64 = torch.float64


def batch_of(probs, rewards, cuts=None, H=8, meta=None, ids=None):
    """Rows with per-token sampling probabilities ``probs`` (lists, right-padded with 0-probability padding)."""
    B, T = len(probs), max(len(p) for p in probs)
    mask = torch.zeros(B, T, dtype=torch.bool)
    lp = torch.zeros(B, T)
    for i, p in enumerate(probs):
        mask[i, :len(p)] = True
        lp[i, :len(p)] = torch.tensor(p).log()
    ex = {}
    if cuts is not None:  # {row: {c: V(c)}}
        cv, cm = torch.zeros(B, H + 1), torch.zeros(B, H + 1)
        for i, d in cuts.items():
            for c, v in d.items():
                cv[i, c + 1], cm[i, c + 1] = v, 1.0
        ex = {"cut_values": cv, "cut_mask": cm}
    return RolloutBatch(prompt_ids=torch.ones(B, 1, dtype=torch.long),
                        response_ids=ids if ids is not None else torch.ones(B, T, dtype=torch.long),
                        response_mask=mask, response_attn=mask.clone(), group_ids=torch.arange(B),
                        rewards=torch.tensor(rewards), sampler_logprobs=lp, extras=ex, meta=meta or [])


def test_card_worked_example_and_mask():
    # 8 tokens; values V = 0.5 at the prompt state (c = -1), 0.75 after token 3, R = 1.0 at token 7 ->
    # A = 0.25 on tokens 0-3 and 0.25 on tokens 4-7; only the low-probability tokens 2 and 6 keep it (the card).
    probs = [0.95, 0.99, 0.5, 0.97, 0.99, 0.92, 0.3, 0.99]
    b = batch_of([probs], [1.0], cuts={0: {-1: 0.5, 3: 0.75}})
    adv = SPOSegmentAdvantage()(b)
    assert_close(adv, torch.tensor([[0, 0, 0.25, 0, 0, 0, 0.25, 0]]), atol=1e-6, rtol=0)


def test_segment_advantages_by_hand_and_telescoping():
    # values at -1: 0.2, 1: 0.6, 4: 0.1, last (5): R = 1 -> segments (-1,1] 0.4, (1,4] -0.5, (4,5] 0.9
    assert segment_advantages({-1: 0.2, 1: 0.6, 4: 0.1, 5: 1.0}, 6) == pytest.approx([0.4, 0.4, -0.5, -0.5, -0.5, 0.9])
    # no prompt-state value: the first segment gets 0 (the code's base = None)
    assert segment_advantages({2: 0.5, 3: 1.0}, 4) == pytest.approx([0.0, 0.0, 0.0, 0.5])
    # no cut point at all: everything 0
    assert segment_advantages({3: 1.0}, 4) == [0.0] * 4
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # the card's property: sum of segment advantages = R - V(s_0)
        n = int(torch.randint(2, 12, (1,), generator=g))
        cuts = sorted(set(torch.randint(-1, n - 1, (4,), generator=g).tolist()) | {-1})
        vals = {c: float(torch.rand(1, generator=g)) for c in cuts}
        vals[n - 1] = float(torch.rand(1, generator=g))
        a = segment_advantages(vals, n)
        seg_sum = sum(a[c] for c in sorted(vals) if c >= 0)  # one advantage per segment (at its valued end)
        assert seg_sum == pytest.approx(vals[n - 1] - vals[-1])


def test_single_segment_is_mc_baseline_reinforce():
    # card (a): K = 1, no mask effect (all probabilities below rho): A = R - V(s_0) on every token
    b = batch_of([[0.1, 0.2, 0.3], [0.5, 0.5]], [1.0, 0.0], cuts={0: {-1: 0.25}, 1: {-1: 0.75}})
    assert_close(SPOSegmentAdvantage()(b), torch.tensor([[0.75] * 3, [-0.75, -0.75, 0.0]]), atol=1e-6, rtol=0)


def test_cut_points_by_hand():
    p = torch.tensor([0.5, 0.95, 0.2, 0.3, 0.99, 0.1, 0.4])
    # low-probability tokens 0, 2, 3, 5, 6 -> states -1, 1, 2, 4, 5; every 2nd -> -1, 2, 5; max 2 -> -1, 2
    assert cut_points(p, 7, 0.9, 1, 25) == [-1, 1, 2, 4, 5]
    assert cut_points(p, 7, 0.9, 2, 25) == [-1, 2, 5]
    assert cut_points(p, 7, 0.9, 2, 2) == [-1, 2]
    assert cut_points(p, 5, 0.25, 1, 25) == [1]


class FakeGen:
    """Continues every prompt with "9" (records the prompts and budgets it got)."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, params, max_new_tokens=None):
        self.calls.append((list(prompts), list(max_new_tokens)))
        n = len(prompts)
        return GenerationOutput(prompt_ids=torch.zeros(n, 1, dtype=torch.long),
                                prompt_mask=torch.ones(n, 1, dtype=torch.bool),
                                response_ids=torch.ones(n, 1, dtype=torch.long),
                                response_attn=torch.ones(n, 1, dtype=torch.bool), sampler_logprobs=torch.zeros(n, 1),
                                truncated=torch.zeros(n, dtype=torch.bool), completions=["9"] * n)


def test_after_score_estimates_values_by_extra_rollouts():
    tok = build_tiny_tokenizer()
    ids = torch.tensor([tok("387", add_special_tokens=False)["input_ids"]])
    # probabilities 0.5, 0.95, 0.5: low tokens 0 and 2 -> cut states -1 and 1 (interval 1)
    meta = [{"prompt": "3=", "completion": "387", "row": {"prompt": "3=", "answer": "39"}}]
    b = batch_of([[0.5, 0.95, 0.5]], [0.0], meta=meta, ids=ids)
    # reward: 1 when the scored text (prefix + continuation) equals the answer
    rs = lambda prompts, texts, cols: (torch.tensor([float(t == a) for t, a in zip(texts, cols["answer"])]), None)  # noqa: E731
    gen = FakeGen()
    ctx = SimpleNamespace(tokenizer=tok, generator=gen, reward_set=rs, params=SamplingParams(max_new_tokens=4))
    out = SPOSegmentAdvantage(interval=1, num_rollouts=2, horizon=4).after_score(ctx, b)
    # cut -1: prefix "" -> "9" (reward 0); cut 1: prefix "38" -> "389" (reward 0)... answer "39": prefix "3" is
    # not a cut point. Values: V(-1) = 0, V(1) = 0.
    prompts, budgets = gen.calls[0]
    assert prompts == ["3=", "3=", "3=38", "3=38"] and budgets == [4, 4, 2, 2]
    assert out.extras["cut_mask"][0].tolist() == [1, 0, 1, 0, 0]
    # now make the value of the prompt state 1: answer "9"
    meta[0]["row"]["answer"] = "9"
    out = SPOSegmentAdvantage(interval=1, num_rollouts=2, horizon=4).after_score(ctx, b.replace(meta=meta))
    assert out.extras["cut_values"][0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    # advantages: segment (-1, 1] gets V(1) - V(-1) = -1 (tokens 0, 1), segment (1, 2] gets R - V(1) = 0;
    # token 1 has p = 0.95 > 0.9: masked
    assert_close(SPOSegmentAdvantage()(out), torch.tensor([[-1.0, 0.0, 0.0]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", range(3))
def test_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    b = random_full_batch(seed=seed, T=7)
    B = b.batch_size
    cm = (torch.rand(B, 9, generator=g) < 0.4).float()
    cv = torch.rand(B, 9, generator=g)
    b = b.replace(extras={"cut_values": cv, "cut_mask": cm})
    got = SPOSegmentAdvantage(rho=0.5)(b)
    for i in range(B):
        n = int(b.response_mask[i].sum())
        vals = {j - 1: float(cv[i, j]) for j in range(9) if cm[i, j] and j - 1 < n - 1}
        vals[n - 1] = float(b.rewards[i])
        base, seg = vals.get(-1), {}
        for c in sorted(vals):
            if c >= 0:
                seg[c] = 0.0 if base is None else vals[c] - base
                base = vals[c]
        for t in range(7):
            if t >= n:
                exp = 0.0
            else:
                end = min(c for c in seg if c >= t)
                exp = seg[end] if math.exp(float(b.sampler_logprobs[i, t])) <= 0.5 else 0.0
            assert float(got[i, t]) == pytest.approx(exp, abs=1e-6)


def test_gradient_through_the_clipped_loss():
    # one token, p = 0.5 < rho; V(s_0) = 0.25, R = 1 -> A = 0.75; token_mean loss at ratio 1 = -A log p(a0):
    # d/dz0 = -A (1 - p0), d/dz1 = A p1
    b = batch_of([[0.5]], [1.0], cuts={0: {-1: 0.25}})
    adv = SPOSegmentAdvantage()(b)
    z = torch.tensor([0.3, -0.2], dtype=F64, requires_grad=True)
    lp = torch.log_softmax(z, -1)[0].expand(1, 1)
    batch = b.replace(advantages=adv, old_logprobs=lp.detach().float())
    out = PPOClipLoss(epsilon=0.2)(lp, batch)
    agg = TokenMean()
    agg(out.per_token, batch.response_mask, agg.normaliser(batch.response_mask, 1)).backward()
    p = torch.softmax(z.detach(), -1)
    assert_close(z.grad, torch.tensor([-0.75 * (1 - p[0]), 0.75 * p[1]], dtype=F64), atol=1e-6, rtol=1e-5)


def test_bad_hyper_parameters():
    with pytest.raises(ConfigError, match="rho"):
        from_config(SPOSegmentAdvantage, rho=0.0)
    with pytest.raises(ConfigError, match="num_rollouts"):
        from_config(SPOSegmentAdvantage, num_rollouts=0)
