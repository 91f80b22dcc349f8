"""REC / REP / RED: group-relative REINFORCE as an off-policy algorithm, one configurable loss.

Paper: Yao, Chen, Sun, Chen, Zhang, Pan, Li, Ding 2025 (ICLR 2026), "Group-Relative REINFORCE Is Secretly an
Off-Policy Algorithm: Demystifying Some Myths About GRPO and Its Friends", arXiv:2509.24203.

With the group-mean advantage A_i = r_i - mean_j r_j (Sec. 3; no std division), rho_t = sg(pi(y_t)/pi_old(y_t)):
    l_t = -w_t A_t log pi(y_t) 1[in range_t] + reg_t                       (aggregated token-mean)
REC (regularise by clipping) -- the gradient mask 1[in range]:
    none      always;   two_side  1-eps_l <= rho <= 1+eps_h
    one_side  (A >= 0 and rho <= 1+eps_h) or (A <= 0 and rho >= 1-eps_l)          (GRPO's effective mask)
    ring      two_side or (A >= 0 and rho <= 1-eps'_l) or (A <= 0 and rho >= 1+eps'_h)  (keeps updates that move
              back towards the band from far outside)
    gspo_one_side  one_side on the length-normalised sequence ratio exp(mean_t log rho_t)
Weights w: none (1, "NoIS"); importance_sampling (rho, so REC-OneSide-IS has GRPO's gradient); truncated_is
(clip(rho, 1-eps'_l, 1+eps'_h)); gspo_importance_sampling (sequence ratio); advantage (RED-Weight, exp(A/temp)).
REP (regularise by a penalty): forward_kl (AsymRE) reg_t = -c log pi(y_t), i.e. every advantage shifted by +c;
k2 (Kimi's OPMD) reg_t = c (log pi(y_t) - log pi_old(y_t))^2.

Differs from GRPO: no std normalisation, and the ratio is *not* in the surrogate unless asked for -- the paper's point
is that clipping acts as a regulariser, not as importance correction (REC-OneSide-NoIS matches GRPO).

Gaps filled: the loss value uses log pi (as the released code does); its gradient is what matters. RED-Drop (balancing
positive/negative samples by dropping) shapes the advantages, not the loss: ``methods/advantage/red_drop.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.base import LossOut
from lmpo.methods.params import hp
from lmpo.registry import LOSSES

CLIP_MODES = ("none", "one_side", "two_side", "ring", "gspo_one_side")
WEIGHTS = ("none", "importance_sampling", "truncated_is", "gspo_importance_sampling", "advantage")
REGULARIZERS = ("none", "forward_kl", "k2")


@LOSSES.register("rec", paper="Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm (REC/REP/RED)",
                 arxiv="2509.24203")
@dataclass(frozen=True)
class RECLoss:
    """l_t = -w_t A_t log pi(y_t) 1[in range] + reg_t (arXiv:2509.24203; see the module docstring).

    Args:
        clip_mode: one of CLIP_MODES. weight: one of WEIGHTS. regularizer: one of REGULARIZERS.
        epsilon / epsilon_high: the band [1 - eps_l, 1 + eps_h] (``epsilon_high=None`` means = epsilon).
        epsilon_low_prime / epsilon_high_prime: the ring's outer thresholds and the truncated-IS bounds.
        regularizer_coef: c of the REP penalty. temp: RED-Weight temperature.
    """

    clip_mode: str = hp("one_side", choices=CLIP_MODES)
    weight: str = hp("none", choices=WEIGHTS)
    regularizer: str = hp("none", choices=REGULARIZERS)
    epsilon: float = hp(0.2, gt=0, le=1)
    epsilon_high: float | None = hp(None, gt=0)
    epsilon_low_prime: float = hp(0.6, gt=0, le=1)
    epsilon_high_prime: float = hp(2.0, gt=0)
    regularizer_coef: float = hp(0.0, ge=0)
    temp: float = hp(1.0, gt=0)
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs"})

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask, adv = batch.response_mask, batch.advantages
        el = self.epsilon
        eh = self.epsilon if self.epsilon_high is None else self.epsilon_high
        log_rho = ops.log_ratio(logprobs, batch.old_logprobs).detach()
        rho = log_rho.exp()
        seq_rho = ops.masked_mean(log_rho, mask, dim=-1).exp()[:, None].expand_as(rho)
        pos, neg = adv >= 0, adv <= 0
        band = (rho >= 1 - el) & (rho <= 1 + eh)
        if self.clip_mode == "none":
            keep = torch.ones_like(mask)
        elif self.clip_mode == "two_side":
            keep = band
        elif self.clip_mode == "one_side":
            keep = (pos & (rho <= 1 + eh)) | (neg & (rho >= 1 - el))
        elif self.clip_mode == "ring":
            keep = band | (pos & (rho <= 1 - self.epsilon_low_prime)) | (neg & (rho >= 1 + self.epsilon_high_prime))
        else:  # gspo_one_side
            keep = (pos & (seq_rho <= 1 + eh)) | (neg & (seq_rho >= 1 - el))
        if self.weight == "none":
            w = torch.ones_like(rho)
        elif self.weight == "importance_sampling":
            w = rho
        elif self.weight == "truncated_is":
            w = rho.clamp(1 - self.epsilon_low_prime, 1 + self.epsilon_high_prime)
        elif self.weight == "gspo_importance_sampling":
            w = seq_rho
        else:  # advantage (RED-Weight)
            w = torch.exp(adv.detach() / self.temp)
        lp = ops.zero_outside(logprobs, mask)
        loss = -(w * adv * keep) * lp
        if self.regularizer == "forward_kl":
            loss = loss - self.regularizer_coef * lp
        elif self.regularizer == "k2":
            d = ops.zero_outside(logprobs - batch.old_logprobs.detach(), mask)
            loss = loss + self.regularizer_coef * d * d
        metrics = {
            "loss/clip_frac": ops.masked_mean((~keep).float(), mask).detach(),
            "loss/ratio_mean": ops.masked_mean(rho, mask).detach(),
        }
        return LossOut(ops.zero_outside(loss, mask), metrics)


def _preset(**loss) -> dict:
    return {
        "advantage": {"name": "grpo", "scale_by_std": False},
        "loss": {"name": "rec", **loss},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.0},
    }


# arXiv:2509.24203 defaults: eps_l = eps_h = 0.2, ring eps'_l = 0.6, eps'_h = 2.0, REP coefficients 0.1, temp 1.
PRESETS = {
    "rec": _preset(clip_mode="one_side", weight="none"),  # REC-OneSide-NoIS
    "rec_ring": _preset(clip_mode="ring", weight="none"),  # REC-Ring-NoIS
    "rec_twoside_is": _preset(clip_mode="two_side", weight="importance_sampling"),  # REC-TwoSide-IS
    "rep_asymre": _preset(clip_mode="none", regularizer="forward_kl", regularizer_coef=0.1),  # REP-AsymRE
    "rep_opmd": _preset(clip_mode="none", regularizer="k2", regularizer_coef=0.1),  # REP-OPMD (Kimi)
    "red_weight": _preset(clip_mode="one_side", weight="advantage", temp=1.0),  # RED-Weight
}
