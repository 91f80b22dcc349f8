"""RL-PLUS: external solutions in every group, multiple importance sampling and an exploration-based advantage.

Paper: Dong et al. 2025, "RL-PLUS: Countering Capability Boundary Collapse of LLMs in Reinforcement Learning with
Hybrid-policy Optimization", arXiv:2508.00222; code YihongDong/RL-PLUS (verl recipe ``rlplus_core_alg.py``,
``exp_scripts/train_RL-PLUS.sh``), read for the rules below.

Collection (the ``guide`` extension point, lmpo.train.guidance): every group of n rollouts gets one external
solution e (the row's ``column``, e.g. an R1 trace) in place of one rollout (the script's n = 8, n_prefix = 1, full
trace); its behaviour log-probs are the policy's own at collection (pi_old), which is what the MIS denominator uses.
Advantage (``rl_plus``): A_i = R_i - mean_{j on-policy} R_j, the baseline from the group's on-policy rows only
(``grpo_split`` with ``grpo_use_std=False``), the same for every token.
Loss: on-policy tokens the unclipped surrogate -A r_t, r_t = pi_theta / pi_old (``loss_remove_clip``). External tokens
(MIS, Eq. of Sec. 3.2): with the unknown external policy's probability estimated as omega_t = (pi_old + 1) / 2,
    r_t = pi_theta(e_t) / (1/2 pi_old(e_t) + 1/2 omega_t) = pi_theta / (3/4 pi_old + 1/4),
bounded by 4 unlike pi_theta / pi_old, and the exploration-based advantage
    A~_t = A_e (1 - sg(pi_theta(e_t)))^gamma,   gamma = 0.5,
so tokens the policy already finds likely get little credit; l_t = -r_t A~_t. The script sums the token losses and
divides by a constant (``loss_remove_token_mean``): preset aggregator ``seq_mean_token_sum_norm``.

Differs from GRPO: an external trace in every group, an on-policy-only baseline without std, no clip, the MIS ratio
and the probability-weighted advantage on external tokens.

Gaps filled: the script's entropy bonus 0.001 is the trainer's ``train.entropy_coef`` (set by the preset);
``mis_weight`` (1/2) and ``gamma`` expose the constants. The script's constant divisor is the padded response width; ``seq_mean_token_sum_norm`` divides by
B x L_max instead (the same gradient up to the constant factor B).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.errors import DataError
from lmpo.methods.advantage.grpo import broadcast, outcome_returns
from lmpo.methods.base import LossOut
from lmpo.methods.loss.ampo import off_policy_rows
from lmpo.methods.params import hp
from lmpo.registry import ADVANTAGES, LOSSES


@ADVANTAGES.register("rl_plus", paper="RL-PLUS: Countering Capability Boundary Collapse of LLMs in Reinforcement "
                     "Learning with Hybrid-policy Optimization", arxiv="2508.00222")
@dataclass(frozen=True)
class RLPlusAdvantage:
    """A_i = R_i - mean of the group's on-policy returns (all rows' when a group has none); no std."""

    needs: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, batch: RolloutBatch) -> Tensor:
        r = outcome_returns(batch)
        on = (~off_policy_rows(batch)[:, 0]).to(r.dtype)
        idx, G = ops.group_index(batch.group_ids)
        s_on = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, idx, r * on)
        n_on = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, idx, on)
        base = torch.where(n_on > 0, s_on / n_on.clamp(min=1), _group_means(r, idx, G))
        return broadcast(r - base[idx], batch.response_mask)


def _group_means(r: Tensor, idx: Tensor, G: int) -> Tensor:
    s = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, idx, r)
    n = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, idx, torch.ones_like(r))
    return s / n


@LOSSES.register("rl_plus", paper="RL-PLUS: Countering Capability Boundary Collapse of LLMs in Reinforcement "
                 "Learning with Hybrid-policy Optimization", arxiv="2508.00222")
@dataclass(frozen=True)
class RLPlusLoss:
    """-A r on policy tokens; -r_MIS A (1 - sg(pi))^gamma on external tokens; adds one external trace per group.

    Args:
        gamma: exponent of the exploration weight (1 - pi)^gamma.
        mis_weight: weight of omega = (pi_old + 1) / 2 in the MIS denominator (1/2 in the paper).
        epsilon: optional PPO clip of the on-policy ratio (None: unclipped, the released script).
        column: the row column holding the external solution.
    """

    gamma: float = hp(0.5, ge=0)
    mis_weight: float = hp(0.5, gt=0, le=1)
    epsilon: float | None = hp(None, ge=0)
    column: str = "solution"
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs"})

    def mis_ratio(self, logprobs: Tensor, old: Tensor) -> Tensor:
        p_old = old.detach().exp()
        omega = 0.5 * (p_old + 1.0)
        return logprobs.exp() / ((1 - self.mis_weight) * p_old + self.mis_weight * omega)

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask, adv = batch.response_mask, batch.advantages
        ratio = ops.token_ratio(logprobs, batch.old_logprobs)
        on = -adv * ratio
        if self.epsilon is not None:
            on = torch.maximum(on, -adv * ratio.clamp(1 - self.epsilon, 1 + self.epsilon))
        weight = (1.0 - logprobs.detach().exp()).clamp(min=0.0) ** self.gamma
        r_mis = self.mis_ratio(logprobs, batch.old_logprobs)
        off = -r_mis * adv * weight
        rows = off_policy_rows(batch)
        per_token = ops.zero_outside(torch.where(rows, off, on), mask)
        off_mask = mask & rows
        return LossOut(per_token, {"loss/off_token_frac": (off_mask.sum() / mask.sum().clamp(min=1)).float().detach(),
                                   "loss/mis_ratio": ops.masked_mean(r_mis.detach(), off_mask),
                                   "loss/explore_weight": ops.masked_mean(weight, off_mask)})

    def guide(self, guide, batch: RolloutBatch) -> RolloutBatch:  # GuidanceSource
        groups = torch.unique_consecutive(batch.group_ids).tolist()
        rows = guide.rows_of(batch, groups)
        missing = [r.get("prompt") for r in rows if r.get(self.column) is None]
        if missing:
            raise DataError(f"rl_plus: rows {missing[:3]} have no external solution column {self.column!r} "
                            "(set loss.column).")
        ext = guide.traces(rows, [str(r[self.column]) for r in rows], groups, behaviour="policy", source="external")
        guide.count("external_correct", float((ext.rewards > 0).sum()))
        return guide.mix(batch, ext, replace=True)


PRESETS = {
    # RL-PLUS (arXiv:2508.00222; exp_scripts/train_RL-PLUS.sh): one external trace in place of one of the group's
    # rollouts, on-policy baseline without std, no clip, MIS + exploration weight gamma 0.5 on external tokens,
    # constant-normalised token sum, entropy bonus 0.001, no KL.
    "rl_plus": {
        "advantage": {"name": "rl_plus"},
        "loss": {"name": "rl_plus", "gamma": 0.5},
        "aggregator": {"name": "seq_mean_token_sum_norm"},
        "kl": {"beta": 0.0},
        "train": {"entropy_coef": 0.001},
    },
}
