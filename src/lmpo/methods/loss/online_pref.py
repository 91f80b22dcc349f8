"""Online preference pairs: any registered preference loss (DPO family) on pairs built from the step's rollouts.

Online DPO: Guo, Zhang, Liu, et al. 2024, "Direct Language Model Alignment from Online AI Feedback" (OAIF),
arXiv:2402.04792, Algorithm 1: sample two responses per prompt from the current policy, let a judge (here any lmpo
reward) label the better one, and take a DPO step (arXiv:2305.18290 Eq. 7) on that fresh pair. TRL ships it as
``OnlineDPOTrainer`` (two completions per prompt, ``beta`` 0.1, ``loss_type`` "sigmoid", temperature 0.9).

Pairs (per prompt group, among rows with at least one trained token; ``g = rewards [+ sum token_rewards]``):
- ``best_worst``: every row with the group's highest reward against every row with its lowest, when the gap exceeds
  ``min_gap``; each pair weighs ``1 / (n_top * n_bottom)``, so a group counts once and tied maxima/minima are
  averaged over (the expected loss under a uniform tie-break, which keeps the loss row-permutation equivariant);
- ``all``: every ordered pair (i, j) of the group with ``g_i - g_j > min_gap``, weight 1;
- ``constrained`` (CGPO's CODPO, arXiv:2409.20370; rows are feasible when their outcome reward is above
  ``feasible_above``): the group's best feasible row(s) against its worst infeasible row(s), or against its worst
  row(s) when every row is feasible (then the gap must exceed ``min_gap``); weights as ``best_worst``; a group with
  no feasible row yields nothing.
Pairs whose gap is at most ``min_gap`` are ties: skipped and counted (``loss/pair_ties``); a group with one member
(or none) yields nothing. With two rollouts per prompt both modes give OAIF's single pair.

Why a policy loss (and not a stage of its own): the RL step already provides what online DPO needs -- the rollouts,
their rewards, the reference log-probs (``needs``) and the training forward's per-token log-probs (B, T) -- and its
micro-batching, gradient clipping, checkpoints and metrics. This component only regroups those rows into
:class:`~lmpo.batch.PreferenceBatch` pairs, calls the preference loss, and writes each pair's loss back onto the
tokens of its two rows: row i carries ``v_i = sum_{p ∋ i} (w_p l_p / 2) * n_rows / W`` on each trained token
(``W = sum_p w_p``), so with ``aggregator: seq_mean_token_mean`` (normaliser = number of rows) the step's loss is
exactly the weighted mean of the per-pair losses, ``sum_p w_p l_p / W``, and so is its gradient. ``n_rows`` and ``W``
are counted on the rows of the call: keep a prompt group within one micro-batch (as for REAL / DisCO). Mixing with
an RL loss (``rl``, e.g. ``{name: ppo_clip}``) adds ``rl_weight`` x its per-token loss, so both share the rollouts.

Differences from TRL's OnlineDPOTrainer: TRL breaks a tie in favour of the first completion; lmpo skips ties (a
tied pair carries no preference). TRL's judge is a pairwise model; here the ranking is the configured reward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import PreferenceBatch, RolloutBatch
from lmpo.errors import ConfigError
from lmpo.methods.base import LossOut, PairLogps
from lmpo.methods.params import hp
from lmpo.registry import LOSSES, PREFERENCE_LOSSES

PAIR_MODES = ("best_worst", "all", "constrained")


@dataclass(frozen=True)
class Pairs:
    """Row indices of each pair's chosen and rejected response (N,), the pair weights (N,) and the tie count."""

    chosen: Tensor
    rejected: Tensor
    weight: Tensor
    ties: int


def sequence_scores(batch: RolloutBatch) -> Tensor:
    """The outcome reward plus the summed token rewards (KL-in-reward, process rewards) when present (B,)."""
    g = batch.rewards if batch.rewards.is_floating_point() else batch.rewards.float()
    if batch.token_rewards is not None:
        g = g + ops.masked_sum(batch.token_rewards.to(g.dtype), batch.response_mask, dim=-1)
    return g


def _extreme(s: Tensor, inv: Tensor, n: int, rows: Tensor, how: str) -> tuple[Tensor, Tensor, Tensor]:
    """Rows of ``rows`` holding their group's max/min score (B,) bool, each group's count of them and value (G,)."""
    fill = -torch.inf if how == "amax" else torch.inf
    ext = torch.full((n,), fill, dtype=s.dtype).scatter_reduce(0, inv[rows], s[rows], how)
    at = rows & (s == ext[inv])
    return at, torch.zeros(n, dtype=s.dtype).index_add(0, inv, at.to(s.dtype)), ext


