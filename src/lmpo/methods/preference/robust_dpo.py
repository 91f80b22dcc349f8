"""Robust DPO: Provably Robust DPO: Aligning Language Models with Noisy Feedback.

Chowdhury, Kini, Natarajan (2024), arXiv:2403.00409, Sec. 3 (the de-biased loss under label flips of rate eps):

    L = [ (1 - eps) * l(h) - eps * l(-h) ] / (1 - 2 eps),   l(h) = -log sigmoid(beta * h)

with ``h`` DPO's log-ratio margin. Its expectation under preferences flipped with probability eps equals the clean
DPO loss. ``label_smoothing`` is eps (TRL's name; ``loss_type="robust"``). Compare conservative DPO (``dpo`` with
``label_smoothing``), which *adds* the flipped term and so shrinks the target instead of de-biasing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F

from lmpo.batch import PreferenceBatch
from lmpo.methods.base import PairLogps, PreferenceOut, hp
from lmpo.methods.preference.dpo import implicit_rewards, reward_metrics
from lmpo.registry import PREFERENCE_LOSSES


@PREFERENCE_LOSSES.register("robust_dpo", paper="Provably Robust DPO: Aligning Language Models with Noisy Feedback",
                            arxiv="2403.00409")
@dataclass(frozen=True)
class RobustDPO:
    """rDPO: DPO de-biased for a known label-flip rate (label_smoothing = eps < 0.5)."""

    beta: float = hp(0.1, gt=0)
    label_smoothing: float = hp(0.1, ge=0, lt=0.5)
    needs: ClassVar[frozenset[str]] = frozenset({"ref_logprobs"})

    def __call__(self, batch: PreferenceBatch, policy: PairLogps, ref: PairLogps | None) -> PreferenceOut:
        chosen, rejected = implicit_rewards(batch, policy, ref, self.beta)
        h, eps = chosen - rejected, self.label_smoothing
        loss = (-(1 - eps) * F.logsigmoid(h) + eps * F.logsigmoid(-h)) / (1 - 2 * eps)
        return PreferenceOut(loss, {"loss/robust_dpo": loss.detach().mean(), **reward_metrics(chosen, rejected)})


PRESETS = {
    # rDPO (arXiv:2403.00409): beta 0.1 and an assumed flip rate of 0.1 (the paper's experiments inject 10-40 %).
    "robust_dpo": {"preference": {"loss": {"name": "robust_dpo", "beta": 0.1, "label_smoothing": 0.1}}},
    # conservative DPO (Mitchell 2023, as TRL's label_smoothing on the sigmoid loss): eps 0.1.
    "cdpo": {"preference": {"loss": {"name": "dpo", "beta": 0.1, "label_smoothing": 0.1}}},
}
