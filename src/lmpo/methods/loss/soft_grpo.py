"""SofT-GRPO: GRPO on soft-thinking rollouts with a Gumbel-reparameterised likelihood of each soft step.

Paper: Zhi et al. 2025, "SofT-GRPO: Surpassing Discrete-Token LLM Reinforcement Learning via Gumbel-Reparameterized
Soft-Thinking Policy Optimization", arXiv:2511.06411 (official code: zz1358m/SofT-GRPO-master).

Rollout (``rollout.mode: soft_thinking``, :mod:`lmpo.rollout.soft`): at a thinking step the top-k renormalised
probabilities p_t are perturbed, z_{t,i} = log p_{t,i} + g_i with g ~ Gumbel(0, 1) clamped to [-1.5, 3], and the
model is fed sum_i softmax(z_t / tau_g)_i E[id_i]; z_t is stored (``extras["soft_logits"]``). Training treats z_t
as the action; its log-likelihood under theta is the Gumbel log-density of the implied noise:

    eps_i(theta) = clamp(z_{t,i} - log p^theta_{t,i}, -1.5, 3)
    ell_t(theta) = mean_{i: log p^theta_{t,i} > -3} ( -eps_i - exp(-eps_i) )          (soft step)
    ell_t(theta) = log pi_theta(y_t | s_t)                                              (discrete answer token)

with log p^theta_{t,i} the policy's log-probs of the stored top-k ids (``candidate_logprobs``, fed the same soft
inputs) renormalised over the stored set. The GRPO surrogate then uses r_t = exp(ell_t(theta) - ell_t(theta_old)),
clip 0.2, group-normalised advantages and a k3 ("low_var_kl") KL to the reference (coefficient 0.001).

Differs from GRPO: soft (embedding-mixture) thinking steps whose likelihood is a Gumbel density of the stored
perturbed logits, not a token log-prob; discrete answer tokens are unchanged.

Gaps filled (fidelity "reconstructed", equations from the method card, not the paper's text): (1) the renormalising
set is the stored top-k/top-p set S_t (ids outside it have weight 0). (2) A soft step with no id above the -3
threshold has ell = 0 (ratio 1, no gradient). (3) The KL term at a soft step uses the log-prob of the arg-max id
under soft inputs (the pipeline's KL is per token). (4) Without soft extras (a call outside the trainer, or a
discrete rollout) every token is discrete and the loss is the PPO/GRPO clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.base import LossOut
from lmpo.methods.loss.ppo_clip import clipped_surrogate
from lmpo.methods.params import Rule, hp, ordered
from lmpo.registry import LOSSES
from lmpo.rollout.soft import gumbel_loglik


def soft_step_loglik(cand_lp: Tensor, z: Tensor, valid: Tensor, lo: float, hi: float) -> Tensor:
    """ell_t for every position (B, T) from candidate log-probs (B, T, k), stored z and the stored set."""
    neg = torch.finfo(cand_lp.dtype).min
    norm = torch.logsumexp(torch.where(valid, cand_lp, neg), -1, keepdim=True)
    logp = torch.where(valid, cand_lp - norm, neg)
    return gumbel_loglik(z, logp, valid, lo, hi)


@LOSSES.register("soft_grpo", paper="SofT-GRPO: Surpassing Discrete-Token LLM Reinforcement Learning via "
                 "Gumbel-Reparameterized Soft-Thinking Policy Optimization", arxiv="2511.06411",
                 fidelity="reconstructed")
@dataclass(frozen=True)
class SoftGRPOLoss:
    """PPO clip on r_t = exp(ell_t - ell_t^old), ell the Gumbel log-likelihood at soft steps, log pi elsewhere.

    Args:
        epsilon: clip range (paper: 0.2).
        gumbel_min / gumbel_max: clamp of the implied noise (paper: -1.5, 3; must match the rollout's).
    """

    epsilon: float = hp(0.2, gt=0)
    gumbel_min: float = -1.5
    gumbel_max: float = 3.0
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs", "candidate_logprobs"})
    constraints: ClassVar[tuple[Rule, ...]] = (ordered("gumbel_min", "gumbel_max", strict=True),)

    def loglik(self, logprobs: Tensor, old_logprobs: Tensor, batch: RolloutBatch) -> tuple[Tensor, Tensor, Tensor]:
        """(ell(theta), ell(theta_old), soft mask), each (B, T)."""
        ex = batch.extras
        if "soft_mask" not in ex or "candidate_logprobs" not in ex:
            return logprobs, old_logprobs, torch.zeros_like(batch.response_mask)
        soft = ex["soft_mask"].bool() & batch.response_mask
        z, valid = ex["soft_logits"], ex["soft_valid"].bool()
        new = soft_step_loglik(ex["candidate_logprobs"], z, valid, self.gumbel_min, self.gumbel_max)
        old = soft_step_loglik(ex["old_candidate_logprobs"].detach(), z, valid, self.gumbel_min, self.gumbel_max)
        return torch.where(soft, new, logprobs), torch.where(soft, old, old_logprobs.detach()), soft

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask = batch.response_mask
        ell, ell_old, soft = self.loglik(logprobs, batch.old_logprobs, batch)
        ratio = ops.token_ratio(ell, ell_old)
        loss, clipped = clipped_surrogate(ratio, batch.advantages, self.epsilon, self.epsilon, None)
        metrics = {"loss/clip_frac": ops.masked_mean(clipped.float(), mask).detach(),
                   "loss/soft_frac": ops.masked_mean(soft.float(), mask).detach()}
        return LossOut(ops.zero_outside(loss, mask), metrics)


PRESETS = {
    # arXiv:2511.06411: Gumbel-softmax soft thinking (tau_g 0.1, top-k 5, top-p 0.95, noise clamp [-1.5, 3]),
    # rollout temperature 1, n = 8, clip 0.2, k3 KL 0.001, token-mean loss (verl default).
    "soft_grpo": {
        "advantage": {"name": "grpo"},
        "loss": {"name": "soft_grpo", "epsilon": 0.2},
        "aggregator": {"name": "token_mean"},
        "rollout": {"mode": "soft_thinking", "num_generations": 8, "temperature": 1.0,
                    "mode_params": {"tau_gumbel": 0.1, "top_k": 5, "top_p": 0.95, "think_end": "</think>"}},
        "kl": {"beta": 0.001, "estimator": "k3"},
    },
}
