"""AOT: Distributional Preference Alignment of LLMs via Optimal Transport.

Melnyk, Mroueh, Belgodere, Rigotti, Nitsure, Yurochkin, Greenewald, Navratil, Ross (2024), arXiv:2406.05882: the
chosen reward distribution should dominate the rejected one in first order (stochastic dominance), which in one
dimension is solved by sorting: the k-th smallest of one batch quantity is compared with the k-th smallest of the
other (the optimal transport plan between the empirical distributions), through DPO's logistic loss (the paper's
smooth relaxation, with conservative label smoothing eps):

    paired   (TRL ``loss_type="aot"``):          d_k = sort(log pi(y_w)/pi(y_l))_k - sort(log pi_ref(y_w)/pi_ref(y_l))_k
    unpaired (TRL ``loss_type="aot_unpaired"``): d_k = sort(log pi/pi_ref (y_w))_k - sort(log pi/pi_ref (y_l))_k
    L_k = -(1 - eps) log sigmoid(beta d_k) - eps log sigmoid(-beta d_k)

Each sorted position's loss is reported on the row that holds the k-th smallest first quantity (the policy's
log-ratio margin, or its chosen log-ratio), so permuting the rows permutes the losses. The sort couples the rows of
a micro-batch (``batch_statistic``), as in the paper (batch-level dominance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from lmpo.batch import PreferenceBatch
from lmpo.methods.base import PairLogps, PreferenceOut, hp
from lmpo.methods.preference.dpo import implicit_rewards, reward_metrics, sequence_logps
from lmpo.registry import PREFERENCE_LOSSES


@PREFERENCE_LOSSES.register("aot", paper="Distributional Preference Alignment of LLMs via Optimal Transport",
                            arxiv="2406.05882")
@dataclass(frozen=True)
class AOT:
    """Sorted (quantile-matched) logistic loss: the chosen distribution dominates the rejected one."""

    beta: float = hp(0.1, gt=0)
    label_smoothing: float = hp(0.0, ge=0, lt=0.5)
    unpaired: bool = False  # TRL's aot_unpaired: sort the chosen and the rejected log-ratios separately
    needs: ClassVar[frozenset[str]] = frozenset({"ref_logprobs"})
    batch_statistic: ClassVar[bool] = True

    def __call__(self, batch: PreferenceBatch, policy: PairLogps, ref: PairLogps | None) -> PreferenceOut:
        pc, pr = sequence_logps(batch, policy)
        rc, rr = sequence_logps(batch, PairLogps(ref.chosen.detach(), ref.rejected.detach()))
        a, b = ((pc - rc), (pr - rr)) if self.unpaired else ((pc - pr), (rc - rr))
        a_sorted, order = torch.sort(a, dim=0)
        d = a_sorted - torch.sort(b, dim=0)[0]
        eps = self.label_smoothing
        per_rank = -(1 - eps) * F.logsigmoid(self.beta * d) - eps * F.logsigmoid(-self.beta * d)
        loss = torch.zeros_like(per_rank).scatter(0, order, per_rank)  # back to the rows holding each rank
        return PreferenceOut(loss, {"loss/aot": loss.detach().mean(),
                                    **reward_metrics(*implicit_rewards(batch, policy, ref, self.beta))})
