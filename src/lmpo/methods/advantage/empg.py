"""EMPG: Entropy-Modulated Policy Gradients, step-level rescaling of a trajectory advantage by relative entropy.

Paper: "Harnessing Uncertainty: Entropy-Modulated Policy Gradients for Long-Horizon LLM Agents", arXiv:2509.09265.

Step s of trajectory i (a turn, or a line of single-turn text) has entropy H_{i,s} = mean over its trained tokens of
the per-token policy entropy. Over all steps of the batch:
  H~ = (H - min H) / (max H - min H + 1e-8)                         (batch min-max normalisation)
  g(H_{i,s}) = exp(-k H~_{i,s}) / mean_{j,s'} exp(-k H~_{j,s'})     (self-calibrating: batch mean of g is 1)
  f(H_{i,s+1}) = exp(-k' H~_{i,s+1})                                (future clarity; 0 for a trajectory's last step)
  A_mod(i, s) = g(H_{i,s}) * A(i) + zeta * f(H_{i,s+1})
then A_mod is re-centred to zero mean over the batch's steps and broadcast to the tokens of step s; A(i) is the GRPO
advantage (arXiv:2402.03300). Confident steps are amplified, uncertain ones damped.

Differs from GRPO: advantages vary per step (by entropy) instead of being constant over the trajectory; with
k = 0, zeta = 0 and ``recenter=False`` it is exactly GRPO.

Gaps filled (fidelity "reconstructed"; equations from the card and the ARLArena port, the paper's tables unread):
- defaults k = k' = 1, zeta = 0.05 are the ARLArena port's, not per-task grid-search values;
- the final re-normalisation is a mean subtraction over steps (``recenter``), no std division;
- steps: ``turn_ids`` when the batch has them (on ``rollout.mode: episodes`` batches a step is a policy turn, the
  paper's agent step: its entropy is the mean over the turn's policy tokens, the observation tokens that share its
  turn id are never trained and never counted, and the clarity bonus looks at the episode's next turn); otherwise a new step starts after every token in ``newline_ids``
  (the tokenizer's ids whose text holds a line break; configure them for your tokenizer); with neither, the whole
  response is one step (then g rescales whole trajectories by their mean entropy);
- entropies are those of the policy before the update (``extras["entropy"]``, computed by the trainer because
  ``needs`` lists "entropy"); without them (outside the trainer) the GRPO advantage is returned unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.advantage.grpo import GRPOAdvantage
from lmpo.methods.params import Rule, hp, rule
from lmpo.registry import ADVANTAGES


def step_ids(batch: RolloutBatch, newline_ids: tuple[int, ...]) -> Tensor:
    """(B, T) long step index of every token, 0-based per row."""
    if batch.turn_ids is not None:
        # dense per-row ranks of the turn ids, so arbitrary (sorted) labels become 0, 1, 2, ...
        t = batch.turn_ids.long()
        change = torch.zeros_like(t)
        change[:, 1:] = (t[:, 1:] != t[:, :-1]).long()
        return change.cumsum(-1)
    ids = batch.response_ids
    if not newline_ids:
        return torch.zeros_like(ids)
    is_nl = torch.isin(ids, torch.tensor(newline_ids, device=ids.device)).long()
    return torch.cumsum(is_nl, -1) - is_nl  # the newline closes its own step


@ADVANTAGES.register("empg", paper="Harnessing Uncertainty: Entropy-Modulated Policy Gradients for Long-Horizon "
                     "LLM Agents", arxiv="2509.09265", fidelity="reconstructed")
@dataclass(frozen=True)
class EMPGAdvantage:
    """GRPO advantage rescaled per step by g(relative entropy) plus a future-clarity bonus.

    Args:
        k: sharpness of the step scaling g. k_future: sharpness of the clarity bonus f. zeta: bonus weight.
        recenter: subtract the batch mean of A_mod over steps. newline_ids: token ids that end a step (single-turn).
        scale_by_std: GRPO's std normalisation of A(i).
    """

    k: float = hp(1.0, ge=0)
    k_future: float = hp(1.0, ge=0)
    zeta: float = hp(0.05, ge=0)
    recenter: bool = True
    newline_ids: tuple[int, ...] = hp((), ge=0)
    scale_by_std: bool = True
    eps: float = 1e-8
    needs: ClassVar[frozenset[str]] = frozenset({"entropy"})
    constraints: ClassVar[tuple[Rule, ...]] = (
        rule(lambda newline_ids: all(isinstance(i, int) for i in newline_ids),
             "{newline_ids} must be token ids (integers)"),
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "newline_ids", tuple(self.newline_ids))

    def __call__(self, batch: RolloutBatch) -> Tensor:
        mask = batch.response_mask
        base = GRPOAdvantage(scale_by_std=self.scale_by_std)(batch)  # (B, T), constant per row
        ent = batch.extras.get("entropy")
        if ent is None:
            return base
        B, T = mask.shape
        seq_adv = (base.double() * mask).sum(-1) / mask.sum(-1).clamp_min(1)  # A(i)
        sid = step_ids(batch, self.newline_ids)
        S = int(sid.max()) + 1 if sid.numel() else 1
        flat = (torch.arange(B, device=sid.device)[:, None] * S + sid)[mask]
        sums = torch.zeros(B * S, dtype=torch.float64, device=mask.device).index_add(0, flat, ent.detach().double()[mask])
        cnt = torch.zeros(B * S, dtype=torch.float64, device=mask.device).index_add(0, flat, torch.ones_like(flat, dtype=torch.float64))
        real = cnt > 0  # steps with at least one trained token
        H = sums / cnt.clamp_min(1)
        if not real.any():
            return base
        lo, hi = H[real].min(), H[real].max()
        Hn = (H - lo) / (hi - lo + self.eps)
        e = torch.exp(-self.k * Hn)
        g = e / e[real].mean()
        # future clarity: the next *real* step of the same row (steps are consecutive indices within a row)
        Hn2, real2 = Hn.view(B, S), real.view(B, S)
        nxt = torch.zeros(B, S, dtype=torch.float64, device=mask.device)
        nxt[:, :-1] = ops.zero_outside(torch.exp(-self.k_future * Hn2[:, 1:]), real2[:, 1:])
        a_mod = g.view(B, S) * seq_adv[:, None] + self.zeta * nxt
        if self.recenter:
            a_mod = a_mod - a_mod[real2].mean()
        out = a_mod.reshape(-1)[(torch.arange(B, device=sid.device)[:, None] * S + sid).clamp_max(B * S - 1)]
        return ops.zero_outside(out.to(torch.float32), mask)


# ARLArena port defaults (k = k' = 1, zeta = 0.05) on GRPO advantages; the loss is GRPO's.
PRESETS = {
    "empg": {
        "advantage": {"name": "empg", "k": 1.0, "k_future": 1.0, "zeta": 0.05},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "seq_mean_token_mean"},
        "kl": {"beta": 0.0},
    },
}
