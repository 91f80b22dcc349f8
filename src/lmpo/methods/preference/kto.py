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

The reference point ``z_0 = max(0, KL(pi || pi_ref))`` (``reference_point``):

* ``mismatched`` (default; the estimator the paper gives with Eq. 8, and TRL 1.16.0's ``KTOTrainer``): the mean over the
  micro-batch's rows of ``log pi(y'|x) - log pi_ref(y'|x)`` on *mismatched* pairs -- each row's prompt with another
  row's response -- clamped at 0 and detached (no gradient flows through z_0). The preference stage computes these
  log-probs (``needs`` holds ``"mismatched_logprobs"``): the reference's once with the other reference log-probs,
  the policy's by an extra no-grad forward each step, into ``PreferenceBatch.mismatched_logps`` /
  ``mismatched_ref_logps`` (search updates, lmpo.search.train, do the same; online pairs refuse it). Given them,
  the loss equals TRL's (tests/unit/methods/preference/test_trl_parity.py).
  Where the stage differs from TRL: TRL rotates the responses by one *within each batch* (and so needs sequential
  sampling); lmpo rotates them by one over the data file once, before training (so the reference log-probs can be
  cached and the pair stream stays shuffled and exactly resumable): a row's mismatched response comes from its
  neighbour in the file, not necessarily from the same micro-batch.
* ``batch`` (cheaper, no extra forward): the batch mean of the detached implied rewards of the present responses,
  clamped at 0 (the estimator of TRL's former ``kto_pair``); a reconstruction, not the paper's estimator.

Either way z_0 is a statistic of the batch, so a row's loss depends on the rest of its micro-batch
(``batch_statistic``).
Defaults: beta 0.1, lambda_D = lambda_U = 1 (the paper's for balanced data).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lmpo.batch import PreferenceBatch
from lmpo.errors import ConfigError
from lmpo.methods.base import PairLogps, PreferenceOut, hp
from lmpo.methods.preference.dpo import implicit_rewards
from lmpo.registry import PREFERENCE_LOSSES


@PREFERENCE_LOSSES.register("kto", paper="KTO: Model Alignment as Prospect Theoretic Optimization",
                            arxiv="2402.01306", fidelity="exact")
@dataclass(frozen=True)
class KTO:
    """Prospect-theoretic value of each desirable / undesirable response against a batch reference point."""

    beta: float = hp(0.1, gt=0)
    desirable_weight: float = hp(1.0, ge=0)
    undesirable_weight: float = hp(1.0, ge=0)
    reference_point: str = hp("mismatched", choices=("mismatched", "batch"))
    unpaired: ClassVar[bool] = True  # rows may hold one side only
    batch_statistic: ClassVar[bool] = True  # z_0 is a statistic of the micro-batch

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({"ref_logprobs"} | ({"mismatched_logprobs"} if self.reference_point == "mismatched" else set()))

    def reference(self, batch: PreferenceBatch, c: torch.Tensor, r: torch.Tensor, has_c, has_r) -> torch.Tensor:
        """z_0 (detached, clamped at 0): from the mismatched pairs' log-ratios, or from the batch's implied rewards."""
        if self.reference_point == "batch":
            present = torch.cat([c[has_c], r[has_r]]).detach()
            return present.mean().clamp_min(0) if present.numel() else c.new_zeros(())
        if batch.mismatched_logps is None or batch.mismatched_ref_logps is None:
            raise ConfigError('preference.loss "kto" with reference_point=mismatched needs the log-probs of '
                              "mismatched (prompt, response) pairs, which only the offline preference stage computes "
                              "(PreferenceBatch.mismatched_logps / mismatched_ref_logps); elsewhere set "
                              "preference.loss.reference_point=batch.")
        kl = (batch.mismatched_logps - batch.mismatched_ref_logps).detach().to(c.dtype)
        return kl.mean().clamp_min(0)

    def __call__(self, batch: PreferenceBatch, policy: PairLogps, ref: PairLogps | None) -> PreferenceOut:
        c, r = implicit_rewards(batch, policy, ref, 1.0)
        has_c, has_r = batch.chosen_mask.any(-1), batch.rejected_mask.any(-1)
        z0 = self.reference(batch, c, r, has_c, has_r)
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
    # KTO (arXiv:2402.01306): beta 0.1, lambda_D = lambda_U = 1, z_0 from mismatched pairs (the paper's estimator).
    "kto": {"preference": {"loss": {"name": "kto", "beta": 0.1}}},
}
