"""Hinge (SLiC) preference loss: SLiC-HF: Sequence Likelihood Calibration with Human Feedback.

Zhao, Joshi, Liu, Khalman, Saleh, Liu (2023), arXiv:2305.10425, Eq. 1 (the calibration loss):
``max(0, delta - log pi(y_w|x) + log pi(y_l|x))``. As in DPO (arXiv:2305.18290) and TRL's ``loss_type="hinge"``,
the log-probs are taken relative to the reference and the margin is written ``1 / beta``:

    L = max(0, 1 - beta * h),   h = log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l)   (sums over tokens)

SLiC-HF's own form (no reference, margin delta) is ``reference_free: true`` with ``beta = 1 / delta``; its
regularisation term (cross-entropy on reference outputs) is not part of this loss (add it with ``dpo_nll``-style
terms if wanted). What differs from DPO: a hinge instead of the log-sigmoid, so pairs past the margin stop pulling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmpo.batch import PreferenceBatch
from lmpo.methods.base import PairLogps, PreferenceOut, hp
from lmpo.methods.preference.dpo import reward_metrics, sequence_logps
from lmpo.registry import PREFERENCE_LOSSES


@PREFERENCE_LOSSES.register("hinge", paper="SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
                            arxiv="2305.10425")
@dataclass(frozen=True)
class Hinge:
    """max(0, 1 - beta * log-ratio margin) (SLiC's calibration hinge; reference-free optional)."""

    beta: float = hp(0.1, gt=0)
    reference_free: bool = False

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset() if self.reference_free else frozenset({"ref_logprobs"})

    def __call__(self, batch: PreferenceBatch, policy: PairLogps, ref: PairLogps | None) -> PreferenceOut:
        c, r = sequence_logps(batch, policy)
        if not self.reference_free:
            rc, rr = sequence_logps(batch, PairLogps(ref.chosen.detach(), ref.rejected.detach()))
            c, r = c - rc, r - rr
        loss = torch.relu(1 - self.beta * (c - r))
        return PreferenceOut(loss, {"loss/hinge": loss.detach().mean(), **reward_metrics(self.beta * c, self.beta * r)})
