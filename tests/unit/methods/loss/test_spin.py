"""SPIN (arXiv:2401.01335): logistic loss on lambda x (real answer's log-ratio to theta_t - generated one's), the real
answer being the first row of each group (rollout.mode self_play)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.config import load_config
from lmpo.errors import ConfigError, DataError
from lmpo.methods.aggregate import SeqMeanTokenMean
from lmpo.methods.loss.spin import SPINLoss
from lmpo.models import build_tiny_model, response_logprobs
from lmpo.models.tiny import build_tiny_tokenizer
from lmpo.pipeline import build_pipeline
from lmpo.rollout.base import SamplingParams
from lmpo.rollout.modes import build_train_generator
from lmpo.registry import PREFERENCE_LOSSES
from lmpo.batch import PreferenceBatch
from lmpo.methods.base import PairLogps
from factories import from_config, make_batch, random_mask

F64 = torch.float64


def batch(groups, mask, old, real):
    b = make_batch([0.0] * len(groups), groups, mask, advantages=torch.zeros(mask.shape), old_logprobs=old, dtype=F64)
    return b.replace(extras={"real_answer": torch.tensor(real, dtype=torch.float32)})


def agg_loss(fn, lp, b):
    agg = SeqMeanTokenMean()
    return agg(fn(lp, b).per_token, b.response_mask, agg.normaliser(b.response_mask, 0))


def test_card_log2_at_theta_t_and_hand_gradient():
    # Group 0: real row 0, generated rows 1 and 2 (each pair weighs 1/2); group 1: real row 3, generated row 4.
    # At theta = theta_t every margin is 0: loss log 2 per pair, so the mean over groups is log 2.
    # d/d log p(y) of -log sigmoid(lam m) = -lam sigmoid(-lam m) = -lam/2 at m = 0; seq_mean_token_mean over 5 rows
    # of a per-pair value spread as w l * n_rows / (2 W): the loss is sum_p w_p l_p / W with W = 2 (two groups), so
    # row 0 gets 2 * (1/2) * (-lam/2) / 2 = -lam/4 per token, rows 1, 2 get (1/2)(lam/2)/2 = lam/8, row 3 -lam/4,
    # row 4 +lam/4.
    lam = 0.1
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0], [1, 1]], dtype=torch.bool)
    old = -torch.rand(5, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * mask
    b = batch([0, 0, 0, 1, 1], mask, old, [1, 0, 0, 1, 0])
    lp = old.clone().requires_grad_(True)
    loss = agg_loss(from_config(SPINLoss, lam=lam), lp, b)
    assert loss.item() == pytest.approx(math.log(2))
    loss.backward()
    per_row = torch.tensor([-lam / 4, lam / 8, lam / 8, -lam / 4, lam / 4], dtype=F64)
    assert_close(lp.grad, per_row[:, None] * mask)


def test_card_fixed_point_identical_answers_have_no_gradient():
    # y' = y: both rows carry the same tokens, hence the same log-probs under any theta: margin 0, gradient 0 in sum.
    mask = torch.ones(2, 3, dtype=torch.bool)
    old = torch.tensor([[-1.0, -0.2, -0.3]] * 2, dtype=F64)
    b = batch([0, 0], mask, old, [1, 0])
    x = torch.tensor([-0.5, -0.4, -0.9], dtype=F64, requires_grad=True)
    loss = agg_loss(from_config(SPINLoss), torch.stack([x, x]), b)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2)) and torch.all(x.grad.abs() < 1e-15)


@pytest.mark.skipif("dpo" not in PREFERENCE_LOSSES, reason="dpo not registered")
def test_card_equals_dpo_with_the_previous_iterate_as_reference():
    g = torch.Generator().manual_seed(2)
    mask = random_mask(g, 4, 3)
    old = -torch.rand(4, 3, generator=g, dtype=F64) * mask
    lp = -torch.rand(4, 3, generator=g, dtype=F64) * mask
    b = batch([0, 0, 1, 1], mask, old, [1, 0, 1, 0])
    pb = PreferenceBatch(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), mask[[0, 2]],
                         torch.zeros(2, 3, dtype=torch.long), mask[[1, 3]])
    dpo = PREFERENCE_LOSSES.build("dpo", beta=0.1)(pb, PairLogps(lp[[0, 2]], lp[[1, 3]]), PairLogps(old[[0, 2]], old[[1, 3]]))
    assert agg_loss(from_config(SPINLoss, lam=0.1), lp, b).item() == pytest.approx(dpo.per_pair.mean().item())


def test_gradcheck():
    g = torch.Generator().manual_seed(3)
    mask = random_mask(g, 5, 3)
    old = -torch.rand(5, 3, generator=g, dtype=F64) * mask
    b = batch([0, 0, 0, 1, 1], mask, old, [1, 0, 0, 1, 0])
    x = (-torch.rand(5, 3, generator=g, dtype=F64) * mask).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y: agg_loss(from_config(SPINLoss, lam=0.5), y * mask, b), (x,))


def test_without_real_rows_is_a_clear_error():
    mask = torch.ones(2, 1, dtype=torch.bool)
    b = make_batch([0.0, 1.0], [0, 0], mask, advantages=torch.zeros(2, 1), old_logprobs=torch.zeros(2, 1))
    with pytest.raises(DataError, match="rollout.mode=self_play"):
        from_config(SPINLoss)(torch.zeros(2, 1), b)
    with pytest.raises(ConfigError, match="Set rollout.mode=self_play"):
        build_pipeline(load_config("configs/tiny.yaml", ["method=spin", "rollout.mode=sample"]))


def test_self_play_mode_puts_the_reference_answer_first_in_each_group():
    model, tok = build_tiny_model(seed=0), build_tiny_tokenizer()
    gen = build_train_generator("self_play", {}, model, tok)
    r1, r2 = {"prompt": "12=", "answer": "12"}, {"prompt": "7=", "answer": "7"}
    torch.manual_seed(0)
    out = gen.generate(["12=", "12=", "12=", "7=", "7="], SamplingParams(max_new_tokens=4), rows=[r1, r1, r1, r2, r2])
    assert out.extras["real_answer"].tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]
    ids = [[tok.convert_tokens_to_ids(c) for c in s] for s in ("12", "7")]
    assert out.response_ids[0, :3].tolist() == ids[0] + [1] and out.response_ids[3, :2].tolist() == ids[1] + [1]
    assert out.completions[0] == "12" and out.completions[3] == "7"
    lp, _ = response_logprobs(model, out.prompt_ids, out.prompt_mask, out.response_ids, out.response_attn)
    assert_close(out.sampler_logprobs * out.response_attn, lp * out.response_attn, atol=1e-5, rtol=1e-5)
    with pytest.raises(DataError, match="num_generations >= 2"):
        gen.generate(["12=", "7="], SamplingParams(max_new_tokens=4), rows=[r1, r2])
