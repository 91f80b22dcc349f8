"""ADORA: Advantage Dynamics via Online Rollout Adaptation.

Paper: Ren, Huang, Fang et al. 2026, "ADORA: Training Reasoning Models with Dynamic Advantage Estimation on
Reinforcement Learning", arXiv:2602.10019 (blog and code ShadeCloak/ADORA, Mar 2025).

Each prompt's group is classified online, from its own rollouts, as temporarily advantageous (TAS) or
disadvantageous (TDS), and its GRPO advantage is re-weighted:

    A^_i = (R_i - mean_g R) / (std_g R + eps)                                   (GRPO)
    P = {i : R_i > tau_R} (correct), N = the rest, L_i = response length
    Length-advantage criterion: the group is TAS if P is empty or max_{i in P} L_i > mean_{i in N} L_i, else TDS
    A_i = w_g A^_i with w_g = tas_weight (1) for TAS groups and lambda (0.1) for TDS groups

so groups whose correct answers think no longer than the wrong ones are attenuated. Code v2 also reshapes the
rewards of correct answers in length-advantaged groups by difficulty (before the GRPO normalisation), with
l~_i the min-max normalised length among the group's correct answers:
    hard group (|P| < p G):        R_i += length_beta (2 l~_i - 1)
    easy group (|P| >= (1 - p) G): R_i -= length_beta (2 l~_i - 1)

Differences from GRPO: the advantage of a whole group is scaled by a weight that depends on the group's lengths and
accuracy at this step (the sample's "evolving utility").

Gaps filled (ours):
- tau_R: the paper's 1.0 is for Logic-RL's reward scale (correct answers score > 1); for 0/1 verifiers we default
  to 0.5. ``length_beta`` defaults to 0 (the released v1 code); v2 uses 0.5 with p = 0.5.
- Groups with no wrong answer (N empty) are TAS (their GRPO advantage is 0 anyway). Truncated responses are left
  out of N when ``exclude_truncated`` (v2) and ``batch.truncated`` is known.
- Stages: the blog notes ADORA may be applied only at certain stages of training; ``start_step`` / ``end_step``
  give that window, counted in calls (one per training step). The counter is this component's state and is saved
  in checkpoints (``state_dict``); outside the window the advantage is plain GRPO.
- std is Bessel-corrected, as in GRPO here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.base import Stateful
from lmpo.methods.params import Rule, hp, ordered
from lmpo.registry import ADVANTAGES


def group_extreme(values: Tensor, keep: Tensor, group_ids: Tensor, reduce: str) -> Tensor:
    """Per-row max or min of ``values`` over the kept rows of its group (B,); -inf / +inf when none is kept."""
    inv, n = ops.group_index(group_ids)
    fill = float("-inf") if reduce == "amax" else float("inf")
    v = torch.where(keep, values, torch.full_like(values, fill))
    out = torch.full((n,), fill, dtype=values.dtype, device=values.device).scatter_reduce(0, inv, v, reduce=reduce)
    return out[inv]


@ADVANTAGES.register("adora", paper="ADORA: Training Reasoning Models with Dynamic Advantage Estimation",
                     arxiv="2602.10019")
@dataclass
class ADORAAdvantage(Stateful):
    """GRPO advantage re-weighted per group by ADORA's length-advantage criterion (arXiv:2602.10019).

    Args:
        attenuation: lambda, the weight of TDS groups (0.1).
        tas_weight: the weight of TAS groups (1; > 1 amplifies them, as the arXiv version does for strong LLMs).
        reward_threshold: tau_R, a response is correct when R > tau_R.
        length_beta, difficulty_p: code-v2 length reshaping of correct rewards (0 disables it).
        exclude_truncated: leave truncated responses out of N in the length criterion.
        start_step, end_step: apply ADORA only for steps start_step < step <= end_step (``None``: no end).
        eps: added to the group std.
    """

    attenuation: float = hp(0.1, ge=0)
    tas_weight: float = hp(1.0, ge=0)
    reward_threshold: float = 0.5
    length_beta: float = hp(0.0, ge=0)
    difficulty_p: float = hp(0.5, ge=0, le=0.5)
    exclude_truncated: bool = False
    start_step: int = hp(0, ge=0)
    end_step: int | None = None
    eps: float = 1e-6
    needs: ClassVar[frozenset[str]] = frozenset()
    constraints: ClassVar[tuple[Rule, ...]] = (ordered("start_step", "end_step"),)

    def initial_state(self) -> dict[str, Any]:
        return {"step": 0}



    def tas(self, r: Tensor, lengths: Tensor, group_ids: Tensor, truncated: Tensor | None) -> Tensor:
        """Per row (B,) bool: the row's group is temporarily advantageous by the length criterion."""
        correct = r > self.reward_threshold
        wrong = ~correct
        if self.exclude_truncated and truncated is not None:
            wrong = wrong & ~truncated
        max_pos = group_extreme(lengths, correct, group_ids, "amax")
        n_wrong = ops.group_sum(wrong.to(lengths.dtype), group_ids)
        sum_neg = ops.group_sum(ops.zero_outside(lengths, wrong), group_ids)
        mean_neg = sum_neg / n_wrong.clamp_min(1)
        no_pos = ops.group_sum(correct.to(lengths.dtype), group_ids) == 0
        return no_pos | (n_wrong == 0) | (max_pos > mean_neg)

    def reshape(self, r: Tensor, lengths: Tensor, group_ids: Tensor, tas: Tensor) -> Tensor:
        """Code-v2 difficulty-aware length bonus on correct answers of length-advantaged groups."""
        correct = r > self.reward_threshold
        lo = group_extreme(lengths, correct, group_ids, "amin")
        hi = group_extreme(lengths, correct, group_ids, "amax")
        span = hi - lo
        safe = torch.where(span > 0, span, torch.ones_like(span))
        ell = torch.where(correct & (span > 0), (lengths - lo) / safe, 0.5)
        n_pos, G = ops.group_sum(correct.to(r.dtype), group_ids), ops.group_count(group_ids, r.dtype)
        easy = torch.where(n_pos >= (1 - self.difficulty_p) * G, -1.0, 0.0)
        sign = torch.where(n_pos < self.difficulty_p * G, 1.0, easy)
        bonus = self.length_beta * sign.to(r.dtype) * (2 * ell - 1)
        return torch.where(correct & tas, r + bonus.to(r.dtype), r)

    def __call__(self, batch: RolloutBatch) -> Tensor:
        self.state["step"] += 1
        step = self.state["step"]
        active = step > self.start_step and (self.end_step is None or step <= self.end_step)
        r = batch.rewards
        if batch.token_rewards is not None:
            r = r + ops.masked_sum(batch.token_rewards, batch.response_mask, dim=-1).to(r.dtype)
        w = torch.ones_like(r)
        if active:
            lengths = ops.response_lengths(batch.response_mask).to(r.dtype)
            tas = self.tas(r, lengths, batch.group_ids, batch.truncated)
            w = torch.where(tas, torch.full_like(r, self.tas_weight), torch.full_like(r, self.attenuation))
            if self.length_beta > 0:
                r = self.reshape(r, lengths, batch.group_ids, tas)
        std = ops.group_std(r, batch.group_ids) + self.eps
        adv = w * ops.group_centered(r, batch.group_ids) / torch.where(std > 0, std, torch.ones_like(std))
        return ops.zero_outside(adv[:, None], batch.response_mask)


# Released LLM code (v1): lambda = 0.1. The card gives no loss settings; ADORA plugs into GRPO, so we keep GRPO's.
PRESETS = {
    "adora": {
        "advantage": {"name": "adora", "attenuation": 0.1},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "seq_mean_token_mean"},
        "kl": {"beta": 0.04, "estimator": "k3", "mode": "loss"},
    },
}
