"""Small RolloutBatch builders for the per-method unit tests (hand cases and random loop-reference cases)."""

from __future__ import annotations

import torch
from torch import Tensor

from lmpo.batch import RolloutBatch


def _t(x, dtype):
    return x.to(dtype) if isinstance(x, Tensor) else torch.tensor(x, dtype=dtype)


def make_batch(rewards, group_ids=None, mask=None, *, T: int | None = None, advantages=None, old_logprobs=None,
               token_rewards=None, truncated=None, dtype=torch.float32) -> RolloutBatch:
    """A valid RolloutBatch from the few fields a maths test cares about; the rest are zeros.

    ``mask`` may be a (B, T) bool-like nested list/tensor or a list of lengths (right-padded prefix masks).
    """
    rewards = _t(rewards, dtype)
    B = rewards.shape[0]
    group_ids = torch.zeros(B, dtype=torch.long) if group_ids is None else _t(group_ids, torch.long)
    if mask is None:
        mask = torch.ones(B, T or 1, dtype=torch.bool)
    else:
        m = mask if isinstance(mask, Tensor) else torch.tensor(mask)
        if m.dim() == 1:  # lengths
            width = T if T is not None else int(m.max())
            m = torch.arange(width)[None, :] < m[:, None]
        mask = m.bool()
    T = mask.shape[1]
    opt = lambda v: None if v is None else _t(v, dtype)  # noqa: E731
    return RolloutBatch(
        prompt_ids=torch.zeros(B, 1, dtype=torch.long),
        response_ids=torch.zeros(B, T, dtype=torch.long),
        response_mask=mask,
        group_ids=group_ids,
        rewards=rewards,
        sampler_logprobs=torch.zeros(B, T, dtype=dtype),
        advantages=opt(advantages),
        old_logprobs=opt(old_logprobs),
        token_rewards=opt(token_rewards),
        truncated=None if truncated is None else _t(truncated, torch.bool),
    )


def random_groups(g: torch.Generator, max_groups: int = 5, max_size: int = 5) -> Tensor:
    """Random group ids: random sizes (singletons included), non-contiguous ids, rows shuffled."""
    n_groups = int(torch.randint(1, max_groups + 1, (1,), generator=g))
    sizes = torch.randint(1, max_size + 1, (n_groups,), generator=g)
    labels = torch.randperm(100, generator=g)[:n_groups] * 3 + 7  # arbitrary, unsorted, non-contiguous ids
    ids = labels.repeat_interleave(sizes)
    return ids[torch.randperm(ids.numel(), generator=g)]


def random_mask(g: torch.Generator, B: int, T: int, holes: bool = True) -> Tensor:
    """Right-padded masks of random length (>= 1), optionally with holes (tool/env tokens not trained on)."""
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    if holes:
        mask &= torch.rand(B, T, generator=g) > 0.2
        mask[torch.arange(B), 0] = True  # keep at least one token per row
    return mask


def random_batch(seed: int, *, T: int | None = None, token_rewards: bool = False, discrete_rewards: bool = False,
                 holes: bool = True, dtype=torch.float32) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    group_ids = random_groups(g)
    B = group_ids.numel()
    T = T or int(torch.randint(1, 7, (1,), generator=g))
    if discrete_rewards:
        rewards = torch.randint(0, 2, (B,), generator=g).to(dtype)
    else:
        rewards = torch.randn(B, generator=g, dtype=dtype)
    mask = random_mask(g, B, T, holes)
    tr = torch.randn(B, T, generator=g, dtype=dtype) if token_rewards else None
    return make_batch(rewards, group_ids, mask, token_rewards=tr, dtype=dtype)


def token_loss_inputs(logr, adv, mask=None, *, old: float = -1.0, extras=None) -> tuple[RolloutBatch, Tensor]:
    """A float64 batch and leaf log-probs for a PolicyLoss: log-ratios ``logr`` (B, T) against old log-probs ``old``,
    advantages ``adv`` ((B,) broadcast over tokens, or (B, T)), optional ``extras``."""
    F64 = torch.float64
    logr = torch.as_tensor(logr, dtype=F64)
    B, T = logr.shape
    adv = torch.as_tensor(adv, dtype=F64)
    adv = adv[:, None].expand(B, T).clone() if adv.dim() == 1 else adv
    mask = torch.ones(B, T, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool)
    old_lp = torch.full((B, T), old, dtype=F64)
    b = make_batch([0.0] * B, None, mask, advantages=adv * mask, old_logprobs=old_lp, dtype=F64)
    if extras:
        b = b.replace(extras=extras)
    return b, (old_lp + logr).requires_grad_(True)


def run_token_loss(loss_fn, logr, adv, mask=None, **kw):
    """Call a PolicyLoss on :func:`token_loss_inputs`; returns (per-token loss, d sum / d logprobs, metrics)."""
    b, lp = token_loss_inputs(logr, adv, mask, **kw)
    out = loss_fn(lp, b)
    out.per_token.sum().backward()
    return out.per_token.detach(), lp.grad, out.metrics
