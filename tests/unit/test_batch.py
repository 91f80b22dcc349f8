"""lmpo.batch: validation names the field; select / split / concat / to keep every field row-aligned."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmpo.batch import PreferenceBatch, RolloutBatch
from lmpo.errors import DataError
from factories import tagged_batch


PER_ROW = ["prompt_ids", "response_ids", "response_mask", "group_ids", "rewards", "sampler_logprobs", "prompt_mask",
           "response_attn", "reward_components", "old_logprobs", "ref_logprobs", "token_rewards", "turn_ids",
           "advantages", "truncated"]


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("field, bad, words", [
    ("response_mask", torch.ones(3, 4), ["response_mask", "bool"]),
    ("rewards", torch.ones(3, dtype=torch.long), ["rewards", "float"]),
    ("group_ids", torch.zeros(3), ["group_ids", "long"]),
    ("response_ids", torch.zeros(3, dtype=torch.long), ["response_ids", "(B, T)"]),
    ("rewards", torch.ones(4), ["rewards", "B=4", "B=3"]),
    ("old_logprobs", torch.zeros(3, 5), ["old_logprobs", "T=5", "T=4"]),
    ("prompt_mask", torch.ones(3, 7, dtype=torch.bool), ["prompt_mask", "P=7"]),
    ("reward_components", torch.ones(3), ["reward_components", "(B, K)"]),
    ("truncated", torch.zeros(3), ["truncated", "bool"]),
    ("turn_ids", torch.zeros(3, 4), ["turn_ids", "long"]),
    ("rewards", [1.0, 2.0, 3.0], ["rewards", "torch.Tensor"]),
])
def test_validation_error_names_field(field, bad, words):
    with pytest.raises(DataError) as exc:
        dataclasses.replace(tagged_batch(), **{field: bad})
    msg = str(exc.value)
    assert f"RolloutBatch.{field}" in msg
    for w in words:
        assert w in msg


def test_validation_extras_and_meta():
    with pytest.raises(DataError, match=r"extras\['x'\].*B=3"):
        dataclasses.replace(tagged_batch(), extras={"x": torch.ones(2)})
    with pytest.raises(DataError, match=r"extras\['x'\]"):
        dataclasses.replace(tagged_batch(), extras={"x": torch.tensor(1.0)})
    with pytest.raises(DataError, match="meta has 2 rows"):
        dataclasses.replace(tagged_batch(), meta=[{}, {}])


def test_int32_ids_and_float64_values_accepted():
    b = tagged_batch()
    b2 = b.replace(group_ids=b.group_ids.int(), rewards=b.rewards.double())
    assert b2.group_ids.dtype == torch.int32 and b2.batch_size == 3


def test_replace_validates():
    with pytest.raises(DataError, match="RolloutBatch.advantages"):
        tagged_batch().replace(advantages=torch.zeros(3, 2))


# --------------------------------------------------------------------------- select / split
def _assert_rows(sub: RolloutBatch, full: RolloutBatch, rows: list[int]):
    for f in PER_ROW:
        assert torch.equal(getattr(sub, f), getattr(full, f)[rows]), f
    for k in full.extras:
        assert torch.equal(sub.extras[k], full.extras[k][rows]), k
    assert sub.meta == [full.meta[i] for i in rows]


def test_select_by_index_and_bool_mask():
    b = tagged_batch(B=5)
    _assert_rows(b.select(torch.tensor([3, 0, 3])), b, [3, 0, 3])  # unsorted, repeated
    _assert_rows(b.select(torch.tensor([True, False, False, True, True])), b, [0, 3, 4])
    empty = b.select(torch.zeros(5, dtype=torch.bool))
    assert empty.batch_size == 0 and empty.meta == []


def test_select_without_meta():
    b = tagged_batch().replace(meta=[])
    assert b.select(torch.tensor([1])).meta == []


def test_split_contiguous_and_drops_empty():
    b = tagged_batch(B=5)
    parts = b.split(2)
    assert [p.batch_size for p in parts] == [3, 2]
    _assert_rows(parts[0], b, [0, 1, 2])
    _assert_rows(parts[1], b, [3, 4])
    parts = b.split(7)  # more chunks than rows: empty chunks are dropped
    assert [p.batch_size for p in parts] == [1] * 5
    back = RolloutBatch.concat(b.split(3))
    _assert_rows(back, b, list(range(5)))


# --------------------------------------------------------------------------- concat
def test_concat_pads_T_right_and_P_left():
    a = tagged_batch(B=2, T=2, P=3)
    b = tagged_batch(B=1, T=4, P=1, offset=1000)
    c = RolloutBatch.concat([a, b])
    assert c.response_ids.shape == (3, 4) and c.prompt_ids.shape == (3, 3)
    # T: right padding with zeros / False
    assert torch.equal(c.response_ids[:2, :2], a.response_ids)
    assert torch.equal(c.response_ids[:2, 2:], torch.zeros(2, 2, dtype=torch.long))
    assert torch.equal(c.response_mask[:2, 2:], torch.zeros(2, 2, dtype=torch.bool))
    assert torch.equal(c.old_logprobs[:2, 2:], torch.zeros(2, 2))
    assert torch.equal(c.response_ids[2:], b.response_ids)
    # P: left padding with zeros / False
    assert torch.equal(c.prompt_ids[2:, 2:], b.prompt_ids)
    assert torch.equal(c.prompt_ids[2:, :2], torch.zeros(1, 2, dtype=torch.long))
    assert torch.equal(c.prompt_mask[2, :], torch.tensor([False, False, True]))
    assert torch.equal(c.prompt_ids[:2], a.prompt_ids)
    # per-row fields, extras, meta
    assert torch.equal(c.rewards, torch.cat([a.rewards, b.rewards]))
    assert torch.equal(c.reward_components, torch.cat([a.reward_components, b.reward_components]))
    assert torch.equal(c.extras["score"], torch.cat([a.extras["score"], b.extras["score"]]))
    assert c.meta == a.meta + b.meta


def test_concat_errors():
    with pytest.raises(DataError, match="empty"):
        RolloutBatch.concat([])
    a = tagged_batch()
    with pytest.raises(DataError, match="RolloutBatch.ref_logprobs"):
        RolloutBatch.concat([a, a.replace(ref_logprobs=None)])


@pytest.mark.parametrize("order", ["with_first", "without_first"])
def test_concat_mismatched_extras_is_a_data_error(order):
    # regression: extras keys were taken from the first batch only (bare KeyError, or keys silently dropped)
    a = tagged_batch()
    b = a.replace(extras={})
    pair = [a, b] if order == "with_first" else [b, a]
    with pytest.raises(DataError, match="score"):
        RolloutBatch.concat(pair)


# --------------------------------------------------------------------------- to
def test_to_moves_every_field():
    b = tagged_batch()
    m = b.to("meta")
    for f in PER_ROW:
        assert getattr(m, f).device.type == "meta", f
        assert getattr(m, f).shape == getattr(b, f).shape
    assert all(v.device.type == "meta" for v in m.extras.values())
    assert m.meta == b.meta
    back = b.to("cpu")
    _assert_rows(back, b, [0, 1, 2])


# --------------------------------------------------------------------------- PreferenceBatch
def test_preference_batch_validation():
    ok = dict(prompt_ids=torch.zeros(2, 3, dtype=torch.long), chosen_ids=torch.zeros(2, 4, dtype=torch.long),
              chosen_mask=torch.ones(2, 4, dtype=torch.bool), rejected_ids=torch.zeros(2, 5, dtype=torch.long),
              rejected_mask=torch.ones(2, 5, dtype=torch.bool))
    PreferenceBatch(**ok)
    with pytest.raises(DataError, match="PreferenceBatch.chosen_ids"):
        PreferenceBatch(**{**ok, "chosen_ids": torch.zeros(3, 4, dtype=torch.long)})
    with pytest.raises(DataError, match="rejected_ids and rejected_mask"):
        PreferenceBatch(**{**ok, "rejected_mask": torch.ones(2, 4, dtype=torch.bool)})
    with pytest.raises(DataError, match="bool"):
        PreferenceBatch(**{**ok, "chosen_mask": torch.ones(2, 4)})