def build_pairs(scores: Tensor, group_ids: Tensor, member: Tensor, mode: str = "best_worst",
                min_gap: float = 0.0, feasible: Tensor | None = None) -> Pairs:
    """Ranked pairs within each group (see the module docstring); ``member``: rows that may be paired (B,) bool;
    ``feasible``: rows satisfying every constraint (B,) bool, for ``constrained``."""
    same = (group_ids[:, None] == group_ids[None, :]) & member[:, None] & member[None, :]
    gap = scores[:, None] - scores[None, :]
    upper = torch.ones_like(same).triu(1)
    if mode == "all":
        valid = same & (gap > min_gap)
        weight = torch.ones_like(gap, dtype=torch.float64)
        ties = int((same & upper & (gap.abs() <= min_gap)).sum())
    elif mode == "best_worst":
        inv, n = ops.group_index(group_ids)
        s = scores.double()
        top, n_top, hi = _extreme(s, inv, n, member, "amax")
        bottom, n_bot, lo = _extreme(s, inv, n, member, "amin")
        valid = same & top[:, None] & bottom[None, :] & (gap > min_gap)
        weight = 1.0 / (n_top[inv][:, None] * n_bot[inv][None, :]).clamp_min(1.0)
        size = torch.zeros(n, dtype=s.dtype).index_add(0, inv, member.to(s.dtype))
        ties = int(((size >= 2) & ((hi - lo) <= min_gap)).sum())
    elif mode == "constrained":
        if feasible is None:
            raise ConfigError("pairs=constrained needs each row's feasibility (loss.feasible_above).")
        inv, n = ops.group_index(group_ids)
        s = scores.double()
        ok, bad = member & feasible, member & ~feasible
        n_bad_rows = torch.zeros(n, dtype=s.dtype).index_add(0, inv, bad.to(s.dtype))
        top, n_top, hi = _extreme(s, inv, n, ok, "amax")
        worst_bad, n_wb, _ = _extreme(s, inv, n, bad, "amin")
        worst_all, n_wa, lo = _extreme(s, inv, n, member, "amin")
        any_bad = n_bad_rows > 0
        bottom = torch.where(any_bad[inv], worst_bad, worst_all)
        n_bot = torch.where(any_bad, n_wb, n_wa)
        valid = same & top[:, None] & bottom[None, :] & ((gap > min_gap) | ~feasible[None, :])
        weight = 1.0 / (n_top[inv][:, None] * n_bot[inv][None, :]).clamp_min(1.0)
        size = torch.zeros(n, dtype=s.dtype).index_add(0, inv, member.to(s.dtype))
        ties = int(((size >= 2) & (n_top > 0) & ~any_bad & ((hi - lo) <= min_gap)).sum())
    else:
        raise ConfigError(f"pairs must be one of {', '.join(PAIR_MODES)}, got {mode!r}.")
    c, r = valid.nonzero(as_tuple=True)
    return Pairs(c, r, weight[c, r], ties)  # float64 weights


def pair_batch(batch: RolloutBatch, pairs: Pairs) -> PreferenceBatch:
    """The rollout rows of each pair as a :class:`PreferenceBatch` (same prompt; chosen and rejected responses)."""
    c, r = pairs.chosen, pairs.rejected
    return PreferenceBatch(prompt_ids=batch.prompt_ids[c], chosen_ids=batch.response_ids[c],
                           chosen_mask=batch.response_mask[c], rejected_ids=batch.response_ids[r],
                           rejected_mask=batch.response_mask[r])


def pair_logps(lp: Tensor, batch: RolloutBatch, pairs: Pairs) -> PairLogps:
    """Per-token log-probs of each pair's responses (0 on padding), from a (B, T) tensor of the rollout rows."""
    lp = ops.zero_outside(lp, batch.response_mask)
    return PairLogps(lp[pairs.chosen], lp[pairs.rejected])


def spread_to_tokens(per_pair: Tensor, pairs: Pairs, member: Tensor, mask: Tensor) -> Tensor:
    """Per-token (B, T) values whose ``seq_mean_token_mean`` over the rows is the weighted pair mean (docstring)."""
    B = mask.shape[0]
    if pairs.chosen.numel() == 0:
        return torch.zeros(mask.shape, dtype=per_pair.dtype, device=mask.device)
    w = pairs.weight.to(per_pair.dtype)
    W = w.sum()
    share = per_pair * w * (member.sum().to(per_pair.dtype) / (2.0 * W))
    row = torch.zeros(B, dtype=per_pair.dtype, device=mask.device).index_add(0, pairs.chosen, share)
    row = row.index_add(0, pairs.rejected, share)
    return ops.zero_outside(row[:, None].expand(mask.shape), mask)


