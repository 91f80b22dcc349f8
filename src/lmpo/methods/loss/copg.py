"""CoPG: Contrastive Policy Gradient on sequence-level scores, off-policy, without importance sampling.

Flet-Berliac, Grinsztajn, Strub, Wu, Choi, Cremer, Ahmadian, Chandak, Azar, Pietquin, Geist 2024, "Contrastive
Policy Gradient: Aligning LLMs on sequence-level scores in a supervised-friendly fashion", arXiv:2406.19185.

For two responses y, y' to the same prompt, each one's regularised reward ``R^beta(y) = R(x, y) - beta ln(pi(y|x) /
pi_ref(y|x))`` (sequence log-probs: sums over the response tokens) is the other's baseline. The per-pair update
direction is ``(R^beta(y) - R^beta(y')) (grad ln pi(y) - grad ln pi(y'))``, which is ``-1/(2 beta)`` times the gradient
of the squared residual

    l_CoPG(y, y') = ( R(y) - R(y') - beta [ ln(pi/pi_ref)(y) - ln(pi/pi_ref)(y') ] )^2,

so this loss minimises the mean of l_CoPG over the pairs (fixed point: pi* ∝ pi_ref exp(R / beta), reached from any
sampling distribution, hence off-policy without importance weights). With a constant reward gap m between a chosen
and a rejected response it is ``beta^2 (h - m/beta)^2``, beta^2 times IPO's loss at ``1/(2 tau) = m/beta``.

Pairs: every unordered pair of rows of a prompt group with at least one trained token (ties included: equal rewards
still pull the two log-ratios together); each pair weighs 1 and the loss is written onto the tokens of its two rows
as :mod:`lmpo.methods.loss.online_pref` does, so ``seq_mean_token_mean`` gives the mean over pairs (keep a group in
one micro-batch). R is the outcome reward plus summed token rewards when present.

Fidelity "reconstructed": the paper's gradient estimator is as above (Sec. 3, the contrastive policy gradient); the
exact typography and normalisation of its sample loss (a factor 1/2 or a 1/beta scale) could not be read, so the
scale (no 1/2, the residual in reward units) is our choice; it multiplies the gradient by a positive constant
(absorbed by the learning rate). beta has no published default for this setting (the paper sweeps it); 0.1 here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.base import LossOut
from lmpo.methods.loss.online_pref import Pairs, sequence_scores, spread_to_tokens
from lmpo.methods.params import hp
from lmpo.registry import LOSSES


def unordered_pairs(group_ids: Tensor, member: Tensor) -> Pairs:
    """Every pair i < j of member rows in the same group, weight 1."""
    same = (group_ids[:, None] == group_ids[None, :]) & member[:, None] & member[None, :]
    i, j = (same & torch.ones_like(same).triu(1)).nonzero(as_tuple=True)
    return Pairs(i, j, torch.ones(i.numel(), dtype=torch.float64), 0)


@LOSSES.register("copg", paper="Contrastive Policy Gradient: Aligning LLMs on sequence-level scores in a "
                 "supervised-friendly fashion", arxiv="2406.19185", fidelity="reconstructed")
@dataclass(frozen=True)
class CoPGLoss:
    """Squared residual of the reward gap minus beta x the log-ratio gap, over all pairs of each prompt group.

    Args:
        beta: the KL-regularisation strength (the fixed point is pi_ref exp(R / beta)).
    """

    beta: float = hp(0.1, gt=0)
    needs: ClassVar[frozenset[str]] = frozenset({"ref_logprobs"})

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask = batch.response_mask
        member = mask.any(-1)
        pairs = unordered_pairs(batch.group_ids, member)
        h = ops.masked_sum(logprobs - batch.ref_logprobs.detach(), mask, dim=-1)  # ln(pi/pi_ref)(y) (B,)
        R = sequence_scores(batch).to(logprobs.dtype)
        i, j = pairs.chosen, pairs.rejected
        residual = (R[i] - R[j]) - self.beta * (h[i] - h[j])
        per_pair = residual.square()
        per_token = spread_to_tokens(per_pair, pairs, member, mask) + 0.0 * logprobs  # graph kept without pairs
        reg = (R - self.beta * h).detach()
        metrics = {"loss/pairs": torch.tensor(float(i.numel())),
                   "loss/residual_abs": residual.detach().abs().mean() if i.numel() else torch.zeros(()),
                   "loss/regularised_reward": ops.masked_mean(reg, member)}
        return LossOut(ops.zero_outside(per_token, mask), metrics)


PRESETS = {
    # CoPG (arXiv:2406.19185): all pairs of each prompt's rollouts, beta 0.1 (the paper sweeps beta), no extra KL
    # term (the reference is inside the residual).
    "copg": {
        "advantage": {"name": "grpo"},  # unused by the loss
        "loss": {"name": "copg", "beta": 0.1},
        "aggregator": {"name": "seq_mean_token_mean"},
        "kl": {"beta": 0.0},
    },
}
