"""APO: Anchored Preference Optimization and Contrastive Revisions.

D'Oosterlinck, Xu, Develder, Demeester, Singh, Potts, Kiela, Mehri (2024), arXiv:2408.06266, Eqs. 7 and 8, on the
log-ratios ``r_w = beta * log pi(y_w)/pi_ref(y_w)``, ``r_l = beta * log pi(y_l)/pi_ref(y_l)`` (sums over tokens):

    APO-zero (Eq. 7):  L = [1 - sigmoid(r_w)] + sigmoid(r_l)            push the chosen up, the rejected down
    APO-down (Eq. 8):  L = sigmoid(r_w) + [1 - sigmoid(r_w - r_l)]      both down, the rejected more

Use zero when the chosen responses are better than the model's own outputs, down when they are worse. Unlike DPO
the loss anchors each response's likelihood, not only the margin. TRL: ``loss_type="apo_zero"`` / ``"apo_down"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lmpo.batch import PreferenceBatch
from lmpo.methods.base import PairLogps, PreferenceOut, hp
from lmpo.methods.preference.dpo import implicit_rewards, reward_metrics
from lmpo.registry import PREFERENCE_LOSSES

_PAPER = "Anchored Preference Optimization and Contrastive Revisions: Addressing Underspecification in Alignment"


@PREFERENCE_LOSSES.register("apo_zero", paper=_PAPER, arxiv="2408.06266")
@dataclass(frozen=True)
class APOZero:
    """APO-zero: raise the chosen likelihood, lower the rejected (each anchored to the reference)."""

    beta: float = hp(0.1, gt=0)
    needs: ClassVar[frozenset[str]] = frozenset({"ref_logprobs"})

    def __call__(self, batch: PreferenceBatch, policy: PairLogps, ref: PairLogps | None) -> PreferenceOut:
        chosen, rejected = implicit_rewards(batch, policy, ref, self.beta)
        loss = (1 - torch.sigmoid(chosen)) + torch.sigmoid(rejected)
        return PreferenceOut(loss, {"loss/apo": loss.detach().mean(), **reward_metrics(chosen, rejected)})


@PREFERENCE_LOSSES.register("apo_down", paper=_PAPER, arxiv="2408.06266")
@dataclass(frozen=True)
class APODown:
    """APO-down: lower both likelihoods, the rejected more."""

    beta: float = hp(0.1, gt=0)
    needs: ClassVar[frozenset[str]] = frozenset({"ref_logprobs"})

    def __call__(self, batch: PreferenceBatch, policy: PairLogps, ref: PairLogps | None) -> PreferenceOut:
        chosen, rejected = implicit_rewards(batch, policy, ref, self.beta)
        loss = torch.sigmoid(chosen) + (1 - torch.sigmoid(chosen - rejected))
        return PreferenceOut(loss, {"loss/apo": loss.detach().mean(), **reward_metrics(chosen, rejected)})


PRESETS = {
    # APO (arXiv:2408.06266): beta 0.1 (its experiments), zero variant (chosen better than the model's outputs).
    "apo_zero": {"preference": {"loss": {"name": "apo_zero", "beta": 0.1}}},
}
