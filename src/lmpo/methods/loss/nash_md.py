"""Nash-MD-PG: policy gradient on the preference against a geometric-mixture opponent, with a KL to the reference.

Munos, Valko, Calandriello, Gheshlaghi Azar, Rowland, Guo, Tang, Geist, Mesnard, Michi, Selvi, Girgin, Momchev,
Bachem, Mankowitz, Precup, Piot 2024, "Nash Learning from Human Feedback", arXiv:2312.00886 (ICML 2024). The
regularised preference game's Nash equilibrium is reached by mirror descent against the geometric mixture
``pi^beta ∝ pi^(1-beta) mu^beta`` of the policy and the reference mu (Nash-MD, Sec. 5); the deep version (Sec. 7,
Nash-MD-PG) samples y ~ pi and an opponent y' ~ pi^beta (token-level mixture: ``rollout.mode: mixture``) and follows

    grad = E[ (P(y ≻ y') - 1/2) grad log pi(y) ] - tau grad KL(pi || mu).

Per trained token of a policy row (TRL's NashMD loss, with the KL in score-function form):
``l_t = -(P_i - 1/2) log pi(y_t) + tau * sg(log pi(y_t) - log mu(y_t)) * log pi(y_t)``; with
``aggregator: seq_mean_token_sum`` the loss is the mean over policy rows of ``tau * KL_sum - (P - 1/2) log pi(y)``,
as TRL averages it. Preferences: the paper uses a learned pairwise preference model; here any lmpo reward becomes a
Bradley-Terry preference ``P(y_i ≻ y_j) = sigmoid((r_i - r_j) / temperature)``, and ``P_i`` is its mean over the
opponents of row i's group (rows flagged in ``extras["opponent"]``, which are scored but never trained).

Fidelity "reconstructed": the update and the mixture are the paper's (as summarised by the card and TRL's trainer);
the KL weight tau = 0.1 and mixture 0.5 are TRL's defaults (the paper sweeps them); the Bradley-Terry preference
from a scalar reward stands in for a preference model (TRL does the same with a reward model). TRL 1.16's
experimental package no longer ships the Nash-MD trainer, so there is no stored cross-check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.base import LossOut
from lmpo.methods.loss.online_pref import sequence_scores
from lmpo.methods.params import hp
from lmpo.registry import LOSSES


def win_rates(scores: Tensor, group_ids: Tensor, opponent: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Mean Bradley-Terry win probability of each row against its group's opponents (B,), and whether it has any."""
    same = (group_ids[:, None] == group_ids[None, :]) & opponent[None, :] & ~opponent[:, None]
    p = torch.sigmoid((scores[:, None] - scores[None, :]) / temperature)
    n = same.sum(1)
    rate = (p * same).sum(1) / n.clamp_min(1)
    return torch.where(n > 0, rate, torch.full_like(rate, 0.5)), n > 0


@LOSSES.register("nash_md", paper="Nash Learning from Human Feedback (Nash-MD-PG)", arxiv="2312.00886",
                 fidelity="reconstructed")
@dataclass(frozen=True)
class NashMDLoss:
    """-(P(y ≻ opponent) - 1/2) log pi(y) + tau sg(log pi - log mu) log pi per token of the policy rows.

    Args:
        tau: weight of the KL to the reference (TRL's ``beta``).
        temperature: the Bradley-Terry temperature turning reward gaps into preferences.
    """

    tau: float = hp(0.1, ge=0)
    temperature: float = hp(1.0, gt=0)
    needs: ClassVar[frozenset[str]] = frozenset({"ref_logprobs", "opponent_rows"})

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask = batch.response_mask
        opponent = batch.extras["opponent"].to(logprobs.device) > 0.5
        P, has = win_rates(sequence_scores(batch).to(logprobs.dtype), batch.group_ids, opponent, self.temperature)
        kl = (logprobs - batch.ref_logprobs).detach()
        per_token = -(P - 0.5)[:, None] * logprobs + self.tau * kl * logprobs
        train = mask & ~opponent[:, None]
        metrics = {"loss/win_rate": ops.masked_mean(P.detach(), has & mask.any(-1)),
                   "loss/kl_sum": ops.masked_mean(ops.masked_sum(kl, train, -1), train.any(-1))}
        return LossOut(ops.zero_outside(per_token, train), metrics)


PRESETS = {
    # Nash-MD-PG (arXiv:2312.00886; TRL NashMDConfig defaults): one policy sample and one mixture opponent per prompt
    # (mixture_coef 0.5), KL weight 0.1, sequence sums averaged over the policy rows.
    "nash_md": {
        "advantage": {"name": "grpo"},  # unused by the loss
        "loss": {"name": "nash_md", "tau": 0.1},
        "aggregator": {"name": "seq_mean_token_sum"},
        "rollout": {"mode": "mixture", "mode_params": {"mixture_coef": 0.5}, "num_generations": 2},
        "kl": {"beta": 0.0},
    },
}
