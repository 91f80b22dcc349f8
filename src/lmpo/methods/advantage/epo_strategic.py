"""EPO (strategic reasoning): return-weighted NLL of each turn, with discounted, max-abs-normalised per-turn returns.

Paper: Liu et al. 2025, "EPO: Explicit Policy Optimization for Strategic Reasoning in LLMs via Reinforcement
Learning", arXiv:2502.12486 (ACL 2025; code lxqpku/EPO: ``LLaMA-Factory/data_new/utils/preprocessing.py`` for the
returns, ``LLaMA-Factory/src/llamafactory/train/sft/trainer.py::reward_weighted_loss`` for the loss).

An episode has S policy (strategy) turns with per-turn rewards r_1..r_S: r_t = 1 when the judge marks turn t as
critical for reaching the goal, the outcome score on the last turn (unless marked), 0 otherwise. Then
  G_t     = sum_{k=t}^{S} gamma^{k-t} r_k                        (discounted return of turn t)
  Ghat_t  = G_t / max_k |G_k|                                    (max-abs normalised within the episode; 0 if all 0)
  L_ep    = -(1/S) sum_t Ghat_t * (1/|turn t|) sum_{tokens j of t} log pi(o_j)     (the released code's loss)
and the batch loss is the mean of L_ep over episodes. This component produces per-token weights
w_j = Ghat_t / (|turn t| * S) (``segment_mean=True``), so that the ``reinforce`` loss (-w log pi) with the
``seq_mean_token_sum`` aggregator is exactly the code's objective; with ``segment_mean=False`` the weight is Ghat_t
itself (the paper's text: "each turn's NLL weighted by its return"). No baseline, no ratio, no reference model.

Differs from GRPO: no group baseline; credit is per turn, from discounted per-turn returns of the episode itself
(every turn of a successful episode is reinforced, earlier ones discounted), normalised per episode.

Gaps filled (fidelity "reconstructed"):
- the per-turn rewards are ``extras["turn_rewards"]`` (``rollout.mode: episodes``: the environment's reward of each
  turn, so the outcome score sits on the final turn as in the paper); the paper's process rewards come from a
  GPT-4o judge choosing critical turns; the ``epo_judge`` shaper (:mod:`lmpo.methods.shape.epo_judge`, any model
  lmpo can load) or any scorer writes them as ``extras["critical_turns"]`` (B, max_turns; nonzero = critical), and
  each marked turn's reward becomes 1.
  Without per-turn rewards (single-turn text) the episode is one turn with reward ``batch.rewards``;
- the paper trains LLM_s offline on collected self-play data, iteratively; here it trains on-policy on the step's
  episodes (one self-play iteration per step);
- the paper's acting agent LLM_d (a second model turning strategies into actions) is not part of the rollout: the
  policy acts itself, so the "strategy" is the policy's turn.
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


def turn_rewards(batch: RolloutBatch) -> tuple[Tensor, Tensor]:
    """(per-turn rewards (B, K) float64, turns played (B,) long); critical turns set to 1."""
    ex = batch.extras
    if "turn_rewards" in ex and batch.turn_ids is not None:
        r = ex["turn_rewards"].reshape(batch.batch_size, -1).double().clone()
        if "num_turns" in ex:
            n = ex["num_turns"].reshape(-1).long()
        else:  # the last turn holding a trained token
            t = torch.where(batch.response_mask, batch.turn_ids, torch.full_like(batch.turn_ids, -1))
            n = t.max(-1).values + 1
        crit = ex.get("critical_turns")
        if crit is not None:
            r = torch.where(crit.reshape(r.shape) != 0, torch.ones_like(r), r)
        return r, n.clamp(0, r.shape[1])
    return batch.rewards.double()[:, None], torch.ones(batch.batch_size, dtype=torch.long)


def discounted_normalised(r: Tensor, n: Tensor, gamma: float) -> Tensor:
    """(B, K) Ghat: discounted returns over each row's first n turns, divided by their max |G| (0 past n)."""
    B, K = r.shape
    live = torch.arange(K, device=r.device)[None, :] < n[:, None]
    r = r * live
    G = torch.zeros_like(r)
    acc = torch.zeros(B, dtype=r.dtype, device=r.device)
    for t in reversed(range(K)):
        acc = gamma * acc + r[:, t]
        G[:, t] = acc
    G = G * live
    top = G.abs().max(-1, keepdim=True).values
    return torch.where(top > 0, G / torch.where(top > 0, top, torch.ones_like(top)), torch.zeros_like(G))


@ADVANTAGES.register("epo_strategic", paper="EPO: Explicit Policy Optimization for Strategic Reasoning in LLMs via "
                     "Reinforcement Learning", arxiv="2502.12486", fidelity="reconstructed")
@dataclass(frozen=True)
class EPOStrategicAdvantage:
    """Per-token weight Ghat_t of the token's turn (module docstring), for the ``reinforce`` loss.

    Args:
        gamma: discount over turns (code: 0.99).
        segment_mean: divide by the turn's token count and the episode's turn count (the code's loss), so that
            ``seq_mean_token_sum`` aggregation gives the code's mean over turns of turn-mean NLLs.
    """

    gamma: float = hp(0.99, ge=0, le=1)
    segment_mean: bool = True
    needs: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, batch: RolloutBatch) -> Tensor:
        mask = batch.response_mask
        r, n = turn_rewards(batch)
        ghat = discounted_normalised(r, n, self.gamma)  # (B, K)
        turns = batch.turn_ids.long() if batch.turn_ids is not None and ghat.shape[1] > 1 \
            else torch.zeros_like(mask, dtype=torch.long)
        turns = turns.clamp(0, ghat.shape[1] - 1)
        w = torch.gather(ghat, 1, turns)
        if self.segment_mean:
            K = ghat.shape[1]
            onehot = torch.nn.functional.one_hot(turns, K).double() * mask[..., None]
            length = onehot.sum(1)  # (B, K) trained tokens per turn
            segments = (length > 0).sum(-1).clamp_min(1)  # turns with a trained token (the code's segments)
            w = w / torch.gather(length.clamp_min(1), 1, turns) / segments[:, None]
        return ops.zero_outside(w, mask).to(torch.float32)


# The released LLaMA-Factory recipe: gamma 0.99, lr 1e-6, cosine schedule, warmup 0.03, no reference model.
PRESETS = {
    "epo_strategic": {
        "advantage": {"name": "epo_strategic", "gamma": 0.99},
        "loss": {"name": "reinforce"},
        "aggregator": {"name": "seq_mean_token_sum"},
        "kl": {"beta": 0.0},
    },
}
