"""DHPO: Dynamic Hybrid Policy Optimization (token and sequence importance ratios mixed in one clipped surrogate).

Paper: Min, Liu, Wang, Zhang, Zeng, Zhang, Su 2026, "Orchestrating Tokens and Sequences: Dynamic Hybrid Policy
Optimization for RLVR", arXiv:2601.05607 (Findings of ACL 2026). Reconstructed: the mixing formula is described in
words in what we could read (abstract and summaries); equation numbers are not available to us.
With r_t = pi(o_t)/pi_old(o_t) (GRPO) and s_i = exp((1/|o_i|) sum_t log r_t) (GSPO, arXiv:2507.18071 Eq. 7, in its
GSPO-token form sg[s_i] * pi(o_t)/sg[pi(o_t)] so the same code serves both), each branch is clipped in its own
trust region before mixing ("branch-specific clipping"):
    r~_t = clip(r_t, 1 - eps_tok, 1 + eps_tok_high),   s~_i = clip(s_i, 1 - eps_seq, 1 + eps_seq_high)
    rho_t = M(r_t, s_i; w_t),   rho~_t = M(r~_t, s~_i; w_t),   l_t = -min(rho_t A_t, rho~_t A_t)
with M geometric, r^w s^(1-w) (the summaries' "geometric aggregation"; default), or arithmetic, w r + (1-w) s.
Mixing weight: "average" uses a constant w (0.5); "entropy" uses w_t = sg(H_t / max_{t'} H_t') per response, more
token-level weight at high-entropy "forking" tokens, from the trainer's entropy of the policy being optimised
(``extras["current_entropy"]``, served by the training forward pass). w = 1 is exactly GRPO's ``ppo_clip``, w = 0
exactly ``gspo``. Differs from GRPO: the ratio interpolates between token and sequence level.
Gaps filled: the paper's clip ranges are not known to us; defaults are GRPO's 0.2 for the token branch and GSPO's
3e-4 / 4e-4 for the sequence branch; the entropy normalisation (per-response max) follows the method card.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.errors import DataError
from lmpo.methods.base import LossOut
from lmpo.methods.params import hp
from lmpo.registry import LOSSES


def _mix(a: Tensor, b: Tensor, w: Tensor | float, combine: str) -> Tensor:
    if isinstance(w, float) and w in (0.0, 1.0):  # the endpoints are the pure branches, bit for bit
        return a if w == 1.0 else b
    return a.pow(w) * b.pow(1.0 - w) if combine == "geometric" else w * a + (1.0 - w) * b


@LOSSES.register("dhpo", paper="Orchestrating Tokens and Sequences: Dynamic Hybrid Policy Optimization for RLVR",
                 arxiv="2601.05607", fidelity="reconstructed")
@dataclass(frozen=True)
class DHPOLoss:
    """Clipped surrogate on a token/sequence hybrid ratio with branch-specific clipping; arXiv:2601.05607.

    Args:
        epsilon / epsilon_high: token-branch clip range (``None`` high = symmetric).
        seq_epsilon / seq_epsilon_high: sequence-branch clip range.
        mixing: ``average`` (constant ``weight``) or ``entropy`` (normalised token entropy).
        weight: token-branch weight w in [0, 1] for ``average``.
        combine: ``geometric`` (r^w s^(1-w)) or ``arithmetic`` (w r + (1-w) s).
    """

    epsilon: float = hp(0.2, ge=0, lt=1)
    epsilon_high: float | None = hp(None, ge=0)
    seq_epsilon: float = hp(3e-4, ge=0, lt=1)
    seq_epsilon_high: float = hp(4e-4, ge=0)
    mixing: str = hp("average", choices=("average", "entropy"))
    weight: float = hp(0.5, ge=0, le=1)
    combine: str = hp("geometric", choices=("geometric", "arithmetic"))
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs", "current_entropy"})

    def token_weight(self, batch: RolloutBatch) -> Tensor | float:
        if self.mixing == "average":
            return float(self.weight)
        ent = batch.extras.get("current_entropy")
        if ent is None:
            raise DataError("loss.mixing='entropy' needs RolloutBatch.extras['current_entropy'] (token entropies).")
        ent = ops.zero_outside(ent.detach().clamp_min(0.0), batch.response_mask)
        return ent / ent.amax(-1, keepdim=True).clamp_min(1e-12)

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask, adv = batch.response_mask, batch.advantages
        eps_high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        r = ops.token_ratio(logprobs, batch.old_logprobs)
        seq_log_ratio = ops.sequence_log_ratio(logprobs, batch.old_logprobs, mask)  # (B,)
        s = (seq_log_ratio.detach()[:, None] + logprobs - logprobs.detach()).exp()  # value s_i, GSPO-token gradient
        w = self.token_weight(batch)
        raw = _mix(r, s, w, self.combine)
        clip = _mix(r.clamp(1.0 - self.epsilon, 1.0 + eps_high),
                    s.clamp(1.0 - self.seq_epsilon, 1.0 + self.seq_epsilon_high), w, self.combine)
        unclipped, clipped = -adv * raw, -adv * clip
        loss = torch.maximum(unclipped, clipped)
        metrics = {
            "loss/clip_frac": ops.masked_mean((clipped > unclipped).float(), mask).detach(),
            "loss/ratio_mean": ops.masked_mean(raw, mask).detach(),
            "loss/token_weight_mean": ops.masked_mean(torch.as_tensor(w, dtype=r.dtype).expand_as(r), mask).detach(),
        }
        return LossOut(ops.zero_outside(loss, mask), metrics)


PRESETS = {
    # DHPO (arXiv:2601.05607): GRPO advantages, averaged geometric mixing (w = 0.5), token clip 0.2, sequence clip
    # 3e-4 / 4e-4 (GRPO's and GSPO's published ranges; DHPO's own not recovered), seq-mean-token-mean, no KL.
    "dhpo": {
        "advantage": {"name": "grpo"},
        "loss": {"name": "dhpo", "mixing": "average", "weight": 0.5, "combine": "geometric"},
        "aggregator": {"name": "seq_mean_token_mean"},
        "kl": {"beta": 0.0},
    },
}
