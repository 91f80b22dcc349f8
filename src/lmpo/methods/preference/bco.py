"""BCO (paired form): Binary Classifier Optimization for Large Language Model Alignment.

Jung, Han, Nam, On (2024), arXiv:2404.04656, Sec. 3 (the BCO loss), on a pair: the implicit reward
``r = beta * log pi(y|x)/pi_ref(y|x)`` is a binary classifier's logit, chosen responses labelled 1, rejected 0:

    L = -log sigmoid(r_w - delta) - log sigmoid(-(r_l - delta))

The paper's delta is a running mean of the rewards (its "reward shift"); TRL's paired ``loss_type="bco_pair"``
uses delta = 0, as this component does by default (``delta`` is a fixed hyper-parameter here: a running statistic
would couple micro-batches). Fidelity: reconstructed (fixed instead of running delta).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F

from lmpo.batch import PreferenceBatch
from lmpo.methods.base import PairLogps, PreferenceOut, hp
from lmpo.methods.preference.dpo import implicit_rewards, reward_metrics
from lmpo.registry import PREFERENCE_LOSSES


def bco_pair_loss(chosen, rejected, delta: float = 0.0):
    """-log sigmoid(r_w - delta) - log sigmoid(delta - r_l) per pair."""
    return -F.logsigmoid(chosen - delta) - F.logsigmoid(-(rejected - delta))


@PREFERENCE_LOSSES.register("bco_pair", paper="Binary Classifier Optimization for Large Language Model Alignment",
                            arxiv="2404.04656", fidelity="reconstructed")
@dataclass(frozen=True)
class BCOPair:
    """Chosen and rejected as the two classes of a logistic classifier on the implicit reward."""

    beta: float = hp(0.1, gt=0)
    delta: float = 0.0
    needs: ClassVar[frozenset[str]] = frozenset({"ref_logprobs"})

    def __call__(self, batch: PreferenceBatch, policy: PairLogps, ref: PairLogps | None) -> PreferenceOut:
        chosen, rejected = implicit_rewards(batch, policy, ref, self.beta)
        loss = bco_pair_loss(chosen, rejected, self.delta)
        return PreferenceOut(loss, {"loss/bco": loss.detach().mean(), **reward_metrics(chosen, rejected)})
