"""FoR: Flow of Reasoning, GFlowNet trajectory-balance training of the policy for diverse reasoning.

Paper: Yu, Jiang, Kang, Hao, Qin (2024), "Flow of Reasoning: Efficient Training of LLM Policy with Divergent
Thinking" (later "Flow of Reasoning: Training LLMs for Divergent Reasoning with Minimal Examples"),
arXiv:2406.05673; code: github.com/Yu-Fangxu/FoR.

The policy is the forward policy P_F of a GFlowNet over reasoning trajectories tau = (s_0 -> ... -> s_n = x); trained
with trajectory balance (the paper's training objective in its method section, after Malkin et al. 2022,
arXiv:2201.13259; equation numbers were not confirmed from the paper text):

    L(tau) = ( log Z + log P_F(tau) - log R(x) - log P_B(tau) )^2,      log P_F(tau) = sum_t log pi(s_{t+1} | s_t)

with log P_B = 0 (each state has one parent: states are prefixes). Minimising it makes P_F(tau) proportional to R(x),
so every correct trajectory keeps probability mass (diversity) instead of one mode taking all of it (reward
maximisation). Here tau is one response, log P_F the sum of its token log-probs.

- ``log_z="learned"`` (the Game24 code: a scalar log Z trained by its own Adam at ``log_z_lr``): the loss per
  trajectory is row-independent; the log-Z gradient 2 mean_i (log Z + log P_F_i - log R_i) is accumulated over the
  step's micro-batches (detached) and applied once per optimizer step (``after_optimizer_step``); log Z and its Adam
  moments are the component's checkpointed state.
- ``log_z="batch"`` (the BlocksWorld code's ``logpartition``, VarGrad): log Z of each prompt is estimated by
  -mean_k (log P_F - log R) over its group, so L_k = (zeta_k - mean_j zeta_j)^2 (needs whole groups per micro-batch).

Reward: lmpo's rewards are in [0, 1]; the Game24 code uses R = 100 for a solved puzzle and 0.001 otherwise (plus an
optional likelihood bonus); we interpolate log R = reward_temp * log(fail_reward + (success_reward - fail_reward) r),
exact at r in {0, 1}. The likelihood bonus (lambda sum_t r_t), the replay buffer and local search of the paper are
collection-side and not part of this loss (fidelity ``reconstructed`` for the reward map and the omitted pieces).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.base import LossOut, Stateful
from lmpo.methods.params import hp, ordered
from lmpo.registry import LOSSES

_BETAS, _EPS = (0.9, 0.999), 1e-8


@LOSSES.register("for_tb", paper="Flow of Reasoning: Efficient Training of LLM Policy with Divergent Thinking",
                 arxiv="2406.05673", fidelity="reconstructed")
@dataclass
class FlowOfReasoningTB(Stateful):
    """Trajectory balance (log Z + log P_F(tau) - log R(x))^2 per response, on every token of it.

    Args:
        log_z: "learned" (a scalar trained by Adam, the Game24 code) or "batch" (VarGrad over the group).
        log_z_lr: Adam step size of the learned log Z (0.1 in the authors' BlocksWorld task code).
        log_z_init: its initial value.
        success_reward / fail_reward: R at reward 1 and at reward 0 (100 and 0.001 in the Game24 code).
        reward_temp: alpha in log R = alpha log R_raw (the paper anneals it; fixed here).
    """

    log_z: str = hp("learned", choices=("learned", "batch"))
    log_z_lr: float = hp(0.1, ge=0)
    log_z_init: float = 0.0
    success_reward: float = hp(100.0, gt=0)
    fail_reward: float = hp(0.001, gt=0)
    reward_temp: float = hp(1.0, gt=0)
    needs: ClassVar[frozenset[str]] = frozenset()
    constraints: ClassVar[tuple] = (ordered("fail_reward", "success_reward"),)

    def initial_state(self) -> dict[str, Any]:
        return {"log_z": float(self.log_z_init), "m": 0.0, "v": 0.0, "t": 0, "pending_grad": 0.0, "pending_n": 0.0}

    def log_reward(self, rewards: Tensor) -> Tensor:
        r = rewards.clamp(0.0, 1.0)
        return self.reward_temp * torch.log(self.fail_reward + (self.success_reward - self.fail_reward) * r)

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask = batch.response_mask
        log_pf = ops.masked_sum(logprobs, mask, dim=-1)
        zeta = log_pf - self.log_reward(batch.rewards.to(logprobs.dtype))
        if self.log_z == "batch":
            log_z = -ops.group_mean(zeta, batch.group_ids)  # the variance itself (gradient through the mean)
        else:
            log_z = torch.full_like(zeta, self.state["log_z"])
            resid = (log_z + zeta).detach()
            self.state["pending_grad"] += float(2.0 * resid.sum())
            self.state["pending_n"] += float(resid.numel())
        per_seq = (log_z + zeta) ** 2
        metrics = {"loss/tb": per_seq.detach().mean(), "loss/log_z": log_z.detach().mean(),
                   "loss/log_pf": log_pf.detach().mean()}
        return LossOut(ops.zero_outside(per_seq[:, None].expand_as(logprobs), mask), metrics)

    def after_optimizer_step(self) -> None:
        """One Adam step on the learned log Z with the mean gradient of the step's trajectories; clears them."""
        s = self.state
        if self.log_z == "learned" and s["pending_n"] > 0:
            g = s["pending_grad"] / s["pending_n"]
            s["t"] += 1
            s["m"] = _BETAS[0] * s["m"] + (1 - _BETAS[0]) * g
            s["v"] = _BETAS[1] * s["v"] + (1 - _BETAS[1]) * g * g
            m_hat, v_hat = s["m"] / (1 - _BETAS[0] ** s["t"]), s["v"] / (1 - _BETAS[1] ** s["t"])
            s["log_z"] -= self.log_z_lr * m_hat / (math.sqrt(v_hat) + _EPS)
        s["pending_grad"], s["pending_n"] = 0.0, 0.0


PRESETS = {
    # FoR (arXiv:2406.05673): trajectory balance with a learned log Z (Game24 code: R = 100 / 0.001, Adam on log Z
    # at 0.1), the mean over trajectories of the squared residual; the advantage is computed but unused.
    "flow_of_reasoning": {
        "advantage": {"name": "grpo"},
        "loss": {"name": "for_tb", "log_z": "learned", "log_z_lr": 0.1, "success_reward": 100.0,
                 "fail_reward": 0.001},
        "aggregator": {"name": "seq_mean_token_mean"},
        "kl": {"beta": 0.0},
    },
}
