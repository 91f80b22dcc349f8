"""RiskPO: risk-based policy optimisation with a Mixed Value-at-Risk objective over question bundles.

Paper: Ren et al. 2025, "RiskPO: Risk-based Policy Optimization via Verifiable Reward for LLM Post-Training",
arXiv:2510.00911 (released code: RTkenny/RiskPO, adv_estimator ``grpo_bundle_RVaR_quantile_tracking``).

Questions are grouped into bundles of B; the j-th response of every question in a bundle forms a "paper" with score
S_j = sum_{q in bundle} R_{q,j}. With quantiles q_a, q_b of the paper scores at levels alpha < beta:

    RVaR  A^R_j = [ (S_j - q_a)_+ - (S_j - q_b)_+ + q_a - q_b ] / (beta - alpha)     (in [-(q_b-q_a)/(beta-alpha), 0])
    CVaR  A^C_j = -(q_a - S_j)_+ / alpha
    Mixed A_j   = (w A^C_j + A^R_j) / (w + 1),   then  A_j <- A_j / (std_j S + eps)
    credit to response (q, j):  A_{q,j} = A_j / std_q(R)   (std_q := 1 when < 1e-3; "std" mode)

All advantages are <= 0 and the papers at or above q_b get exactly 0: the update concentrates on the lower tail.
Quantiles are either this batch's (linear interpolation), tracked across steps by stochastic quantile estimation
(q <- q + lr_q (level - mean_j 1{S_j <= q})), or the average of both.

Differences from GRPO: the baseline is a risk measure of bundle scores (not the group mean), and the signal of a
response depends on the other questions of its bundle.

Gaps filled (ours):
- Bundles: the batch's questions sorted by group id, cut into consecutive runs of ``bundle_size`` (the last bundle
  may be smaller). Papers: the paper pairs responses at random without replacement; we order each question's
  responses by a fixed hash of their tokens, a pseudo-random pairing that does not depend on row order. A question
  with fewer responses than others simply does not contribute to the papers beyond its size.
- The tracked quantiles are initialised from the first batch's estimate; each bundle is one SGD step on them
  (bundles in group-id order), taken before they are used for that bundle. ``quantile_mode`` defaults to
  "tracked" (the released estimator's name).
- std's are Bessel-corrected (the card's worked example divides by the sample std 1.5811 of (0, 1, 2, 3, 4)).
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


def pairing_rank(batch: RolloutBatch) -> Tensor:
    """Rank (B,) of each row inside its question, ordered by a hash of its trained tokens (row-order independent);
    ties in the hash (identical tokens) are broken by reward."""
    h = ops.token_hash(batch.response_ids, batch.response_mask, 1234)
    return ops.rank_in_group(h, batch.rewards, batch.group_ids)


@ADVANTAGES.register("riskpo", paper="RiskPO: Risk-based Policy Optimization via Verifiable Reward", arxiv="2510.00911",
                     fidelity="reconstructed")
@dataclass
class RiskPOAdvantage(Stateful):
    """Mixed-VaR (RVaR + CVaR) advantage of bundle "paper" scores (arXiv:2510.00911).

    Args:
        alpha, beta: quantile levels, 0 < alpha < beta <= 1 (0.2, 0.9 in the released script).
        bundle_size: questions per bundle (5).
        mix_weight: w, the CVaR weight in the mixture (1.5).
        quantile_mode: "batch", "tracked" (SGD quantile tracking across steps) or "average" of the two.
        quantile_lr: lr_q of the tracker (0.1).
        credit: "std" (divide by the question's reward std) or "uniform".
        eps: added to the std of the paper scores.
    """

    alpha: float = hp(0.2, gt=0, lt=1)
    beta: float = hp(0.9, gt=0, le=1)
    bundle_size: int = hp(5, ge=1)
    mix_weight: float = hp(1.5, ge=0)
    quantile_mode: str = hp("tracked", choices=("batch", "tracked", "average"))
    quantile_lr: float = hp(0.1, gt=0)
    credit: str = hp("std", choices=("std", "uniform"))
    eps: float = 1e-6
    needs: ClassVar[frozenset[str]] = frozenset()
    constraints: ClassVar[tuple[Rule, ...]] = (ordered("alpha", "beta", strict=True),)

    def initial_state(self) -> dict[str, Any]:
        return {}

    # ------------------------------------------------------------------ state (tracked quantiles)


    def _track(self, scores: Tensor, qa: Tensor, qb: Tensor) -> tuple[Tensor, Tensor]:
        s = scores.detach().double()
        if not self.state:
            self.state.update(qa=float(qa), qb=float(qb))
        for key, level in (("qa", self.alpha), ("qb", self.beta)):
            q = self.state[key]
            self.state[key] = q + self.quantile_lr * (level - float((s <= q).double().mean()))
        return tuple(torch.tensor(self.state[k], dtype=scores.dtype) for k in ("qa", "qb"))

    # ------------------------------------------------------------------ maths
    def paper_advantage(self, S: Tensor, qa: Tensor, qb: Tensor) -> Tensor:
        """Mixed-VaR advantage (J,) of paper scores S (J,), divided by their std."""
        relu = torch.relu
        a_r = (relu(S - qa) - relu(S - qb) + qa - qb) / (self.beta - self.alpha)
        a_c = -relu(qa - S) / self.alpha
        a = (self.mix_weight * a_c + a_r) / (self.mix_weight + 1)
        std = S.std() if S.numel() > 1 else torch.zeros((), dtype=S.dtype)
        return a / (std + self.eps)

    def __call__(self, batch: RolloutBatch) -> Tensor:
        r = batch.rewards
        if batch.token_rewards is not None:
            r = r + ops.masked_sum(batch.token_rewards, batch.response_mask, dim=-1).to(r.dtype)
        inv, n_q = ops.group_index(batch.group_ids)  # questions in sorted group-id order
        rank = pairing_rank(batch)
        bundle = inv // self.bundle_size
        n_b = int(bundle.max()) + 1
        # paper score S for (bundle, rank) and the quantiles of each bundle's papers
        key = bundle * (int(rank.max()) + 1) + rank
        uniq, pinv = torch.unique(key, return_inverse=True)
        S = torch.zeros(uniq.numel(), dtype=r.dtype, device=r.device).index_add(0, pinv, r)
        paper_bundle = uniq // (int(rank.max()) + 1)
        adv_paper = torch.zeros_like(S)
        for b in range(n_b):
            sel = paper_bundle == b
            Sb = S[sel]
            q = torch.quantile(Sb, torch.tensor([self.alpha, self.beta], dtype=Sb.dtype, device=Sb.device))
            qa, qb = q[0], q[1]
            if self.quantile_mode != "batch":
                ta, tb = self._track(Sb, qa, qb)
                qa, qb = (ta, tb) if self.quantile_mode == "tracked" else ((qa + ta) / 2, (qb + tb) / 2)
            adv_paper = adv_paper.index_put((sel.nonzero(as_tuple=True)[0],), self.paper_advantage(Sb, qa, qb))
        adv = adv_paper[pinv]
        if self.credit == "std":
            sq = ops.group_std(r, batch.group_ids)
            adv = adv / torch.where(sq < 1e-3, torch.ones_like(sq), sq)
        return ops.zero_outside(adv[:, None], batch.response_mask)


# Released script (Qwen2.5-1.5B): alpha 0.2, beta 0.9, bundles of 5, w = 1.5, lr_q 0.1; GRPO clip, no KL, no entropy
# bonus (GRPO's per-sequence token mean aggregation: the card does not name another).
PRESETS = {
    "riskpo": {
        "advantage": {"name": "riskpo"},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "seq_mean_token_mean"},
        "kl": {"beta": 0.0},
    },
}
