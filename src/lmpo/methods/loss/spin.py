"""SPIN: Self-Play fIne-tuNing -- the reference answer against the policy's own generation, relative to the
previous iterate.

Chen, Deng, Yuan, Ji, Gu 2024, "Self-Play Fine-Tuning Converts Weak Language Models to Strong Language Models",
arXiv:2401.01335 (ICML 2024), Sec. 4 (the SPIN objective): with y the data set's answer and y' ~ p_{theta_t} the
previous iterate's generation,

    L_SPIN(theta; theta_t) = E[ l( lambda log(p_theta(y|x) / p_theta_t(y|x)) - lambda log(p_theta(y'|x) / p_theta_t(y'|x)) ) ],

l(t) = log(1 + exp(-t)) (logistic), sequence log-probs summed over the response tokens: DPO's loss with the real
answer as "chosen", the self-generated one as "rejected" and the previous iterate as the reference. Its fixed point
is p_theta = p_data (the policy can no longer tell its generations from the data).

In lmpo: ``rollout.mode: self_play`` puts the task's reference answer as the first row of each prompt group and the
policy's samples in the others (``extras["real_answer"]``, the ``real_rows`` need); each generated row is paired
with its group's real row (weight 1 / #generated, so a group counts once), and the per-pair loss is written onto the
two rows' tokens so ``seq_mean_token_mean`` gives the mean over groups (keep a group in one micro-batch).

The iteration loop: theta_t is the policy that generated the step's samples, read from ``old_logprobs``. One SPIN
iteration is one lmpo step: generate with p_{theta_t}, then fit theta_{t+1} on that batch for ``train.ppo_epochs`` x
``train.num_minibatches`` optimizer steps (theta_t stays fixed meanwhile; the paper trains each iteration for 2 epochs
over its whole synthetic set, a coarser grain of the same loop). Rewards are not used. lambda = 0.1 as in the paper's
experiments. Fidelity "exact" for the loss; the iteration grain is a schedule choice (above).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.errors import DataError
from lmpo.methods.base import LossOut
from lmpo.methods.loss.online_pref import Pairs, spread_to_tokens
from lmpo.methods.params import hp
from lmpo.registry import LOSSES


def real_vs_generated(real: Tensor, group_ids: Tensor, member: Tensor) -> Pairs:
    """(real row, generated row) for every generated member row of a group with a real member row; weight
    1 / (#generated of the group)."""
    same = (group_ids[:, None] == group_ids[None, :]) & member[:, None] & member[None, :]
    valid = same & real[:, None] & ~real[None, :]
    per_group = valid.sum(1).to(torch.float64)  # generated rows paired with each real row
    c, r = valid.nonzero(as_tuple=True)
    return Pairs(c, r, 1.0 / per_group[c].clamp_min(1.0), 0)


@LOSSES.register("spin", paper="Self-Play Fine-Tuning Converts Weak Language Models to Strong Language Models",
                 arxiv="2401.01335")
@dataclass(frozen=True)
class SPINLoss:
    """Logistic loss on lambda x (real answer's log-ratio to theta_t - generated answer's log-ratio to theta_t).

    Args:
        lam: lambda, the scale of the log-ratio margin (the paper's experiments: 0.1).
    """

    lam: float = hp(0.1, gt=0)
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs", "real_rows"})

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask = batch.response_mask
        if "real_answer" not in batch.extras:
            raise DataError('loss "spin" needs extras["real_answer"] (the reference answer as a row of each group): '
                            "set rollout.mode=self_play.")
        real = batch.extras["real_answer"].to(logprobs.device) > 0.5
        member = mask.any(-1)
        pairs = real_vs_generated(real, batch.group_ids, member)
        ratio = ops.masked_sum(logprobs - batch.old_logprobs.detach(), mask, dim=-1)  # log p_theta / p_theta_t
        c, g = pairs.chosen, pairs.rejected
        margin = self.lam * (ratio[c] - ratio[g])
        per_pair = -F.logsigmoid(margin)
        per_token = spread_to_tokens(per_pair, pairs, member, mask) + 0.0 * logprobs  # graph kept without pairs
        n = c.numel()
        metrics = {"loss/pairs": torch.tensor(float(n)),
                   "rewards/real": (self.lam * ratio[c]).detach().mean() if n else torch.zeros(()),
                   "rewards/generated": (self.lam * ratio[g]).detach().mean() if n else torch.zeros(()),
                   "rewards/accuracies": (margin.detach() > 0).float().mean() if n else torch.zeros(())}
        return LossOut(ops.zero_outside(per_token, mask), metrics)


PRESETS = {
    # SPIN (arXiv:2401.01335): the reference answer vs the policy's own samples, lambda 0.1, against the policy that
    # generated them; each step is one self-play iteration (here 2 optimizer steps on its batch, as the paper's
    # 2 epochs per iteration).
    "spin": {
        "advantage": {"name": "grpo"},  # unused by the loss
        "loss": {"name": "spin", "lam": 0.1},
        "aggregator": {"name": "seq_mean_token_mean"},
        "rollout": {"mode": "self_play", "num_generations": 2},
        "train": {"ppo_epochs": 2},
        "kl": {"beta": 0.0},
    },
}
