"""Cappy (arXiv:2311.06720): Rouge-L labels by hand, the soft-label BCE of the card (ln 2 at 0.5 / 0.5) and its
gradient, best-of-N with ties (card test), the pointwise stage's data checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmpo.errors import DataError
from lmpo.models.tiny import build_tiny_tokenizer
from lmpo.registry import REWARDS
from lmpo.rewards.cappy import cappy_rows, rouge_l_f1
from lmpo.tasks.scorer_data import load_pointwise


def test_rouge_l_by_hand():
    assert rouge_l_f1("12", "12") == 1.0
    assert rouge_l_f1("13", "12") == pytest.approx(0.5)       # LCS "1": P = R = 1/2
    assert rouge_l_f1("123", "13") == pytest.approx(0.8)      # LCS "13": P = 2/3, R = 1 -> 2(2/3)/(5/3) = 0.8
    assert rouge_l_f1("", "12") == 0.0 and rouge_l_f1("9", "12") == 0.0


def test_rows_carry_gold_mismatched_and_similarity_labels():
    rows = cappy_rows(20, seed=2, length=2)
    for gold, other, noisy in zip(rows[0::3], rows[1::3], rows[2::3]):
        assert gold["label"] == 1.0 and gold["completion"] == gold["prompt"][:-1]
        assert other["label"] == float(other["completion"] == gold["completion"])
        assert noisy["label"] == rouge_l_f1(noisy["completion"], gold["completion"]) < 1.0


def test_soft_label_bce_and_gradient_by_hand():
    # card: target 0.5, prediction 0.5 (logit 0) -> ln 2; d/dlogit = sigmoid(z) - y = 0 there, and 0.73 - 0.2 at z=1
    z = torch.tensor([0.0, 1.0], requires_grad=True)
    y = torch.tensor([0.5, 0.2])
    loss = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    assert loss[0].item() == pytest.approx(math.log(2))
    assert loss[1].item() == pytest.approx(-(0.2 * math.log(1 / (1 + math.e ** -1)) + 0.8 * math.log(1 - 1 / (1 + math.e ** -1))))
    loss.sum().backward()
    assert z.grad.tolist() == pytest.approx([0.0, 1 / (1 + math.e ** -1) - 0.2])


def test_rerank_is_the_argmax_first_among_equals(monkeypatch):
    cappy = REWARDS.build("cappy", where="rewards[0]", path="tiny")
    monkeypatch.setattr(type(cappy), "__call__", lambda self, prompts, completions, **_: [0.2, 0.9, 0.9, 0.1])
    assert cappy.rerank("1=", ["a", "b", "c", "d"]) == 1
    real = REWARDS.build("cappy", where="rewards[0]", path="tiny")
    assert all(0 < s < 1 for s in real(["1=", "2="], ["1", "3"]))


def test_pointwise_data_errors(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "1=", "completion": "1", "label": true}\n{"prompt": "1=", "completion": "2", "label": 1.5}\n')
    with pytest.raises(DataError, match="row 1 has label 1.5"):
        load_pointwise(str(f), build_tiny_tokenizer())
    f.write_text('{"prompt": "1=", "label": 0}\n')
    with pytest.raises(DataError, match="row 0 has no completion"):
        load_pointwise(str(f), build_tiny_tokenizer())
