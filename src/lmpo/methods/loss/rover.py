"""ROVER: squared Bellman error of uniform-random-policy Q-values parameterised by the policy's log-ratios.

Paper: He, Ye, Cai, Hu, Jiao, Jiang, Pan 2025, "Random Policy Valuation is Enough for LLM Reasoning with Verifiable
Rewards", arXiv:2509.24981 (official code: tinnerhrhe/ROVER).

In a deterministic, tree-structured MDP with binary terminal reward, acting greedily on the Q-function of the
*uniform* policy is optimal (Thm. 3.1), so ROVER only evaluates that fixed policy. Its Bellman backup (Eq. 5)

    Q^U(s_t, a_t) = r(s_t, a_t) + (1/|V|) sum_{a' in V} Q^U(s_{t+1}, a')

uses the mean over the whole vocabulary at the next state. Q is parameterised by the LM itself (Sec. 3.2):

    Q_theta(s_t, a) = rho * (log pi_theta(a | s_t) - log pi_old(a | s_t))

so the mean over actions is rho * (mean_a log pi_theta(a|s) - mean_a log pi_old(a|s)), where
mean_a log pi(a|s) = mean(z) - logsumexp(z) of the logits z (``extras["vocab_mean_logprobs"]``, computed chunked by
:mod:`lmpo.models.token_stats`; ``old_vocab_mean_logprobs`` under pi_old). Target and loss per token:

    y_t = A + c * rho * sg(mean_a log pi_theta(a|s_{t+1}) - mean_a log pi_old(a|s_{t+1}))   (t < |y|),   y_|y| = A
    l_t = (Q_theta(s_t, y_t) - sg(y_t))^2

with A the group-centred (and std-normalised, Math config) outcome reward broadcast to every token (the
``grpo`` advantage stage) and c = ``next_q_scale`` (the code's next_q_scale_factor). Sampling is from the current LM,
which is softmax(Q/rho) relative to pi_old.

Differs from GRPO: a regression of the token log-ratio onto a Bellman target instead of a clipped ratio surrogate;
no ratio clipping and no reference model.

Gaps filled: (1) "s_{t+1} exists" means token t+1 is a trained token (``response_mask``); the last trained token of
a row gets y = A. (2) The optional "rover clip" of the code is not implemented. (3) At theta = theta_old (one epoch,
one mini-batch) Q and the next-state term are both 0, so ROVER reduces to REINFORCE with advantage 2*rho*A; the
preset therefore uses the paper's 4 mini-batches per batch (128 prompts, mini-batch 32). (4) Called outside the
trainer without the vocabulary statistics in ``batch.extras`` the next-state term is 0 (the code's
target_adv_only ablation). (5) Log-ratios are clamped to +-20 (``ops.log_ratio``) for finiteness.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.base import LossOut
from lmpo.methods.params import hp
from lmpo.registry import LOSSES


def next_state_term(batch: RolloutBatch, rho: float) -> Tensor:
    """rho * sg(mean_a log pi(a|s_{t+1}) - mean_a log pi_old(a|s_{t+1})) placed at token t; 0 where no s_{t+1}."""
    vm = batch.extras.get("vocab_mean_logprobs")
    ovm = batch.extras.get("old_vocab_mean_logprobs")
    mask = batch.response_mask
    if vm is None or ovm is None:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    diff = ops.zero_outside(rho * (vm - ovm).detach(), mask)
    nxt = torch.nn.functional.pad(diff[:, 1:], (0, 1))
    has_next = torch.nn.functional.pad(mask[:, 1:], (0, 1), value=False) & mask
    return ops.zero_outside(nxt, has_next)


@LOSSES.register("rover", paper="Random Policy Valuation is Enough for LLM Reasoning with Verifiable Rewards",
                 arxiv="2509.24981", fidelity="exact")
@dataclass(frozen=True)
class RoverLoss:
    """(rho * log(pi/pi_old) - sg(A + c * rho * next-state vocabulary-mean log-ratio))^2 per token.

    Args:
        rho: Q temperature ("rover_t"); Q = rho * log-ratio. Paper: 1.0.
        next_q_scale: c, weight of the uniform-policy next-state value ("next_q_scale_factor"). Paper: 1.0; 0 gives
            the target_adv_only ablation.
    """

    rho: float = hp(1.0, gt=0)
    next_q_scale: float = hp(1.0, ge=0)
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs", "vocab_mean_logprobs"})

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask = batch.response_mask
        q = self.rho * ops.log_ratio(logprobs, batch.old_logprobs)
        nxt = next_state_term(batch, self.rho)
        target = (batch.advantages + self.next_q_scale * nxt).detach()
        loss = ops.zero_outside((q - target) ** 2, mask)
        metrics = {
            "loss/q_mean": ops.masked_mean(q, mask).detach(),
            "loss/next_q_mean": ops.masked_mean(nxt, mask).detach(),
            "loss/bellman_error": ops.masked_mean(loss, mask).detach(),
        }
        return LossOut(loss, metrics)


PRESETS = {
    # arXiv:2509.24981 (Math config): rho 1, next-q scale 1, n = 8, group mean/std-normalised reward broadcast to
    # tokens, token-mean loss, 4 mini-batches per batch (128 prompts / 32), rollout temperature 0.6, no KL.
    "rover": {
        "advantage": {"name": "grpo"},
        "loss": {"name": "rover", "rho": 1.0, "next_q_scale": 1.0},
        "aggregator": {"name": "token_mean"},
        "rollout": {"num_generations": 8, "temperature": 0.6},
        "train": {"num_minibatches": 4},
        "kl": {"beta": 0.0},
    },
}
