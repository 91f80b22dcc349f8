"""OTR: supervised fine-tuning guided by one-token policy-gradient rollouts.

Paper: Ming, Wu, Hu, He et al. 2025, "One-Token Rollout: Guiding Supervised Fine-Tuning of LLMs with Policy
Gradient", arXiv:2509.26313.

Every next-token prediction on a supervised sequence is a one-step episode. At state s_t = (x, y*_<t) the policy's
temperature-raised copy Pi'(.|s_t) = softmax(z_t / T_s) (no gradient) is sampled K times (a_1..a_K, the "one-token
rollout", done at rollout time by ``rollout.mode: reference``, :mod:`lmpo.rollout.reference`). Reward R(a) = 1 if
a = y*_t else beta (beta <= 0), and REINFORCE gives the token loss (the paper's policy-gradient objective applied to
one-step trajectories):

    l_t = -(1/K) sum_k sg(R(a_k)) * log pi_theta(a_k | s_t),        sequence loss = (1/|y*|) sum_t l_t

Its expectation is -[Pi'(y*) log pi(y*) + beta sum_{a != y*} Pi'(a) log pi(a)]; with T_s = 1 the expected gradient is
(1 - beta) pi(y*) grad log pi(y*) (the constant beta is a zero-mean baseline), a probability-weighted SFT gradient.

Inputs: ``extras["candidate_ids"]`` (B, T, K) from the rollout and ``extras["candidate_logprobs"]`` (B, T, K),
log pi_theta of each sample with gradient, computed chunked by the trainer (``needs``). ``logprobs`` (the reference
tokens' log-probs) is used only when no candidates are given (see gap 3).

Differs from GRPO: no sampled completions, no outcome reward or advantage (the advantage stage's output is ignored);
the data are reference answers and the reward is per sampled token.

Gaps filled (fidelity "reconstructed"): (1) the paper's T_s and beta values were not available to us; we use
T_s = 1.0 (``rollout.mode_params.temperature``) and beta = -0.1 (the card's worked value). (2) The 1/|y*| length
normalisation is the ``seq_mean_token_mean`` aggregator. (3) Without candidates in ``batch.extras`` (a call outside
the trainer) the loss is the T_s = 1, beta = 0 expectation -sg(pi(y*)) log pi(y*).
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


def candidate_rewards(candidate_ids: Tensor, targets: Tensor, beta: float) -> Tensor:
    """R(a_k) = 1 if a_k == y*_t else beta, (B, T, K)."""
    hit = candidate_ids == targets.unsqueeze(-1)
    return torch.where(hit, 1.0, beta)


@LOSSES.register("otr", paper="One-Token Rollout: Guiding Supervised Fine-Tuning of LLMs with Policy Gradient",
                 arxiv="2509.26313", fidelity="reconstructed")
@dataclass(frozen=True)
class OTRLoss:
    """-(1/K) sum_k R(a_k) log pi(a_k | s_t) over K one-token samples per reference position.

    Args:
        beta: reward of a sampled token that differs from the reference token (<= 0; small negative).
    """

    beta: float = hp(-0.1, ge=-1, le=0)
    needs: ClassVar[frozenset[str]] = frozenset({"candidate_logprobs"})

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask = batch.response_mask
        cand = batch.extras.get("candidate_ids")
        cand_lp = batch.extras.get("candidate_logprobs")
        if cand is None or cand_lp is None:
            loss = -logprobs.detach().exp() * logprobs
            return LossOut(ops.zero_outside(loss, mask), {})
        R = candidate_rewards(cand, batch.response_ids, self.beta).to(cand_lp.dtype)
        cand_lp = ops.zero_outside(cand_lp, mask.unsqueeze(-1))
        loss = -(R * cand_lp).mean(-1)
        hit = (cand == batch.response_ids.unsqueeze(-1)).to(logprobs.dtype).mean(-1)
        metrics = {"loss/candidate_hit_rate": ops.masked_mean(hit, mask).detach(),
                   "loss/ref_logprob": ops.masked_mean(logprobs, mask).detach()}
        return LossOut(ops.zero_outside(loss, mask), metrics)


PRESETS = {
    # arXiv:2509.26313: K = 256 one-token samples per reference position, small negative beta, per-sequence token
    # mean (SFT normalisation); the batch is the task's reference answers (rollout.mode: reference), one per prompt.
    "otr": {
        "advantage": {"name": "grpo"},  # required by the pipeline; OTR's loss does not read advantages
        "loss": {"name": "otr", "beta": -0.1},
        "aggregator": {"name": "seq_mean_token_mean"},
        "rollout": {"mode": "reference", "num_generations": 1, "prompts_per_step": 64,
                    "mode_params": {"column": "answer", "num_candidates": 256, "temperature": 1.0}},
        "kl": {"beta": 0.0},
    },
}
