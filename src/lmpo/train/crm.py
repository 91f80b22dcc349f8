"""CRM: Zhang et al., "Two Minds Better Than One: Collaborative Reward Modeling for LLM Alignment",
arXiv:2505.10597 (Sec. 3: peer review; the curriculum is not implemented).

Two reward models r_A and r_B are trained side by side on the same mini-batches. Each reviews the batch for the
*other*: with margins m_M = r_M(x, y_w) - r_M(x, y_l) (detached), A trains on the k pairs B is most confident about
and B on the k pairs A is most confident about, k = ceil((1 - tau(t)) |B|), so noisy (flipped) pairs, which the
peer scores with a negative margin, are left out, and no model filters its own data (co-teaching). Each model's loss
is the Bradley-Terry loss on its selected pairs.

In lmpo: ``stage: reward_model`` with ``scorer.objective: crm``. Gaps filled (``reconstructed``; the paper's
schedule and ratios were not recovered): tau(t) = ``crm_drop_rate`` * min(1, t / ``crm_ramp_steps``) (the
co-teaching ramp), ties in margin go to the earlier pair, the curriculum (easy to hard ordering) is left out, and
model A is the reward model the run yields (``reward_model`` with the run's path scores with A).
What differs from plain BT training: only which pairs each model learns from; tau = 0 is two independent RMs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PeerPair(nn.Module):
    """Two scorers trained together; the pair scores with ``a`` (evaluation and use)."""

    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.a(ids, mask)


def drop_rate(step: int, tau: float, ramp: int) -> float:
    """tau(t): the fraction of each batch a reviewer drops, ramped linearly to ``tau`` over ``ramp`` steps."""
    return tau * min(1.0, step / ramp) if ramp > 0 else tau


def peer_select(margins: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` largest margins (the earlier pair first among equals), ascending."""
    order = sorted(range(len(margins)), key=lambda i: (-float(margins[i]), i))
    return torch.tensor(sorted(order[:keep]), dtype=torch.long)


def crm_step(pair: PeerPair, rewards_fn, batch: list[dict], step: int, tau: float, ramp: int
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """The two models' summed BT losses on the pairs their peers selected; ``rewards_fn(model, rows)`` gives
    (r_chosen, r_rejected) with gradients."""
    (ca, ra), (cb, rb) = rewards_fn(pair.a, batch), rewards_fn(pair.b, batch)
    ma, mb = (ca - ra).detach(), (cb - rb).detach()
    keep = max(1, math.ceil((1 - drop_rate(step, tau, ramp)) * len(batch)))
    for_a, for_b = peer_select(mb, keep), peer_select(ma, keep)  # A learns what B vouches for, and back
    margin = torch.tensor([r["margin"] for r in batch])
    loss_a = -F.logsigmoid(ca[for_a] - ra[for_a] - margin[for_a]).mean()
    loss_b = -F.logsigmoid(cb[for_b] - rb[for_b] - margin[for_b]).mean()
    metrics = {"crm/kept_frac": keep / len(batch), "crm/accuracy_b": float((mb > 0).float().mean()),
               "crm/agreement": float(((ma > 0) == (mb > 0)).float().mean())}
    return loss_a + loss_b, {"acc": float((ma > 0).float().mean()), **metrics}
