"""SimPO: Simple Preference Optimization with a Reference-Free Reward.

Meng, Xia, Chen (2024), arXiv:2405.14734, Eq. 6:

    L_SimPO = -log sigmoid( beta/|y_w| * log pi(y_w|x) - beta/|y_l| * log pi(y_l|x) - gamma )

The implicit reward is the length-normalised log-likelihood of the policy itself (Eq. 4): no reference model, and
no bias towards long responses; ``gamma`` is a target reward margin (Eq. 5). Defaults: beta 2.0 and gamma 1.0
(gamma/beta = 0.5), inside the ranges the paper tunes (beta 2.0-2.5 for its base models, gamma/beta 0.3-0.8);
the per-model values differ. What differs from DPO: average instead of summed log-probs, no reference, a margin.
TRL: CPOTrainer ``loss_type="simpo"`` with ``cpo_alpha=0`` (its ``simpo_gamma`` is gamma).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F

from lmpo.batch import PreferenceBatch
from lmpo.methods.base import PairLogps, PreferenceOut, hp
from lmpo.methods.preference.dpo import reward_metrics, sequence_logps
from lmpo.registry import PREFERENCE_LOSSES


@PREFERENCE_LOSSES.register("simpo", paper="SimPO: Simple Preference Optimization with a Reference-Free Reward",
                            arxiv="2405.14734")
@dataclass(frozen=True)
class SimPO:
    """Reference-free: -log sigmoid(beta * (mean log-prob margin) - gamma)."""

    beta: float = hp(2.0, gt=0)
    gamma: float = hp(1.0, ge=0)
    label_smoothing: float = hp(0.0, ge=0, lt=0.5)
    needs: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, batch: PreferenceBatch, policy: PairLogps, ref: PairLogps | None) -> PreferenceOut:
        c, r = sequence_logps(batch, policy, average=True)
        h = self.beta * (c - r) - self.gamma
        eps = self.label_smoothing
        loss = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
        return PreferenceOut(loss, {"loss/simpo": loss.detach().mean(), **reward_metrics(self.beta * c, self.beta * r)})


PRESETS = {
    # SimPO (arXiv:2405.14734): beta 2.0, gamma 1.0 (gamma/beta 0.5); no reference model.
    "simpo": {"preference": {"loss": {"name": "simpo", "beta": 2.0, "gamma": 1.0}}},
}