def build_spec(registry, spec: dict[str, Any] | None, where: str):
    """A component from a ``{name: ..., **params}`` mapping, with the registry's errors naming ``where``."""
    if spec is None:
        return None
    if "name" not in spec:
        raise ConfigError(f"{where} needs a name: one of {', '.join(registry.names())}.")
    params = {k: v for k, v in spec.items() if k != "name"}
    return registry.build(spec["name"], where=where, **params)


@LOSSES.register("online_pref", paper="Direct Language Model Alignment from Online AI Feedback (online DPO; pairs "
                 "from the step's rollouts)", arxiv="2402.04792")
@dataclass(frozen=True)
class OnlinePreference:
    """Any registered preference loss on (best, worst) or all ranked pairs of each prompt's rollouts.

    Args:
        preference: the preference loss, ``{name: dpo, beta: 0.1}`` (any name of ``PREFERENCE_LOSSES``).
        pairs: ``best_worst`` or ``all`` (module docstring).
        min_gap: a pair needs a reward gap above this; smaller gaps are ties (skipped, counted).
        feasible_above: for ``pairs: constrained``, a row with outcome reward above this satisfies every constraint.
        rl: an optional RL policy loss (``{name: ppo_clip}``) trained on the same rollouts.
        rl_weight / pref_weight: weights of the two per-token losses.
    """

    preference: dict[str, Any] = field(default_factory=lambda: {"name": "dpo", "beta": 0.1})
    pairs: str = hp("best_worst", choices=PAIR_MODES)
    min_gap: float = hp(0.0, ge=0)
    feasible_above: float = 0.0
    rl: dict[str, Any] | None = None
    rl_weight: float = hp(1.0, ge=0)
    pref_weight: float = hp(1.0, ge=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_pref", build_spec(PREFERENCE_LOSSES, self.preference, "loss.preference"))
        object.__setattr__(self, "_rl", build_spec(LOSSES, self.rl, "loss.rl"))
        if "mismatched_logprobs" in getattr(self._pref, "needs", ()):
            raise ConfigError(f'loss.preference "{self.preference["name"]}" needs mismatched (prompt, response) '
                              "pairs' log-probs, which online pairs do not carry; set "
                              "loss.preference.reference_point=batch.")
        if isinstance(self._rl, OnlinePreference):
            raise ConfigError("loss.rl must be an RL policy loss, not online_pref itself.")
        if self._rl is not None and "layer_noise" in getattr(self._rl, "needs", ()):
            raise ConfigError(f"loss.rl: {self.rl['name']} perturbs the training forward (layer_noise), which "
                              "online_pref cannot pass on; use it as the run's loss instead.")

    __hash__ = object.__hash__

    @property
    def needs(self) -> frozenset[str]:
        out = frozenset(getattr(self._pref, "needs", frozenset()))
        return out | frozenset(getattr(self._rl, "needs", frozenset())) if self._rl is not None else out

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask = batch.response_mask
        member = mask.any(-1)
        feasible = batch.rewards.double() > self.feasible_above if self.pairs == "constrained" else None
        pairs = build_pairs(sequence_scores(batch), batch.group_ids, member, self.pairs, self.min_gap, feasible)
        metrics = {"loss/pairs": torch.tensor(float(pairs.chosen.numel())),
                   "loss/pair_ties": torch.tensor(float(pairs.ties)),
                   "loss/unpaired_empty": (~member).sum().float()}  # rows without a trained token: never paired
        per_token = torch.zeros_like(logprobs) * logprobs  # keeps the graph when there is no pair
        if pairs.chosen.numel():
            ref = pair_logps(batch.ref_logprobs.detach(), batch, pairs) if "ref_logprobs" in self._pref.needs else None
            out = self._pref(pair_batch(batch, pairs), pair_logps(logprobs, batch, pairs), ref)
            per_token = per_token + self.pref_weight * spread_to_tokens(out.per_pair, pairs, member, mask)
            metrics.update({k: v.detach() for k, v in out.metrics.items()})
        if self._rl is not None:
            rl = self._rl(logprobs, batch)
            per_token = per_token + self.rl_weight * rl.per_token
            metrics.update({k: v.detach() for k, v in rl.metrics.items()})
        return LossOut(ops.zero_outside(per_token, mask), metrics)


PRESETS = {
    # Online DPO (OAIF, arXiv:2402.04792; TRL OnlineDPOConfig defaults): two samples per prompt at temperature 0.9,
    # the better one (by the task's reward) chosen, DPO sigmoid loss with beta 0.1 against the initial weights.
    "online_dpo": {
        "advantage": {"name": "grpo"},  # unused by the loss (the rewards rank the pairs)
        "loss": {"name": "online_pref", "preference": {"name": "dpo", "beta": 0.1}, "pairs": "best_worst"},
        "aggregator": {"name": "seq_mean_token_mean"},
        "rollout": {"num_generations": 2, "temperature": 0.9},
        "kl": {"beta": 0.0},
    },
}
