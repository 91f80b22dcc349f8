"""reward_model: the scalar at the reply's last token (checked against the LM run directly), batching, HF
sequence-classification folders, failure masking and counting, errors."""

from __future__ import annotations

import math

import pytest
import torch

from lmpo.errors import ModelError, RewardError
from lmpo.models.tiny import build_tiny_tokenizer
from lmpo.registry import REWARDS
from lmpo.rewards import RewardSet
from lmpo.rewards.scorer_base import FailureLog, mask_failures


def build(**kw):
    return REWARDS.build("reward_model", where="rewards[0]", **{"path": "tiny", **kw})


def test_score_is_the_head_on_the_last_hidden_state():
    rm = build(batch_size=2)
    prompts, replies = ["12=", "3=", "45+1="], ["12", "7 7", ""]
    got = rm.raw_scores(prompts, replies)
    tok, lm, head = rm.tokenizer, rm.model.lm, rm.model.head
    for p, c, g in zip(prompts, replies, got):  # reference: one unpadded sequence, all hidden states from the LM
        ids = torch.tensor([tok(p + c, add_special_tokens=False)["input_ids"]])  # char-level: same ids as p then c
        h = lm(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
        assert g == pytest.approx(float(h @ head.weight[0] + head.bias[0]), abs=1e-5)


def test_batch_size_does_not_change_scores():
    prompts, replies = ["1=", "22=", "333=", "4="], ["1", "22 2", "3", "44444"]
    assert build(batch_size=1).raw_scores(prompts, replies) == pytest.approx(build(batch_size=4).raw_scores(prompts, replies), abs=1e-5)


def test_normalize_batch_whitens_and_sigmoid_maps_into_unit_interval():
    prompts, replies = ["1=", "2=", "3="], ["1", "5", "9"]
    w = build(normalize="batch")(prompts, replies)
    assert sum(w) == pytest.approx(0.0, abs=1e-6) and torch.tensor(w).std().item() == pytest.approx(1.0, abs=1e-4)
    raw = build().raw_scores(prompts, replies)
    assert build(normalize="sigmoid", scale=2.0)(prompts, replies) == pytest.approx([2 / (1 + math.exp(-r)) for r in raw], abs=1e-6)


def test_mask_failures_fills_the_group_mean_and_counts():
    log = FailureLog()
    # prompt a: scores 1 and 3 are fine, nan -> (1 + 3) / 2 = 2; prompt b: its only score failed -> batch mean of
    # the good ones (1 + 3 + 5) / 3 = 3
    out = mask_failures("rm", ["a", "a", "a", "b", "c"], ["x"] * 5, [1.0, float("nan"), 3.0, None, 5.0], "mask", log)
    assert out == [1.0, 2.0, 3.0, 3.0, 5.0]
    assert log.pop() == {"failures": 2.0} and log.pop() == {}
    with pytest.raises(RewardError, match="sample 1 .*on_failure: mask"):
        mask_failures("rm", ["a", "a"], ["x", "y"], [1.0, float("inf")], "error", FailureLog())


def test_nan_scores_are_masked_counted_and_reported_through_the_reward_set(monkeypatch):
    rs = RewardSet.from_specs([{"name": "reward_model", "kwargs": {"path": "tiny"}}])
    rm = rs.fns[0]
    with torch.no_grad():
        rm.model.head.bias.fill_(float("nan"))
    total, comps = rs(["1=", "1="], ["1", "2"], {})
    assert torch.isfinite(total).all() and total.tolist() == [0.0, 0.0]  # nothing good: 0, no advantage
    assert rs.pop_metrics() == {"reward/reward_model/failures": 2.0}
    strict = build(on_failure="error")
    with torch.no_grad():
        strict.model.head.bias.fill_(float("nan"))
    with pytest.raises(RewardError, match="reward_model.*failed on 1 of 1"):
        strict(["1="], ["1"])


def test_sequence_classification_folder_uses_its_own_head(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg).eval()
    model.save_pretrained(tmp_path)
    build_tiny_tokenizer().save_pretrained(tmp_path)
    rm = build(path=str(tmp_path), batch_size=3)
    prompts, replies = ["1=", "22=", "3="], ["1", "2", "345"]
    got = rm.raw_scores(prompts, replies)
    tok = build_tiny_tokenizer()
    for p, c, g in zip(prompts, replies, got):
        ids = torch.tensor([tok(p + c, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            assert g == pytest.approx(float(model(input_ids=ids).logits[0, 0]), abs=1e-5)
    with pytest.raises(ModelError, match="scores whole replies, not steps"):
        REWARDS.build("process_reward_model", where="rewards[0]", path=str(tmp_path))


def test_missing_path_is_a_model_error():
    with pytest.raises(ModelError, match="does not exist"):
        build(path="./no/such/rm")
