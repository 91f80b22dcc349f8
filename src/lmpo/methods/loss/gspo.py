"""GSPO: Group Sequence Policy Optimization (sequence-level importance ratio).

Paper: Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv:2507.18071.
Eq. 7: s_i = (pi(y_i|x) / pi_old(y_i|x))^(1/|y_i|) = exp((1/|y_i|) sum_t log r_{i,t}).
Eq. 5: J = E[(1/G) sum_i min(s_i A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i)].
Eq. 13 (GSPO-token): s_{i,t} = sg[s_i] * pi(y_t)/sg[pi(y_t)], which has the value of s_i and, with a constant
advantage per sequence, the same gradient as GSPO; it also admits token-level advantages. We implement this form,
so per-token losses are constant within a sequence and the ``seq_mean_token_mean`` aggregator recovers Eq. 5.
Differs from GRPO: clipping acts on whole responses, not tokens. Paper defaults eps_low = 3e-4, eps_high = 4e-4.
Metric ``loss/clip_frac`` is the fraction of trained *tokens* whose (sequence) ratio is clipped, as verl's GSPO and
lmpo's other losses count it (issue 21: it used to count sequences, which is not comparable across libraries; a long
clipped response now weighs by its length).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.base import LossOut
from lmpo.methods.loss.ppo_clip import clipped_surrogate
from lmpo.registry import LOSSES


@LOSSES.register("gspo", paper="Group Sequence Policy Optimization", arxiv="2507.18071")
@dataclass(frozen=True)
class GSPOLoss:
    """Sequence-ratio clipped surrogate, GSPO-token form (arXiv:2507.18071 Eqs. 5, 7, 13)."""

    epsilon: float = 3e-4
    epsilon_high: float = 4e-4
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs"})

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask = batch.response_mask
        seq_log_ratio = ops.sequence_log_ratio(logprobs, batch.old_logprobs, mask)  # (B,)
        # s_{i,t} = sg[s_i] * exp(logp_t - sg[logp_t]): value s_i, gradient s_i * d logp_t.
        ratio = (seq_log_ratio.detach()[:, None] + logprobs - logprobs.detach()).exp()
        loss, clipped = clipped_surrogate(ratio, batch.advantages, self.epsilon, self.epsilon_high, None)
        rows = mask.any(-1)  # rows with no trained token are not sequences
        metrics = {
            "loss/clip_frac": ops.masked_mean(clipped.float(), mask).detach(),  # token fraction, like the peers
            "loss/ratio_mean": ops.masked_mean(seq_log_ratio.exp(), rows).detach(),
        }
        return LossOut(ops.zero_outside(loss, mask), metrics)
