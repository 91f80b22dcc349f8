"""OTB: the optimal token baseline (a per-timestep baseline weighted by the path's accumulated gradient energy).

Source: the "Optimal Token Baseline" estimator of verl (``compute_optimal_token_baseline_advantage``,
https://github.com/volcengine/verl, verl/trainer/ppo/core_algos.py; no paper is cited there, hence
``fidelity="reconstructed"``). The variance-minimising baseline of a policy gradient sum_t grad log pi(y_t) (G_t - b_t)
is b_t* = E[G_t ||g_t||^2] / E[||g_t||^2]. OTB approximates the squared norm of the path's score up to t by
    W_t = sum_{j <= t} w_j,     w_j = ||e_{y_j} - pi_old(. | s_j)||^2 = 1 - 2 pi_old(y_j) + sum_v pi_old(v)^2,
the squared norm of the gradient of log pi_old(y_j) with respect to the logits, and per prompt group and timestep
    B_t = sum_i G_{i,t} W_{i,t} / (sum_i W_{i,t} + eps)     (over the group's rows still running at t),
    A_{i,t} = G_{i,t} - B_t,
with G the return to go (the outcome reward at the last token plus the reward-to-go of token rewards). Differs from
GRPO: the baseline changes along the response and weighs more the rows whose prefix was uncertain (high w), whose
returns vary more; no std division. Compared with OPO (length-weighted, one baseline per response) it weights by
the accumulated *uncertainty* rather than the length.

Zero tail (``zero_tail``, verl 0.9.1's default ``handle_zero_tail=True``): where one row of a group is still running
alone (the group's unique longest response, past the second longest), the formula's baseline is its own return and
A = 0; the zero tail sets the baseline to 0 there instead, so the row keeps its plain return A = G. lmpo finds those
positions as the ones where exactly one row of a group of two or more is trained (the same set for right-padded rows).

The per-token w comes from pi_old's full distribution (``needs`` ``score_sq_norm``: lmpo computes it in the pass
before the advantages). Gap: verl's optional truncated-IS scaling of w is not implemented. A group of one has no
baseline: A = 0 here by default, A = G in verl (``singleton="raw"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.advantage.reinforce_pp import returns_to_go
from lmpo.methods.params import hp
from lmpo.registry import ADVANTAGES


@ADVANTAGES.register("otb", paper="Optimal token baseline (verl compute_optimal_token_baseline_advantage, "
                     "https://github.com/volcengine/verl)", arxiv="none", fidelity="reconstructed")
@dataclass(frozen=True)
class OTBAdvantage:
    """A_{i,t} = G_{i,t} - sum_j G_{j,t} W_{j,t} / (sum_j W_{j,t} + eps), W the cumulative ||e_y - pi_old||^2.

    Args:
        eps: added to the weight sum of each group and timestep.
        zero_tail: baseline 0 where a row of the group runs alone (verl's handle_zero_tail).
        singleton: a group of one gets 0 ("zero") or its return ("raw", verl).
    """

    eps: float = hp(1e-8, ge=0)
    zero_tail: bool = True
    singleton: str = hp("zero", choices=("zero", "raw"))
    needs: ClassVar[frozenset[str]] = frozenset({"score_sq_norm"})

    def __call__(self, batch: RolloutBatch) -> Tensor:
        mask = batch.response_mask
        m = mask.double()
        g = returns_to_go(batch, batch.rewards.float()).double()
        w = ops.zero_outside(batch.extras["old_score_sq_norm"].double(), mask)
        W = w.cumsum(-1) * m
        inv, n = ops.group_index(batch.group_ids)
        T = mask.shape[1]
        num = torch.zeros(n, T, dtype=torch.float64, device=g.device).index_add(0, inv, g * W * m)
        den = torch.zeros(n, T, dtype=torch.float64, device=g.device).index_add(0, inv, W * m)
        base = (num / (den + self.eps))[inv]
        alone = (ops.group_count(batch.group_ids, torch.float64) == 1)[:, None]
        if self.zero_tail:
            running = torch.zeros(n, T, dtype=torch.float64, device=g.device).index_add(0, inv, m)[inv]
            base = torch.where((running == 1) & mask & ~alone, torch.zeros_like(base), base)
        adv = g - base
        adv = torch.where(alone, g if self.singleton == "raw" else torch.zeros_like(g), adv)
        return ops.zero_outside(adv.float(), mask)


PRESETS = {
    # The optimal token baseline with the plain policy gradient (verl's OTB recipe trains with its usual PPO loss;
    # one optimizer step per batch makes it REINFORCE), token mean, no KL.
    "otb": {
        "advantage": {"name": "otb"},
        "loss": {"name": "ppo_clip"},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.0},
    },
}
