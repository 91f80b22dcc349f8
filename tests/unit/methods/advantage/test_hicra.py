"""HICRA (arXiv:2509.03646): GRPO's advantage amplified by alpha |A| on strategic-gram (planning) tokens."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.advantage.grpo import GRPOAdvantage
from lmpo.methods.advantage.hicra import HICRAAdvantage, gram_pattern, planning_positions
from lmpo.methods.aggregate import TokenMean
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from lmpo.models.tiny import build_tiny_tokenizer
from lmpo.pipeline import Pipeline
from lmpo.rewards.steps import token_char_ends

from factories import from_config, make_batch, random_full_batch, smollm2_tokenizer

F64 = torch.float64


def with_plan(b, marks):
    return b.replace(extras={**b.extras, "planning_tokens": torch.tensor(marks, dtype=torch.float32)})


def two_rows():
    # one group, rewards (1, 0): mean 0.5, Bessel std sqrt(0.5) -> A = +-0.5 / sqrt(0.5) = +-sqrt(0.5)
    return make_batch(rewards=[1.0, 0.0], group_ids=[0, 0], mask=[[1, 1, 1], [1, 1, 0]])


def test_card_example_planning_tokens_amplified_and_softened():
    b = with_plan(two_rows(), [[0, 1, 0], [1, 0, 1]])  # row 1's token 2 is padding: stays 0
    a = math.sqrt(0.5)
    adv = HICRAAdvantage(alpha=0.2)(b).double()
    assert_close(adv, torch.tensor([[a, 1.2 * a, a], [-0.8 * a, -a, 0.0]], dtype=F64), atol=1e-5, rtol=0)


def test_alpha_zero_or_no_planning_token_is_grpo():
    b = random_full_batch(seed=4)
    g = GRPOAdvantage()(b)
    marks = (torch.rand(b.response_mask.shape, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    assert torch.equal(HICRAAdvantage(alpha=0.0)(with_plan(b, marks.tolist())), g)
    assert torch.equal(HICRAAdvantage()(with_plan(b, torch.zeros_like(marks).tolist())), g)
    assert torch.equal(HICRAAdvantage()(b), g)


@pytest.mark.parametrize("seed", range(3))
def test_matches_loop_reference(seed):
    b = random_full_batch(seed=seed, T=6)
    gen = torch.Generator().manual_seed(seed)
    marks = (torch.rand(b.batch_size, 8, generator=gen) < 0.4).float()  # horizon 8 > T = 6
    got = HICRAAdvantage(alpha=0.3)(b.replace(extras={"planning_tokens": marks}))
    g = GRPOAdvantage()(b)
    for i in range(b.batch_size):
        for t in range(6):
            a = float(g[i, t])
            exp = (a + 0.3 * abs(a) * float(marks[i, t])) if b.response_mask[i, t] else 0.0
            assert float(got[i, t]) == pytest.approx(exp, abs=1e-6)


def test_gram_matching_and_token_marks_tiny():
    tok = build_tiny_tokenizer()
    text = "13+45 3+4"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ends = token_char_ends(tok, ids, text)
    # a gram's alphanumeric ends must sit on word boundaries: "3+4" inside "13+45" does not count (digits are word
    # characters), the one at chars 6-8 does -> tokens 6, 7, 8 (one token per character); "+" alone matches anywhere
    assert planning_positions(text, ends, gram_pattern(("3+4",))) == [6, 7, 8]
    assert planning_positions(text, ends, gram_pattern(("+",))) == [2, 7]
    b = make_batch(rewards=[1.0], group_ids=[0], mask=[[1] * len(ids)])
    b = b.replace(response_ids=torch.tensor([ids]), response_attn=torch.ones(1, len(ids), dtype=torch.bool),
                  meta=[{"completion": text}])
    out = HICRAAdvantage(grams=("+4",), horizon=12).after_score(SimpleNamespace(tokenizer=tok), b)
    assert out.extras["planning_tokens"][0].tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0]


def test_word_boundaries():
    p = gram_pattern(("let's try", "wait,"))
    assert [m.group(0) for m in p.finditer("Let's try again. outlet's trying; Wait, no")] == ["Let's try", "Wait,"]
    assert gram_pattern(()) is None and gram_pattern(("",)) is None


def test_smollm2_tokens_of_a_gram():
    tok = smollm2_tokenizer()
    text = "First compute 3*4=12.\n\nBut wait, let's try a different approach: 12/4=3."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pos = planning_positions(text, token_char_ends(tok, ids, text), gram_pattern(("let's try a different",)))
    marked = tok.decode([ids[j] for j in pos])
    assert "let's try a different" in marked and len(marked) <= len(" let's try a different")
    assert pos == list(range(pos[0], pos[-1] + 1))


def test_gradient_through_the_clipped_loss():
    # one row per reply, one token each; rows (1, 0) -> A = +-sqrt(.5); row 0's token is a planning token:
    # A0 = 1.2 sqrt(.5), A1 = -sqrt(.5). Both sample action 0 of a softmax policy with logits z; token_mean at ratio 1:
    # L = -(A0 + A1) log p0 / 2, dL/dz0 = -(A0 + A1)(1 - p0) / 2, dL/dz1 = (A0 + A1) p1 / 2.
    b = with_plan(make_batch(rewards=[1.0, 0.0], group_ids=[0, 0], mask=[[1], [1]]), [[1], [0]])
    adv = HICRAAdvantage()(b)
    z = torch.tensor([0.1, 0.5], dtype=F64, requires_grad=True)
    lp = torch.log_softmax(z, -1)[0].expand(2, 1)
    batch = b.replace(advantages=adv, old_logprobs=lp.detach().float())
    out = PPOClipLoss(epsilon=0.2)(lp, batch)
    agg = TokenMean()
    agg(out.per_token, batch.response_mask, agg.normaliser(batch.response_mask, 1)).backward()
    s = 0.2 * math.sqrt(0.5)
    p = torch.softmax(z.detach(), -1)
    assert_close(z.grad, torch.tensor([-s * (1 - p[0]) / 2, s * p[1] / 2], dtype=F64), atol=1e-6, rtol=1e-5)


def test_config_and_pipeline():
    with pytest.raises(ConfigError, match="alpha"):
        from_config(HICRAAdvantage, alpha=-0.1)
    assert len(Pipeline.assemble(advantage=HICRAAdvantage()).calls("after_score")) == 1
