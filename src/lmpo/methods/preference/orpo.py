"""ORPO: Monolithic Preference Optimization without Reference Model.

Hong, Lee, Thorne (2024), arXiv:2403.07691, Eqs. 6-7:

    L_ORPO = L_SFT + lambda * L_OR,   L_OR = -log sigmoid( log odds(y_w|x) - log odds(y_l|x) ),
    odds(y|x) = P(y|x) / (1 - P(y|x)),   log P(y|x) = the token-mean log-prob of y (Eq. 3's length normalisation)

``L_SFT`` is the chosen response's token-mean negative log-likelihood; ``beta`` is lambda (TRL's name; default
0.1 as the paper's Phi-2 / Llama-2 runs and TRL's ORPOConfig). No reference model: SFT and preference alignment in
one stage. ``log(1 - P)`` is computed stably (log1mexp) with ``log P`` capped at -1e-6 so a response the model is
certain of gives a large finite odds instead of an infinite one. Differences from TRL's ORPOTrainer: its SFT term
is a token mean over the whole batch's chosen tokens, lmpo's a mean per pair (then over pairs, so micro-batching
changes nothing); they agree when the chosen responses have equal lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from lmpo.batch import PreferenceBatch
from lmpo.methods.base import PairLogps, PreferenceOut, hp
from lmpo.methods.preference.dpo import reward_metrics, sequence_logps
from lmpo.registry import PREFERENCE_LOSSES


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0 (Maechler's two branches), x capped at -1e-6."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@PREFERENCE_LOSSES.register("orpo", paper="ORPO: Monolithic Preference Optimization without Reference Model",
                            arxiv="2403.07691")
@dataclass(frozen=True)
class ORPO:
    """SFT on the chosen response plus beta (lambda) x the log odds-ratio loss; reference-free."""

    beta: float = hp(0.1, ge=0)
    needs: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, batch: PreferenceBatch, policy: PairLogps, ref: PairLogps | None) -> PreferenceOut:
        c, r = sequence_logps(batch, policy, average=True)
        log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
        ratio = F.logsigmoid(log_odds)
        nll = -c
        loss = nll - self.beta * ratio
        return PreferenceOut(loss, {"loss/nll": nll.detach().mean(), "loss/log_odds_ratio": ratio.detach().mean(),
                                    "loss/log_odds_chosen": log_odds.detach().mean(),
                                    **reward_metrics(self.beta * c, self.beta * r)})


PRESETS = {
    # ORPO (arXiv:2403.07691): lambda 0.1; no reference model.
    "orpo": {"preference": {"loss": {"name": "orpo", "beta": 0.1}}},
}
