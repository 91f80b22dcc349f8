"""CPO: Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in Machine Translation.

Xu, Sharaf, Chen, Tan, Shen, Van Durme, Murray, Kim (2024), arXiv:2401.08417, Eqs. 3-4:

    L_CPO = -log sigmoid( beta * (log pi(y_w|x) - log pi(y_l|x)) ) + alpha * NLL(y_w)

DPO's loss with a uniform reference (so no reference model; Eq. 3, summed log-probs) plus a behaviour-cloning NLL
term on the preferred response (Eq. 4; its token mean). ``label_smoothing`` gives TRL's conservative variant.
Defaults beta 0.1, alpha 1.0 (the paper's L_prefer + L_NLL; TRL's CPOConfig). TRL: CPOTrainer
``loss_type="sigmoid"``; its NLL is a token mean over the batch, lmpo's a mean per pair (equal for equal lengths).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F

from lmpo.batch import PreferenceBatch
from lmpo.methods.base import PairLogps, PreferenceOut, hp
from lmpo.methods.preference.dpo import chosen_nll, reward_metrics, sequence_logps
from lmpo.registry import PREFERENCE_LOSSES


@PREFERENCE_LOSSES.register("cpo", paper="Contrastive Preference Optimization: Pushing the Boundaries of LLM "
                            "Performance in Machine Translation", arxiv="2401.08417")
@dataclass(frozen=True)
class CPO:
    """Reference-free DPO on summed log-probs plus alpha x the chosen response's NLL."""

    beta: float = hp(0.1, gt=0)
    alpha: float = hp(1.0, ge=0)
    label_smoothing: float = hp(0.0, ge=0, lt=0.5)
    needs: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, batch: PreferenceBatch, policy: PairLogps, ref: PairLogps | None) -> PreferenceOut:
        c, r = sequence_logps(batch, policy)
        h = self.beta * (c - r)
        pref = -(1 - self.label_smoothing) * F.logsigmoid(h) - self.label_smoothing * F.logsigmoid(-h)
        nll = chosen_nll(batch, policy)
        loss = pref + self.alpha * nll
        return PreferenceOut(loss, {"loss/cpo": pref.detach().mean(), "loss/nll": nll.detach().mean(),
                                    **reward_metrics(self.beta * c, self.beta * r)})


PRESETS = {
    # CPO (arXiv:2401.08417): beta 0.1, NLL weight 1.
    "cpo": {"preference": {"loss": {"name": "cpo", "beta": 0.1, "alpha": 1.0}}},
}
