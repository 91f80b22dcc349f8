"""PURE's min-form credit assignment: each process reward re-weighted by a low-temperature softmin over its reply's
steps, so a step's return approximates the minimum of the future process rewards instead of their sum.

Paper: "Stop Summation: Min-Form Credit Assignment Is All Process Reward Model Needs for Reasoning", Cheng et al.,
2025, arXiv:2504.15275 (NeurIPS 2025); code CJReinforce/PURE (OpenRLHF branch, ``openrlhf/utils/utils.py:
turn_process_reward_logits_to_reward`` and ``openrlhf/trainer/ppo_utils/experience_maker.py: process_experiences``,
read at the repository's head).

Reply i with K_i steps, process rewards r_{i,k} (the PRM's P(correct) - P(incorrect) in the paper; here whatever the
``process_credit`` planner's step scorer returns) on the step-end tokens e_{i,k}:
  w_{i,k}  = exp(-r_{i,k} / tau) / sum_{k'} exp(-r_{i,k'} / tau)                 (Eq. 5, softmin, tau = 0.1)
  r*_{i,k} = w_{i,k} r_{i,k}                                                       (transformed reward, Eq. 6)
  baseline (RLOO over the other replies j != i of the prompt's group, the code's ``--reward_baseline token``):
      b_i = sum_{j != i} sum_k r*_{j,k} / sum_{j != i} L_j   (L = trained tokens of a reply),
      r*_{i,k} -= b_i * n_{i,k}   (n_{i,k} = trained tokens of step k);  or ``baseline: step``:
      b_i = mean_{j != i} (sum_k r*_{j,k} / K_j), r*_{i,k} -= b_i
  verifiable reward (``vr_coef``; the code's PRM+VR mode): + vr_coef (R_i - mean_{j != i} R_j) on the last token
  token rewards u_{i,t} = sum_k r*_{i,k} 1[t = e_{i,k}] + VR term + any other ``token_rewards`` (the KL penalty
      under ``kl.mode: reward``, as the code subtracts beta * KL per token before the returns)
  A_{i,t} = G_{i,t} = sum_{t' >= t} u_{i,t'}      (gamma = 1, no further normalisation). Before the baseline, as
      tau -> 0 the return of a token in step k is min_k' r_{i,k'} when the worst step lies at or after k, else ~0.
As tau -> 0 the return at the first step is min_k r_{i,k}: the sum of transformed rewards lies between the minimum and
the maximum step reward for every tau (the card's property). Differs from GRPO: a per-token return from process
rewards, no std normalisation, a leave-one-out baseline.

Gaps filled (fidelity "reconstructed"): the code zeroes the advantage of its step-separator tokens (``nomask_
separator_adv`` false), which carry the reward; lmpo puts a step's reward on the step's own last token (there is no
separate separator token after tokenisation), so that token keeps its advantage. The code adds the VR term only on
prompts that have a reference answer; here on every row when ``vr_coef`` > 0 (``batch.rewards`` is the verifier).
A group of one reply has baseline 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.params import hp
from lmpo.registry import ADVANTAGES


def softmin_transform(r: Tensor, live: Tensor, tau: float) -> Tensor:
    """r * softmax(-r / tau) over each row's live steps (B, S); 0 on the others and on rows with no step."""
    z = torch.where(live, -r / tau, torch.full_like(r, -torch.inf))
    w = torch.softmax(z, dim=-1).nan_to_num(0.0)
    return torch.where(live, w * r, torch.zeros_like(r))


