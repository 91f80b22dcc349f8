"""EXO (paired form): Towards Efficient Exact Optimization of Language Model Alignment.

Ji, Lu, Niu, Ke, Wang, Zhu, Tang, Huang (2024), arXiv:2402.00856, Eq. 16 for K = 2 (TRL's ``loss_type="exo_pair"``): the
reverse KL from the policy's distribution over the pair, ``p = softmax(r_w, r_l)`` with ``r = beta * log pi/pi_ref``,
to the label distribution ``(1 - eps, eps)``:

    L = sigmoid(h) * [log sigmoid(h) - log(1 - eps)] + sigmoid(-h) * [log sigmoid(-h) - log eps],   h = r_w - r_l

DPO minimises the forward KL of the same two distributions; EXO's reverse KL is mode-seeking. ``label_smoothing``
is eps and must be > 0 (log eps); default 1e-3 (the value TRL's documentation gives for EXO).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from lmpo.batch import PreferenceBatch
from lmpo.methods.base import PairLogps, PreferenceOut, hp
from lmpo.methods.preference.dpo import implicit_rewards, reward_metrics
from lmpo.registry import PREFERENCE_LOSSES


@PREFERENCE_LOSSES.register("exo_pair", paper="Towards Efficient Exact Optimization of Language Model Alignment",
                            arxiv="2402.00856")
@dataclass(frozen=True)
class EXOPair:
    """Reverse KL between the pair's policy softmax and the smoothed label (1 - eps, eps)."""

    beta: float = hp(0.1, gt=0)
    label_smoothing: float = hp(1e-3, gt=0, lt=0.5)
    needs: ClassVar[frozenset[str]] = frozenset({"ref_logprobs"})

    def __call__(self, batch: PreferenceBatch, policy: PairLogps, ref: PairLogps | None) -> PreferenceOut:
        c, r = implicit_rewards(batch, policy, ref, self.beta)
        h, eps = c - r, self.label_smoothing
        loss = (torch.sigmoid(h) * (F.logsigmoid(h) - math.log1p(-eps))
                + torch.sigmoid(-h) * (F.logsigmoid(-h) - math.log(eps)))
        return PreferenceOut(loss, {"loss/exo": loss.detach().mean(), **reward_metrics(c, r)})
