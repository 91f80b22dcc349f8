"""The shared test factories (tests/factories.py via the conftest fixtures): valid, deterministic batches."""

from __future__ import annotations

import torch

from factories import pad_columns, permute, policy_batch, tagged_batch, token_loss_inputs, with_extras


def test_make_batch_from_lengths_and_defaults(make_batch):
    b = make_batch([1.0, 0.0], [3, 3], [2, 1], T=3)
    assert b.response_mask.tolist() == [[True, True, False], [True, False, False]]
    assert b.group_ids.tolist() == [3, 3] and b.rewards.dtype == torch.float32
    assert b.old_logprobs is None and b.advantages is None
    assert make_batch([0.5]).response_mask.shape == (1, 1)


def test_random_batches_are_deterministic_in_their_seed(random_batch, random_full_batch):
    for make in (random_batch, random_full_batch):
        a, b, c = make(seed=3), make(seed=3), make(seed=4)
        assert torch.equal(a.rewards, b.rewards) and torch.equal(a.response_mask, b.response_mask)
        assert not (a.rewards.shape == c.rewards.shape and torch.equal(a.rewards, c.rewards))
    full = random_full_batch(seed=0, groups=2, group_size=3)
    assert full.batch_size == 6 and full.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    for f in ("sampler_logprobs", "old_logprobs", "ref_logprobs", "advantages"):
        assert torch.all(getattr(full, f)[~full.response_mask] == 0), f


def test_transforms_keep_rows_aligned(random_full_batch):
    t = tagged_batch(B=4)
    pt, perm = permute(t)
    assert torch.equal(pt.rewards, t.rewards[perm]) and pt.meta == [t.meta[i] for i in perm.tolist()]
    b = with_extras(random_full_batch(seed=1), {"entropy", "current_entropy"})
    assert b.extras["entropy"].shape == b.response_mask.shape and b.extras["current_entropy"].requires_grad
    padded = pad_columns(b, 2)
    assert padded.response_mask.shape[1] == b.response_mask.shape[1] + 2 and not padded.response_mask[:, -2:].any()


def test_policy_batch_and_token_loss_inputs():
    ids, attn = torch.ones(2, 3, dtype=torch.long), torch.tensor([[True, True, False], [True, True, True]])
    b = policy_batch(ids[:, :2], torch.ones(2, 2, dtype=torch.bool), ids, attn, advantages=torch.ones(2, 3) * attn)
    assert torch.equal(b.response_attn, attn) and b.advantages[0, 2] == 0 and b.extras == {}
    batch, lp = token_loss_inputs([[0.1, -0.2]], [2.0], old=-1.0)
    assert lp.requires_grad and torch.allclose(lp - batch.old_logprobs, torch.tensor([[0.1, -0.2]], dtype=torch.float64))
    assert batch.advantages.tolist() == [[2.0, 2.0]]


def test_echo_generator_fixture_is_fresh(echo_generator):
    assert echo_generator.seen == []
    out = echo_generator.generate(["a", "b"], None)
    assert out.completions == ["7", "7"] and echo_generator.seen == ["a", "b"]
