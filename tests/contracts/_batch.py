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


def pad_columns(batch: RolloutBatch, extra: int) -> RolloutBatch:
    """Append ``extra`` padding columns to every (B, T) field."""
    return RolloutBatch.concat([batch]).replace(**{
        f: torch.nn.functional.pad(getattr(batch, f), (0, extra))
        for f in ("response_ids", "response_mask", "response_attn", "sampler_logprobs", "old_logprobs",
                  "ref_logprobs", "advantages") if getattr(batch, f) is not None})


def permute(batch: RolloutBatch, seed: int = 1) -> tuple[RolloutBatch, torch.Tensor]:
    perm = torch.randperm(batch.batch_size, generator=torch.Generator().manual_seed(seed))
    return batch.select(perm), perm
