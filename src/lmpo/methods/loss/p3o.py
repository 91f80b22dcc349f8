"""P3O: Pairwise Proximal Policy Optimization with relative feedback (trajectory-wise clipped pairwise ratios).

Wu, Zhu, Zhang, Jiao, Jordan, Ramchandran 2023, "Pairwise Proximal Policy Optimization: Harnessing Relative Feedback
for LLM Alignment", arXiv:2310.00212. Two responses y1, y2 of one prompt are sampled from pi_old and scored; only
their difference ``Delta = r~(y1) - r~(y2)`` is used, with ``r~ = r - beta sum_t log(pi_old/pi_ref)`` (here the
pipeline's ``kl.mode: reward`` k1 penalty, summed from ``token_rewards``). The pairwise policy gradient is

    grad J = E[ Delta/2 (grad log pi(y1|x) - grad log pi(y2|x)) ]        (the other response is the baseline)

and P3O makes it proximal with whole-response ratios ``rho_k = pi(y_k|x) / pi_old(y_k|x)``:
- ``separate`` clipping (V1): ``L = -1/2 [ min(rho_1 Delta, clip(rho_1) Delta) + min(rho_2 (-Delta), clip(rho_2) (-Delta)) ]``;
- ``joint`` clipping (V2): ``rho_12 = rho_1 / rho_2``, ``L = -1/2 min(rho_12 Delta, clip(rho_12) Delta)``,
with ``clip(rho) = clip(rho, 1 - eps, 1 + eps)``. Both have the pairwise gradient above at rho = 1. The loss is
invariant to any prompt-dependent reward offset (only Delta enters), unlike PPO with a learned value.

Pairs: every unordered pair of member rows of a prompt group (with two rollouts per prompt, the paper's single pair);
each pair weighs 1 and its loss is written onto its two rows' tokens as in :mod:`lmpo.methods.loss.online_pref`, so
``seq_mean_token_mean`` gives the mean over pairs (keep a group in one micro-batch). Sequence log-ratios are summed
over the trained tokens and clamped to +-20 before ``exp``.

Fidelity "reconstructed": the two clipping variants and the pairwise gradient are the paper's (Sec. 4, as summarised
by the card); the 1/2 in both losses (so that both give the Delta/2 pairwise gradient on-policy), ``separate`` as the
default variant and eps = 0.2 are our choices (the paper's exact normalisation and defaults were not read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.base import LossOut
from lmpo.methods.loss.copg import unordered_pairs
from lmpo.methods.loss.online_pref import sequence_scores, spread_to_tokens
from lmpo.methods.params import hp
from lmpo.registry import LOSSES

VARIANTS = ("separate", "joint")


def clipped(ratio: Tensor, adv: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """-min(ratio adv, clip(ratio) adv) and whether the clipped term is the active one."""
    un, cl = ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv
    return -torch.minimum(un, cl), cl < un


@LOSSES.register("p3o", paper="Pairwise Proximal Policy Optimization: Harnessing Relative Feedback for LLM Alignment",
                 arxiv="2310.00212", fidelity="reconstructed")
@dataclass(frozen=True)
class P3OLoss:
    """Pairwise clipped objective on whole-response ratios, driven only by the reward difference of each pair.

    Args:
        epsilon: the clip range of the (pairwise) sequence ratio.
        variant: ``separate`` (V1: each response clipped on its own) or ``joint`` (V2: the ratio of ratios).
    """

    epsilon: float = hp(0.2, gt=0, lt=1)
    variant: str = hp("separate", choices=VARIANTS)
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs"})

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask = batch.response_mask
        member = mask.any(-1)
        pairs = unordered_pairs(batch.group_ids, member)
        i, j = pairs.chosen, pairs.rejected
        delta = (sequence_scores(batch).to(logprobs.dtype)[i] - sequence_scores(batch).to(logprobs.dtype)[j])
        log_rho = ops.masked_sum(logprobs - batch.old_logprobs.detach(), mask, dim=-1)  # log pi/pi_old per row
        c = ops.LOG_RATIO_CLAMP
        if self.variant == "separate":
            l1, c1 = clipped(log_rho[i].clamp(-c, c).exp(), delta, self.epsilon)
            l2, c2 = clipped(log_rho[j].clamp(-c, c).exp(), -delta, self.epsilon)
            per_pair, frac = 0.5 * (l1 + l2), 0.5 * (c1.float() + c2.float())
        else:
            l12, c12 = clipped((log_rho[i] - log_rho[j]).clamp(-c, c).exp(), delta, self.epsilon)
            per_pair, frac = 0.5 * l12, c12.float()
        per_token = spread_to_tokens(per_pair, pairs, member, mask) + 0.0 * logprobs  # graph kept without pairs
        n = i.numel()
        metrics = {"loss/pairs": torch.tensor(float(n)),
                   "loss/clip_frac": frac.detach().mean() if n else torch.zeros(()),
                   "loss/pair_reward_gap": delta.detach().abs().mean() if n else torch.zeros(())}
        return LossOut(ops.zero_outside(per_token, mask), metrics)


PRESETS = {
    # P3O (arXiv:2310.00212): two responses per prompt, pairwise clipped sequence ratios (eps 0.2, separate
    # clipping), KL to the reference folded into the rewards (k1, beta 0.05: a guess, the paper sweeps it).
    "p3o": {
        "advantage": {"name": "grpo"},  # unused by the loss (only reward differences enter)
        "loss": {"name": "p3o", "epsilon": 0.2, "variant": "separate"},
        "aggregator": {"name": "seq_mean_token_mean"},
        "rollout": {"num_generations": 2},
        "kl": {"beta": 0.05, "estimator": "k1", "mode": "reward"},
    },
}
