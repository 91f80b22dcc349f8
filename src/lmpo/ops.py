"""Shared tensor maths: masked reductions, group statistics, KL estimators and importance ratios.

All functions are pure and shape-documented. ``mask`` is always a bool (or 0/1 float) tensor broadcastable to the
input. Group statistics are vectorised over ``group_ids`` (no Python loops over groups).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Log-ratios are clamped to this range before exponentiation so that exp() stays finite in float32
# (exp(88.7) overflows); 20 keeps ratios up to ~5e8, far beyond any clip range in use.
LOG_RATIO_CLAMP = 20.0


# --------------------------------------------------------------------------- masked reductions
def zero_outside(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` where ``mask`` is true and exactly 0 elsewhere: ``torch.where(mask, x, 0)``.

    Keeps ``x``'s dtype and device, broadcasts ``x`` and ``mask`` like ``torch.where``, and its gradient reaches only
    the kept entries of ``x`` (so an inf/NaN outside the mask can neither leak into a sum nor into a gradient, which
    ``x * mask`` would do: 0 * NaN = NaN). Zero entries *before* further arithmetic when they may hold garbage.
    """
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def fit_width(x: Tensor, like: Tensor, fill: float = 0.0) -> Tensor:
    """``x`` (B, T') laid onto ``like``'s (B, T) shape and dtype: the first min(T, T') columns copied, the rest
    ``fill`` (per-token extras written at another response width, e.g. before refills padded the batch)."""
    out = torch.full_like(like, fill)
    w = min(like.shape[1], x.shape[1])
    out[:, :w] = x[:, :w].to(like.dtype)
    return out


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` where ``mask`` is true. Masked entries contribute exactly zero (even if ``x`` is inf/NaN)."""
    x = zero_outside(x, mask)
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over true ``mask`` entries; an empty mask gives 0 (not NaN)."""
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp_min(1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over the whole masked set (Bessel-corrected when ``unbiased``; 0 for a single entry).

    Computed in float64: identical float32 values then give exactly zero variance (in float32 their mean can be
    one ulp off, and dividing by a ~1e-8 std would turn that into an O(1) "advantage").
    """
    x64 = zero_outside(x, mask).double()
    mean = masked_mean(x64, mask)
    n = mask.double().sum()
    ss = masked_sum((x64 - mean) ** 2, mask)
    var = ss / (n - 1).clamp_min(1.0) if unbiased else ss / n.clamp_min(1.0)
    return var.to(x.dtype)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / (std + eps) over masked entries (float64 statistics); masked-out entries are returned as 0."""
    x64 = zero_outside(x, mask).double()
    mean = masked_mean(x64, mask)
    std = masked_var(x64, mask).sqrt()
    out = (x64 - mean) / (std + eps) if shift_mean else x64 / (std + eps)
    return zero_outside(out, mask).to(x.dtype)


# --------------------------------------------------------------------------- group statistics
def group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary group ids (B,) to dense indices 0..G-1; returns (inverse (B,), number of groups)."""
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(uniq.numel())


def group_sum(values: Tensor, group_ids: Tensor) -> Tensor:
    """Per-row sum of ``values`` (B,) over the row's group, broadcast back to (B,)."""
    inv, n = group_index(group_ids)
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, inv, values)
    return sums[inv]


def group_count(group_ids: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Per-row size of the row's group (B,)."""
    return group_sum(torch.ones_like(group_ids, dtype=dtype), group_ids)


# Group means and deviations are computed in float64 and cast back: a group of identical float32 rewards (e.g. all
# 0.9) then has exactly zero deviation and zero std, so GRPO gives it A = 0 and DAPO's filter drops it.
def group_mean(values: Tensor, group_ids: Tensor) -> Tensor:
    """Per-row mean of ``values`` (B,) over the row's group (B,)."""
    v = values.double()
    return (group_sum(v, group_ids) / group_count(group_ids, v.dtype)).to(values.dtype)


def group_centered(values: Tensor, group_ids: Tensor) -> Tensor:
    """values - group_mean(values), exact for identical members (float64 inside)."""
    v = values.double()
    return (v - group_sum(v, group_ids) / group_count(group_ids, v.dtype)).to(values.dtype)


def group_std(values: Tensor, group_ids: Tensor, unbiased: bool = True) -> Tensor:
    """Per-row standard deviation over the row's group (B,). Singleton groups give 0.

    ``unbiased=True`` (Bessel's correction) matches ``torch.std`` as used by TRL and verl for GRPO.
    """
    v = values.double()
    n = group_count(group_ids, v.dtype)
    dev = v - group_sum(v, group_ids) / n
    ss = group_sum(dev * dev, group_ids)
    denom = (n - 1).clamp_min(1.0) if unbiased else n
    return (ss / denom).sqrt().to(values.dtype)


def group_loo_mean(values: Tensor, group_ids: Tensor) -> Tensor:
    """Leave-one-out mean: mean of the *other* members of each row's group (0 for singleton groups)."""
    v = values.double()
    n = group_count(group_ids, v.dtype)
    others = group_sum(v, group_ids) - v
    return zero_outside(others / (n - 1).clamp_min(1.0), n > 1).to(values.dtype)


# --------------------------------------------------------------------------- ratios and KL
def log_ratio(logprobs: Tensor, old_logprobs: Tensor) -> Tensor:
    """Clamped log(pi / pi_old) per token (B, T). ``old_logprobs`` is a constant: no gradient flows into it."""
    return (logprobs - old_logprobs.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def token_ratio(logprobs: Tensor, old_logprobs: Tensor) -> Tensor:
    """Token importance ratio r_t = pi(y_t) / pi_old(y_t), (B, T)."""
    return log_ratio(logprobs, old_logprobs).exp()


def sequence_log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Length-normalised sequence log-ratio (1/|y|) sum_t log(pi/pi_old), (B,) (GSPO, arXiv:2507.18071 Eq. 7)."""
    return masked_mean(logprobs - old_logprobs.detach(), mask, dim=-1).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def sequence_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """GSPO sequence ratio s = (pi(y)/pi_old(y))^(1/|y|), (B,)."""
    return sequence_log_ratio(logprobs, old_logprobs, mask).exp()


KL_ESTIMATORS = ("k1", "k2", "k3", "abs", "k1+", "k2+", "k3+", "abs+")


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3", k3_clamp: float | None = None) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples y ~ pi (J. Schulman, "Approximating KL divergence", 2020).

    With d = log pi(y) - log pi_ref(y):
      k1  = d                       (unbiased, high variance, can be negative)
      k2  = d^2 / 2                 (biased, low variance; its gradient is the true KL gradient in expectation)
      k3  = exp(-d) - 1 + d         (unbiased, always >= 0; the estimator used by GRPO, arXiv:2402.03300 Eq. 4)
      abs = |d|                     (verl's ``abs``; a biased magnitude, gradient sign(d))
    A trailing ``+`` (``k1+``, ``k3+``, ``abs+``) is the straight-through form of verl's ``kl_penalty``: the *value*
    of the named estimator with the *gradient* of k2 (d), i.e. ``k2 - sg(k2) + sg(value)``. The expected gradient of
    k1 and k3 under y ~ pi is not the gradient of KL(pi || pi_ref); k2's is, so ``k3+`` reports k3 and trains on the
    right gradient. ``k2+`` equals k2.

    ``k3_clamp``: clamp k3 (and the value of ``k3+``) to [-c, c]; verl clamps at 10 (``kl_penalty_forward``), lmpo
    does not by default. The log-ratio d itself is clamped to [-20, 20] before exp in both.
    """
    d = log_ratio(logprobs, ref_logprobs)
    straight = estimator.endswith("+")
    base = estimator[:-1] if straight else estimator
    if base == "k1":
        value = d
    elif base == "k2":
        value = 0.5 * d * d
    elif base == "k3":
        value = torch.expm1(-d) + d
        if k3_clamp is not None:
            value = value.clamp(-k3_clamp, k3_clamp)
    elif base == "abs":
        value = d.abs()
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")
    if not straight or base == "k2":
        return value
    k2 = 0.5 * d * d
    return k2 - k2.detach() + value.detach()


# --------------------------------------------------------------------------- critic
def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float | None,
                       ) -> tuple[Tensor, Tensor]:
    """PPO's clipped value loss per token and where the clipped branch is the larger one (both (B, T)).

    ``0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)`` (PPO2's value clipping; verl's
    ``compute_value_loss`` and TRL's PPOTrainer, both with the 0.5 factor); ``clip=None``: ``0.5 (V - R)^2``.
    Gradient flows into ``values`` only. Mask and aggregate it outside."""
    old_values, returns = old_values.detach(), returns.detach()
    plain = (values - returns) ** 2
    if clip is None:
        return 0.5 * plain, torch.zeros_like(plain, dtype=torch.bool)
    clipped = (old_values + (values - old_values).clamp(-clip, clip) - returns) ** 2
    return 0.5 * torch.maximum(plain, clipped), clipped > plain


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var(R - V) / Var(R)`` over the masked tokens (1: the critic predicts the returns; 0: no better than their
    mean); 0 when the returns do not vary."""
    var_r = masked_var(returns, mask)
    out = 1.0 - masked_var(returns - values, mask) / var_r.clamp_min(1e-12)
    return torch.where(var_r > 0, out, torch.zeros_like(out))


def response_lengths(mask: Tensor) -> Tensor:
    """Number of trained tokens per row (B,) as float."""
    return mask.to(torch.float32).sum(-1)


def token_hash(response_ids: Tensor, mask: Tensor, seed: int) -> Tensor:
    """A fixed pseudo-random integer (B,) per row from its trained tokens: equal rows hash equal, and the value does
    not depend on the row's position in the batch (for permutation-equivariant tie-breaking and pairing)."""
    ids = zero_outside(response_ids + 1, mask).long()
    coef = torch.randint(1, 2**20, (ids.shape[1],), generator=torch.Generator().manual_seed(seed)).to(ids.device)
    return (ids * coef).sum(-1) % (2**31 - 1)


def rank_in_group(key: Tensor, tie: Tensor, group_ids: Tensor) -> Tensor:
    """0-based rank (B,) of each row inside its group, ordered by ascending ``key`` then ``tie``."""
    order = torch.sort(tie, stable=True).indices
    order = order[torch.sort(key[order], stable=True).indices]
    order = order[torch.sort(group_ids[order], stable=True).indices]
    inv, _ = group_index(group_ids)
    sorted_inv = inv[order]
    start = torch.searchsorted(sorted_inv, sorted_inv)  # first sorted position of each row's group
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - start
    return rank
