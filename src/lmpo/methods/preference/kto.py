"""KTO: Model Alignment as Prospect Theoretic Optimization.

Ethayarajh, Xu, Muennighoff, Jurafsky, Kiela (2024), arXiv:2402.01306, Eq. 8: with the implied reward
``r(x, y) = log pi(y|x)/pi_ref(y|x)`` (a sum over tokens) and a reference point ``z_0``,

    v(x, y) = lambda_D * sigmoid(beta (r - z_0))   if y is desirable
              lambda_U * sigmoid(beta (z_0 - r))   if y is undesirable
    L_KTO = E[ lambda_y - v(x, y) ]

KTO learns from *unpaired* binary feedback. lmpo represents it in the pair batch: a row's chosen side is a desirable
completion, its rejected side an undesirable one, and a side whose mask is all False is absent (a row may hold one
or both; the pair loader turns TRL's unpaired format ``prompt, completion, label`` into such rows, docs/preference.md).
The per-row loss is the sum over its present sides.

Reconstructed: the paper estimates ``z_0 = max(0, KL(pi || pi_ref))`` from mismatched pairs (x_i, y_j) of the
micro-batch, which costs an extra forward; lmpo uses the batch mean of the detached implied rewards of the present
responses, clamped at 0 (the estimator of TRL's former ``kto_pair``). Like the paper's, this reference point is a
statistic of the batch, so the loss of a row depends on the rest of its micro-batch (``batch_statistic``).
Defaults: beta 0.1, lambda_D = lambda_U = 1 (the paper's for balanced data).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lmpo.batch import PreferenceBatch
from lmpo.methods.base import PairLogps, PreferenceOut, hp
from lmpo.methods.preference.dpo import implicit_rewards
from lmpo.registry import PREFERENCE_LOSSES


@PREFERENCE_LOSSES.register("kto", paper="KTO: Model Alignment as Prospect Theoretic Optimization",
                            arxiv="2402.01306", fidelity="reconstructed")
@dataclass(frozen=True)
class KTO:
    """Prospect-theoretic value of each desirable / undesirable response against a batch reference point."""

    beta: float = hp(0.1, gt=0)
    desirable_weight: float = hp(1.0, ge=0)
    undesirable_weight: float = hp(1.0, ge=0)
    needs: ClassVar[frozenset[str]] = frozenset({"ref_logprobs"})
    unpaired: ClassVar[bool] = True  # rows may hold one side only
    batch_statistic: ClassVar[bool] = True  # z_0 is a statistic of the micro-batch

    def __call__(self, batch: PreferenceBatch, policy: PairLogps, ref: PairLogps | None) -> PreferenceOut:
        c, r = implicit_rewards(batch, policy, ref, 1.0)
        has_c, has_r = batch.chosen_mask.any(-1), batch.rejected_mask.any(-1)
        present = torch.cat([c[has_c], r[has_r]]).detach()
        z0 = present.mean().clamp_min(0) if present.numel() else c.new_zeros(())
        lc = self.desirable_weight * (1 - torch.sigmoid(self.beta * (c - z0)))
        lr = self.undesirable_weight * (1 - torch.sigmoid(self.beta * (z0 - r)))
        loss = torch.where(has_c, lc, 0.0) + torch.where(has_r, lr, 0.0)
        cd, rd = self.beta * c.detach(), self.beta * r.detach()
        metrics = {"loss/kto": loss.detach().mean(), "loss/kl": z0,
                   "rewards/chosen": cd[has_c].mean() if has_c.any() else cd.new_zeros(()),
                   "rewards/rejected": rd[has_r].mean() if has_r.any() else rd.new_zeros(())}
        both = has_c & has_r
        if both.any():
            metrics["rewards/margins"] = (cd - rd)[both].mean()
            metrics["rewards/accuracies"] = (cd > rd)[both].float().mean()
        return PreferenceOut(loss, metrics)


PRESETS = {
    # KTO (arXiv:2402.01306): beta 0.1, lambda_D = lambda_U = 1.
    "kto": {"preference": {"loss": {"name": "kto", "beta": 0.1}}},
}
