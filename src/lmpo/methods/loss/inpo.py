"""INPO: Iterative Nash Policy Optimization -- online mirror descent against itself, as a squared loss on pairs.

Zhang, Yu, Liu, Zhao, Yan, Gu, Lin, Yang 2024, "Iterative Nash Policy Optimization: Aligning LLMs with General
Preferences via No-Regret Learning", arXiv:2407.00617 (ICLR 2025). Alignment with a general preference oracle is a
two-player game whose KL-regularised Nash policy online mirror descent reaches; its step
``pi_{t+1} ∝ pi_t^{1 - tau/eta} pi_ref^{tau/eta} exp(P(y ≻ pi_t) / eta)`` is the minimiser of (Sec. 4, the INPO loss)

    L_t(pi) = E_{(y_w, y_l) ~ pi_t} [ ( h_t(pi, y_w, y_l) - 1/(2 eta) )^2 ],
    h_t = log(pi(y_w)/pi(y_l)) - (tau/eta) log(pi_ref(y_w)/pi_ref(y_l)) - (1 - tau/eta) log(pi_t(y_w)/pi_t(y_l)),

sequence log-probs summed over the response tokens; no win-rate estimation is needed. tau = eta gives IPO against
pi_ref; tau = 0 removes the reference.

The iteration in lmpo: pi_t is the policy that sampled the step's batch, read from ``old_logprobs``, and pi_{t+1} is
fitted on that batch for ``train.ppo_epochs`` x ``train.num_minibatches`` optimizer steps (pi_t then stays fixed,
computed by the no-grad pass before the update); the next step samples from pi_{t+1}. With one optimizer step per
batch, pi_t is the update's own detached forward. The preference oracle is any lmpo reward: pairs are the (best,
worst) of each prompt's rollouts (:func:`lmpo.methods.loss.online_pref.build_pairs`, ties skipped and counted),
written onto their rows' tokens so ``seq_mean_token_mean`` gives the mean over pairs (keep a group in one
micro-batch).

Fidelity "reconstructed": the loss is the card's parameterisation (OMD step 1/eta, target 1/(2 eta)), which two
independent reimplementations use; the paper's own typeset equation was not read. Defaults eta = 7.5e-3 and
tau = 2.5e-3 come from a third-party reproduction spec (tau/eta = 1/3), not from the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.base import LossOut
from lmpo.methods.loss.online_pref import PAIR_MODES, build_pairs, sequence_scores, spread_to_tokens
from lmpo.methods.params import Rule, hp, rule
from lmpo.registry import LOSSES


@LOSSES.register("inpo", paper="Iterative Nash Policy Optimization: Aligning LLMs with General Preferences via "
                 "No-Regret Learning", arxiv="2407.00617", fidelity="reconstructed")
@dataclass(frozen=True)
class INPOLoss:
    """(h_t - 1/(2 eta))^2 on ranked pairs, h_t mixing the policy, reference and previous-iterate log-ratio margins.

    Args:
        eta: inverse OMD step size (the target margin is 1/(2 eta)).
        tau: KL-to-reference strength (0 <= tau <= eta).
        pairs: ``best_worst`` or ``all`` ranked pairs of each group (as ``online_pref``).
    """

    eta: float = hp(7.5e-3, gt=0)
    tau: float = hp(2.5e-3, ge=0)
    pairs: str = hp("best_worst", choices=PAIR_MODES)
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs", "ref_logprobs"})
    constraints: ClassVar[tuple[Rule, ...]] = (rule(lambda tau, eta: tau <= eta, "{tau} must be <= {eta}"),)

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask = batch.response_mask
        member = mask.any(-1)
        pairs = build_pairs(sequence_scores(batch), batch.group_ids, member, self.pairs)
        seq = lambda x: ops.masked_sum(x, mask, dim=-1)  # noqa: E731
        pol, ref, prev = seq(logprobs), seq(batch.ref_logprobs.detach()), seq(batch.old_logprobs.detach())
        w, l = pairs.chosen, pairs.rejected
        a = self.tau / self.eta
        h = (pol[w] - pol[l]) - a * (ref[w] - ref[l]) - (1 - a) * (prev[w] - prev[l])
        per_pair = (h - 1 / (2 * self.eta)).square()
        per_token = spread_to_tokens(per_pair, pairs, member, mask) + 0.0 * logprobs  # graph kept without pairs
        n = w.numel()
        metrics = {"loss/pairs": torch.tensor(float(n)), "loss/pair_ties": torch.tensor(float(pairs.ties)),
                   "loss/h_margin": h.detach().mean() if n else torch.zeros(())}
        return LossOut(ops.zero_outside(per_token, mask), metrics)


PRESETS = {
    # INPO (arXiv:2407.00617): (best, worst) pairs of the policy's own samples; eta 7.5e-3, tau 2.5e-3 (third-party
    # reproduction values); each step is one mirror-descent iteration against the sampling policy.
    "inpo": {
        "advantage": {"name": "grpo"},  # unused by the loss
        "loss": {"name": "inpo", "eta": 7.5e-3, "tau": 2.5e-3, "pairs": "best_worst"},
        "aggregator": {"name": "seq_mean_token_mean"},
        "kl": {"beta": 0.0},
    },
}