def leave_one_out_sum(x: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(sum over the other rows of the group, number of other rows) for a (B,) tensor."""
    total = ops.group_sum(x, group_ids)
    count = ops.group_sum(torch.ones_like(x), group_ids)
    return total - x, count - 1


def step_token_counts(batch: RolloutBatch, S: int) -> Tensor:
    """(B, S) trained tokens in each step (by ``turn_ids``)."""
    turns = batch.turn_ids.long().clamp(0, S - 1)
    return torch.zeros(turns.shape[0], S, dtype=torch.float64).scatter_add(1, turns, batch.response_mask.double())


@ADVANTAGES.register("pure", paper="Stop Summation: Min-Form Credit Assignment Is All Process Reward Model Needs "
                     "for Reasoning", arxiv="2504.15275", fidelity="reconstructed")
@dataclass(frozen=True)
class PUREAdvantage:
    """Min-form returns of softmin-weighted process rewards with a leave-one-out baseline (module docstring).

    Args:
        temperature: tau of the softmin weights (0.1 in the code). baseline: ``token`` (the released script) or
            ``step``. vr_coef: weight of the verifiable (outcome) reward's leave-one-out advantage (1.0 in the code;
            0 = PRM only).
    """

    temperature: float = hp(0.1, gt=0)
    baseline: str = hp("token", choices=("token", "step"))
    vr_coef: float = hp(1.0, ge=0)
    needs: ClassVar[frozenset[str]] = frozenset({"step_rewards"})

    def __call__(self, batch: RolloutBatch) -> Tensor:
        mask = batch.response_mask
        B, T = mask.shape
        ex = batch.extras
        r = ex["step_rewards"].double()
        S = r.shape[1]
        n = ex["num_steps"].long().to(r.device)
        live = torch.arange(S, device=r.device)[None, :] < n[:, None]
        ends = torch.where(live, ex["step_ends"].long(), torch.zeros_like(ex["step_ends"].long())).clamp(0, T - 1)
        rs = softmin_transform(r, live, self.temperature)
        outcome = rs.sum(-1)
        if self.baseline == "token":
            others, count = leave_one_out_sum(outcome, batch.group_ids)
            lengths, _ = leave_one_out_sum(mask.double().sum(-1), batch.group_ids)
            b = torch.where((count > 0) & (lengths > 0), others / lengths.clamp_min(1), torch.zeros_like(others))
            rs = rs - b[:, None] * step_token_counts(batch, S) * live
        else:
            per_step = outcome / n.clamp_min(1).double()
            others, count = leave_one_out_sum(per_step, batch.group_ids)
            rs = rs - torch.where(count > 0, others / count.clamp_min(1), torch.zeros_like(others))[:, None] * live
        u = torch.zeros(B, T, dtype=torch.float64, device=r.device)
        raw = torch.zeros_like(u)
        u.scatter_add_(1, ends, torch.where(live, rs, torch.zeros_like(rs)))
        raw.scatter_add_(1, ends, torch.where(live, r, torch.zeros_like(r)))
        if batch.token_rewards is not None:  # the rest of the token rewards (e.g. the KL penalty) pass unchanged
            u = u + ops.zero_outside(batch.token_rewards.double() - raw, mask)
        if self.vr_coef:
            R = batch.rewards.double()
            others, count = leave_one_out_sum(R, batch.group_ids)
            v = torch.where(count > 0, R - others / count.clamp_min(1), torch.zeros_like(R))
            last = T - 1 - mask.long().flip(-1).argmax(-1)
            u[torch.arange(B), last] += self.vr_coef * v * mask.any(-1)
        returns = u.flip(-1).cumsum(-1).flip(-1)
        return ops.zero_outside(returns, mask).to(torch.float32)


# Released script (examples/scripts/train_pure.sh): RLOO, token baseline, PRM+VR with verifiable_reward_coef 1.0,
# n_samples_per_prompt 4, temperature 0.5, actor lr 5e-7, init_kl_coef 0.001 (KL in the reward), PPO clip 0.2, steps
# cut at "\n\n" and scored by a PRM. lmpo's step scorer defaults to the exact arithmetic checker: name your PRM with
# planners[0].scorer.
PRESETS = {
    "pure": {
        "advantage": {"name": "pure", "temperature": 0.1, "baseline": "token", "vr_coef": 1.0},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "seq_mean_token_mean"},  # OpenRLHF's masked_mean(loss, dim=-1).mean()
        "planners": [{"name": "process_credit", "separator": "\n\n"}],
        "kl": {"beta": 0.001, "mode": "reward"},
        "rollout": {"num_generations": 4, "temperature": 0.5},
    },
}
