"""NCA (paired form): Noise Contrastive Alignment of Language Models with Explicit Rewards.

Chen, He, Yuan, Cui, Su, Zhu (2024), arXiv:2402.05369, the NCA loss for K = 2 responses with a binary preference
(TRL's ``loss_type="nca_pair"``), on ``r = beta * log pi(y|x)/pi_ref(y|x)``:

    L = -log sigmoid(r_w) - 1/2 log sigmoid(-r_w) - 1/2 log sigmoid(-r_l)

Each response's own (absolute) likelihood ratio is optimised instead of only the margin, so unlike DPO the chosen
likelihood is not pushed down with the rejected one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F

from lmpo.batch import PreferenceBatch
from lmpo.methods.base import PairLogps, PreferenceOut, hp
from lmpo.methods.preference.dpo import implicit_rewards, reward_metrics
from lmpo.registry import PREFERENCE_LOSSES


@PREFERENCE_LOSSES.register("nca_pair", paper="Noise Contrastive Alignment of Language Models with Explicit Rewards",
                            arxiv="2402.05369")
@dataclass(frozen=True)
class NCAPair:
    """NCA on a pair: -log s(r_w) - (log s(-r_w) + log s(-r_l)) / 2."""

    beta: float = hp(0.1, gt=0)
    needs: ClassVar[frozenset[str]] = frozenset({"ref_logprobs"})

    def __call__(self, batch: PreferenceBatch, policy: PairLogps, ref: PairLogps | None) -> PreferenceOut:
        c, r = implicit_rewards(batch, policy, ref, self.beta)
        loss = -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)
        return PreferenceOut(loss, {"loss/nca": loss.detach().mean(), **reward_metrics(c, r)})
