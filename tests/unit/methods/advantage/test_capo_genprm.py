"""CAPO-GenPRM (arXiv:2508.02298): voted critiques -> per-token penalties on the outcome reward -> group-scaled."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError, DataError
from lmpo.methods.advantage.capo_genprm import CAPOAdvantage, RuleCritic, vote
from lmpo.methods.advantage.grpo import GRPOAdvantage
from lmpo.methods.aggregate import TokenMean
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from lmpo.models.tiny import build_tiny_tokenizer

from factories import from_config, make_batch, random_full_batch

F64 = torch.float64


def with_err(b, e):
    return b.replace(extras={**b.extras, "error_weight": torch.tensor(e, dtype=torch.float32)})


def test_card_token_rewards_worked_example():
    # W_whole 2, W_process 1, 6 tokens, step 2 = tokens 2-3 (0-based) flagged: correct -> [2,2,1,1,2,2],
    # wrong -> [0,0,-1,-1,0,0]
    cap = CAPOAdvantage(w_whole=2.0, w_process=1.0)
    e = [[0, 0, 1, 1, 0, 0]] * 2
    b = with_err(make_batch(rewards=[1.0, 0.0], group_ids=[0, 0], mask=[[1] * 6] * 2), e)
    assert cap.token_rewards(b).tolist() == [[2, 2, 1, 1, 2, 2], [0, 0, -1, -1, 0, 0]]
    # advantage: group mean of W r = 1, Bessel std of (2, 0) = sqrt(2) -> ((R_t - 1) / sqrt 2)
    s = math.sqrt(2) + 1e-6
    exp = torch.tensor([[1, 1, 0, 0, 1, 1], [-1, -1, -2, -2, -1, -1]], dtype=F64) / s
    assert_close(cap(b).double(), exp, atol=1e-6, rtol=0)


def test_card_voting_example():
    crit = [[1, 2], [1], [1, 3]]  # steps 2,3 / 2 / 2,4 in the card's 1-based numbering
    assert vote(crit, 4, "intersection") == [0, 1, 0, 0]
    assert vote(crit, 4, "majority") == [0, 1, 0, 0]
    assert vote(crit, 4, "average") == pytest.approx([0, 1, 1 / 3, 1 / 3])
    assert vote([[0], [0, 1]], 2, "majority") == [1, 0]  # 1 of 2 is not a majority


def test_no_flag_is_grpo():
    b = random_full_batch(seed=3)
    assert_close(CAPOAdvantage()(b), GRPOAdvantage()(b), atol=1e-6, rtol=0)
    zero = with_err(b, torch.zeros(b.batch_size, 9).tolist())
    assert_close(CAPOAdvantage(w_whole=3.0)(zero), GRPOAdvantage()(b), atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(3))
def test_matches_loop_reference(seed):
    b = random_full_batch(seed=seed, T=5)
    e = torch.rand(b.batch_size, 7, generator=torch.Generator().manual_seed(seed))
    b = with_err(b, e.tolist())
    got = CAPOAdvantage(w_whole=1.5, w_process=0.7)(b)
    for i in range(b.batch_size):
        grp = [j for j in range(b.batch_size) if b.group_ids[j] == b.group_ids[i]]
        rs = [1.5 * float(b.rewards[j]) for j in grp]
        mu = sum(rs) / len(rs)
        sd = math.sqrt(sum((x - mu) ** 2 for x in rs) / (len(rs) - 1))
        s = sd + 1e-6 if sd > 0 else 1.0
        for t in range(5):
            exp = (1.5 * float(b.rewards[i]) - 0.7 * float(e[i, t]) - mu) / s if b.response_mask[i, t] else 0.0
            assert float(got[i, t]) == pytest.approx(exp, abs=1e-5)


class Stub:
    def __init__(self, answers):
        self.answers, self.n = answers, 0

    def __call__(self, prompt, completion, steps, **_):
        self.n += 1
        return self.answers[(self.n - 1) % len(self.answers)]


def text_batch(texts):
    tok = build_tiny_tokenizer()
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [1] for t in texts]
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    m = ids != 0
    b = make_batch(rewards=[1.0] * len(texts), mask=m)
    return tok, b.replace(response_ids=ids, response_attn=m, meta=[{"completion": t, "prompt": "x"} for t in texts])


def test_after_score_votes_critiques_onto_step_tokens():
    tok, b = text_batch(["1+1=2 2+2=5 7"])
    cap = CAPOAdvantage(separator=" ", num_critiques=3, vote_rule="majority", horizon=16)
    cap.__dict__["_critic_fn"] = Stub([[1, 2], [1], [1]])  # step 1 flagged by all, step 2 by one of three
    out = cap.after_score(SimpleNamespace(tokenizer=tok), b)
    # step 1 = "2+2=5" at chars 6-10 = tokens 6-10, plus the separator before it (token 5)
    assert out.extras["error_weight"][0].tolist() == [0] * 5 + [1] * 6 + [0] * 5
    cap = CAPOAdvantage(separator=" ", num_critiques=3, vote_rule="average", horizon=16)
    cap.__dict__["_critic_fn"] = Stub([[1, 2], [1], [1]])
    e = cap.after_score(SimpleNamespace(tokenizer=tok), b).extras["error_weight"][0]
    assert_close(e[:14], torch.tensor([0] * 5 + [1] * 6 + [1 / 3] * 3), atol=1e-6, rtol=0)
    # the rule critic: exact arithmetic, "2+2=5" is wrong
    assert RuleCritic()("", "", ["1+1=2", "2+2=5", "7"]) == [1]


@pytest.mark.parametrize("bad", [[5], ["1"], None, [True]])
def test_invalid_critique_names_the_row(bad):
    tok, b = text_batch(["1+1=2 3"])
    cap = CAPOAdvantage(separator=" ")
    cap.__dict__["_critic_fn"] = Stub([bad])
    with pytest.raises(DataError, match="row 0.*wrong step indices"):
        cap.after_score(SimpleNamespace(tokenizer=tok), b)


def test_gradient_through_the_clipped_loss():
    # one row, its only token flagged: group of one -> s = 1, mean = r = 1: A = (1 - 0.5 - 1) / 1 = -0.5
    b = with_err(make_batch(rewards=[1.0], mask=[[1]]), [[1.0]])
    adv = CAPOAdvantage()(b)
    assert adv.item() == pytest.approx(-0.5)
    z = torch.tensor([0.4, 0.1], dtype=F64, requires_grad=True)
    lp = torch.log_softmax(z, -1)[0].expand(1, 1)
    batch = b.replace(advantages=adv, old_logprobs=lp.detach().float())
    out = PPOClipLoss(epsilon=0.2)(lp, batch)
    agg = TokenMean()
    agg(out.per_token, batch.response_mask, agg.normaliser(batch.response_mask, 1)).backward()
    p = torch.softmax(z.detach(), -1)
    assert_close(z.grad, torch.tensor([0.5 * (1 - p[0]), -0.5 * p[1]], dtype=F64), atol=1e-6, rtol=1e-5)


def test_bad_hyper_parameters():
    with pytest.raises(ConfigError, match="vote_rule"):
        from_config(CAPOAdvantage, vote_rule="union")
    with pytest.raises(ConfigError, match="rule"):
        CAPOAdvantage(critic="rulez")
    with pytest.raises(ConfigError, match="copy_steps"):
        CAPOAdvantage(scorer="copy_step")
