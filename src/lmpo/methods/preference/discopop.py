"""DiscoPOP: Discovering Preference Optimization Algorithms with and for Large Language Models.

Lu, Holt, Fanconi, Chan, Foerster, van der Schaar, Lange (2024), arXiv:2406.08414, Eq. 5 (the discovered
"log-ratio modulated loss"): with ``l = beta * h`` (DPO's scaled log-ratio margin) and ``m = sigmoid(l / tau)``,

    L = (1 - m) * ( -log sigmoid(l) ) + m * exp(-l)

a blend of DPO's logistic loss and an exponential loss, weighted by the margin itself. Defaults beta 0.05 and
tau 0.05 (the paper's). TRL: ``loss_type="discopop"`` (``discopop_tau``). ``m * exp(-l)`` is computed as
``exp(log sigmoid(l / tau) - l)`` so a very negative margin gives 0, not 0 x inf.

Property (tested): the loss is not monotone near 0. At the start of training the policy is the reference, every
margin is 0, and there ``dL/dl = (1 - ln 2) / (4 tau) - 3/4``, positive for tau < (1 - ln 2) / 3 ~ 0.10: with the
paper's tau the first steps push the margins *down*. On lmpo's tiny copy-task pairs this runs away (the model
learns the reversed preference), so no preset is shipped; the loss matches TRL's number for number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from lmpo.batch import PreferenceBatch
from lmpo.methods.base import PairLogps, PreferenceOut, hp
from lmpo.methods.preference.dpo import implicit_rewards, reward_metrics
from lmpo.registry import PREFERENCE_LOSSES


@PREFERENCE_LOSSES.register("discopop", paper="Discovering Preference Optimization Algorithms with and for Large "
                            "Language Models", arxiv="2406.08414")
@dataclass(frozen=True)
class DiscoPOP:
    """Logistic and exponential losses of the margin, mixed by sigmoid(margin / tau)."""

    beta: float = hp(0.05, gt=0)
    tau: float = hp(0.05, gt=0)
    needs: ClassVar[frozenset[str]] = frozenset({"ref_logprobs"})

    def __call__(self, batch: PreferenceBatch, policy: PairLogps, ref: PairLogps | None) -> PreferenceOut:
        chosen, rejected = implicit_rewards(batch, policy, ref, self.beta)
        logits = chosen - rejected
        m = torch.sigmoid(logits / self.tau)
        loss = (1 - m) * -F.logsigmoid(logits) + torch.exp(F.logsigmoid(logits / self.tau) - logits)
        return PreferenceOut(loss, {"loss/discopop": loss.detach().mean(), **reward_metrics(chosen, rejected)})

