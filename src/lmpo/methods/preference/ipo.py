"""IPO: A General Theoretical Paradigm to Understand Learning from Human Preferences.

Azar, Rowland, Piot, Guo, Calandriello, Valko, Munos (2023), arXiv:2310.12036, Eq. 17 (the empirical IPO loss):

    L_IPO = ( h - 1 / (2 tau) )^2,   h = log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x)

a squared loss that regresses the log-ratio margin onto a finite target instead of pushing it to infinity as DPO's
sigmoid does (so IPO does not overfit deterministic preferences). ``beta`` is the paper's tau. With
``length_normalize`` (the default, as TRL's ``loss_type="ipo"``, which its authors confirmed is the form behind the
paper's results) each log-ratio is averaged over its response's tokens instead of summed; the paper's equation
itself is on sequence log-probs (``length_normalize: false``). What differs from DPO: the loss shape only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lmpo.batch import PreferenceBatch
from lmpo.methods.base import PairLogps, PreferenceOut, hp
from lmpo.methods.preference.dpo import implicit_rewards, reward_metrics, sequence_logps
from lmpo.registry import PREFERENCE_LOSSES


@PREFERENCE_LOSSES.register("ipo", paper="A General Theoretical Paradigm to Understand Learning from Human "
                            "Preferences", arxiv="2310.12036")
@dataclass(frozen=True)
class IPO:
    """IPO: the squared distance of the (token-averaged) log-ratio margin to 1 / (2 beta)."""

    beta: float = hp(0.1, gt=0)
    length_normalize: bool = True
    needs: ClassVar[frozenset[str]] = frozenset({"ref_logprobs"})

    def __call__(self, batch: PreferenceBatch, policy: PairLogps, ref: PairLogps | None) -> PreferenceOut:
        pc, pr = sequence_logps(batch, policy, self.length_normalize)
        rc, rr = sequence_logps(batch, PairLogps(ref.chosen.detach(), ref.rejected.detach()), self.length_normalize)
        h = (pc - rc) - (pr - rr)
        loss = (h - 1 / (2 * self.beta)) ** 2
        # the logged implicit rewards are beta x the summed log-ratios, as DPO's (and TRL's for every loss type)
        return PreferenceOut(loss, {"loss/ipo": loss.detach().mean(),
                                    **reward_metrics(*implicit_rewards(batch, policy, ref, self.beta))})


PRESETS = {
    # IPO (arXiv:2310.12036): tau (beta) 0.1, TRL's token-averaged log-ratios.
    "ipo": {"preference": {"loss": {"name": "ipo", "beta": 0.1}}},
}
