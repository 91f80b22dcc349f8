"""SPPO (hard-label form): Self-Play Preference Optimization for Language Model Alignment.

Wu, Sun, Yuan, Ji, Yang, Gu (2024), arXiv:2405.00675, Eq. 4.7 with the win probability set to 1 for the chosen and
0 for the rejected response (TRL's ``loss_type="sppo_hard"``; the paper estimates it with a preference model):

    L = ( log pi(y_w)/pi_ref(y_w) - 1/(2 beta) )^2 + ( log pi(y_l)/pi_ref(y_l) + 1/(2 beta) )^2

(eta = 1/beta in the paper's notation: each log-ratio regresses onto eta * (P - 1/2)). Sums over tokens. The
self-play iteration (sample from the current policy, rank, update, repeat) is the online side's loop; this is the
per-pair loss. Fidelity: reconstructed (hard labels instead of the preference model's probabilities).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lmpo.batch import PreferenceBatch
from lmpo.methods.base import PairLogps, PreferenceOut, hp
from lmpo.methods.preference.dpo import implicit_rewards, reward_metrics
from lmpo.registry import PREFERENCE_LOSSES


@PREFERENCE_LOSSES.register("sppo_hard", paper="Self-Play Preference Optimization for Language Model Alignment",
                            arxiv="2405.00675", fidelity="reconstructed")
@dataclass(frozen=True)
class SPPOHard:
    """Square losses pulling the chosen log-ratio to +1/(2 beta) and the rejected to -1/(2 beta)."""

    beta: float = hp(0.1, gt=0)
    needs: ClassVar[frozenset[str]] = frozenset({"ref_logprobs"})

    def __call__(self, batch: PreferenceBatch, policy: PairLogps, ref: PairLogps | None) -> PreferenceOut:
        c, r = implicit_rewards(batch, policy, ref, 1.0)
        loss = (c - 0.5 / self.beta) ** 2 + (r + 0.5 / self.beta) ** 2
        return PreferenceOut(loss, {"loss/sppo": loss.detach().mean(),
                                    **reward_metrics(self.beta * c, self.beta * r)})
