"""Random but valid RolloutBatches for the contract tests."""

from __future__ import annotations

import torch

from lmpo.batch import RolloutBatch


def random_batch(seed: int = 0, groups: int = 3, group_size: int = 4, T: int = 5, P: int = 3,
                 equal_rewards: bool = False, logprob_scale: float = 1.0) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    B = groups * group_size
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = torch.ones(B) if equal_rewards else torch.randint(0, 2, (B,), generator=g).float() + 0.1 * torch.randn(B, generator=g)
    lp = lambda: (-torch.rand(B, T, generator=g) * 2.0) * logprob_scale  # noqa: E731
    return RolloutBatch(
        prompt_ids=torch.randint(0, 16, (B, P), generator=g), prompt_mask=torch.ones(B, P, dtype=torch.bool),
        response_ids=torch.randint(0, 16, (B, T), generator=g), response_mask=mask, response_attn=mask.clone(),
        group_ids=torch.arange(groups).repeat_interleave(group_size), rewards=rewards,
        sampler_logprobs=lp() * mask, old_logprobs=lp() * mask, ref_logprobs=lp() * mask,
        truncated=lengths == T, advantages=torch.randn(B, T, generator=g) * mask,
    )


def with_extras(batch: RolloutBatch, needs, seed: int = 0, hidden: int = 4, candidates: int = 3) -> RolloutBatch:
    """``batch`` plus plausible random ``extras`` for every key a component declares in ``needs``.

    What the trainer would put there (see lmpo.train.step / lmpo.models.token_stats), 0 on masked tokens:
    ``entropy`` (B, T) >= 0, detached (the pre-update policy's); ``current_entropy`` (B, T) >= 0 and ``hidden_states``
    -> ``hidden`` (B, T, H), both leaves with gradient (the policy being optimised); ``candidate_logprobs`` (B, T, M)
    <= 0 with gradient, plus ``candidate_ids`` (column 0 = the sampled token, so hits occur) and a detached
    ``old_candidate_logprobs``; ``vocab_mean_logprobs`` (B, T) <= -log 16 with gradient, plus a detached ``old_`` copy;
    ``layer_noise`` -> ``noise_seed`` (B,) int64. Needs that are batch fields (old_logprobs, ...) are already set.
    """
    g = torch.Generator().manual_seed(1000 + seed)
    B, T = batch.response_mask.shape
    m = batch.response_mask
    leaf = lambda x: x.detach().requires_grad_(True)  # noqa: E731
    ex = dict(batch.extras)
    if "entropy" in needs:
        ex["entropy"] = torch.rand(B, T, generator=g) * 2.5 * m
    if "current_entropy" in needs:
        ex["current_entropy"] = leaf(torch.rand(B, T, generator=g) * 2.5 * m)
    if "hidden_states" in needs:
        ex["hidden"] = leaf(torch.randn(B, T, hidden, generator=g) * m[..., None])
    if "candidate_logprobs" in needs:
        ids = torch.randint(0, 16, (B, T, candidates), generator=g)
        ids[..., 0] = batch.response_ids
        cand = -torch.rand(B, T, candidates, generator=g) * 3.0 * m[..., None]
        old = (cand + 0.1 * torch.randn(cand.shape, generator=g)).clamp(max=0) * m[..., None]
        ex.update(candidate_ids=ids, candidate_logprobs=leaf(cand), old_candidate_logprobs=old)
    if "vocab_mean_logprobs" in needs:
        vm = -(2.8 + torch.rand(B, T, generator=g)) * m
        ex.update(vocab_mean_logprobs=leaf(vm), old_vocab_mean_logprobs=(vm - 0.1 * torch.rand(B, T, generator=g)) * m)
    if "layer_noise" in needs:
        ex["noise_seed"] = torch.randint(0, 2**31, (B,), generator=g)
    return batch.replace(extras=ex)


def grad_extras(batch: RolloutBatch) -> dict[str, torch.Tensor]:
    """The extras that carry gradient (produced by the policy's own forward pass)."""
    return {k: v for k, v in batch.extras.items() if v.requires_grad}


def pad_columns(batch: RolloutBatch, extra: int) -> RolloutBatch:
    """Append ``extra`` padding columns to every (B, T) field, and to the T axis of every (B, T, ...) extra."""
    ex = {k: torch.nn.functional.pad(v, (0, 0) * (v.dim() - 2) + (0, extra)) if v.dim() >= 2 else v
          for k, v in batch.extras.items()}
    return RolloutBatch.concat([batch]).replace(extras=ex, **{
        f: torch.nn.functional.pad(getattr(batch, f), (0, extra))
        for f in ("response_ids", "response_mask", "response_attn", "sampler_logprobs", "old_logprobs",
                  "ref_logprobs", "advantages") if getattr(batch, f) is not None})


def permute(batch: RolloutBatch, seed: int = 1) -> tuple[RolloutBatch, torch.Tensor]:
    perm = torch.randperm(batch.batch_size, generator=torch.Generator().manual_seed(seed))
    return batch.select(perm), perm
