"""DPO: Direct Preference Optimization: Your Language Model is Secretly a Reward Model.

Rafailov, Sharma, Mitchell, Ermon, Manning, Finn (2023), arXiv:2305.18290, Eq. 7:

    L_DPO = -log sigmoid( beta * [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )

with sequence log-probs summed over the response tokens. The implicit reward of a response is
``beta * (log pi(y|x) - log pi_ref(y|x))`` (Sec. 5); its chosen/rejected means, margin and accuracy are the metrics
TRL's DPOTrainer logs under the same names. ``label_smoothing`` > 0 is the conservative DPO of Mitchell (2023)
("A note on DPO with noisy preferences"): the loss mixes both label directions,
``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``. ``length_normalize`` averages each log-ratio over its
response's tokens instead of summing it (TRL's ``loss_type="sigmoid_norm"``; not in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from lmpo.batch import PreferenceBatch
from lmpo.methods.base import PairLogps, PreferenceOut, hp
from lmpo.ops import masked_sum
from lmpo.registry import PREFERENCE_LOSSES


def implicit_rewards(batch: PreferenceBatch, policy: PairLogps, ref: PairLogps, beta: float,
                     average: bool = False) -> tuple:
    """``beta * (log pi - log pi_ref)`` summed (``average``: averaged) over each response: (chosen (N,), rejected
    (N,)), with gradient through the policy only (the reference is detached)."""
    chosen = masked_sum(policy.chosen - ref.chosen.detach(), batch.chosen_mask, dim=-1)
    rejected = masked_sum(policy.rejected - ref.rejected.detach(), batch.rejected_mask, dim=-1)
    if average:
        chosen = chosen / batch.chosen_mask.sum(-1).clamp_min(1)
        rejected = rejected / batch.rejected_mask.sum(-1).clamp_min(1)
    return beta * chosen, beta * rejected


def sequence_logps(batch: PreferenceBatch, logps: PairLogps, average: bool = False) -> tuple:
    """Each response's log-prob summed over its tokens (or averaged: ``average``): (chosen (N,), rejected (N,))."""
    c = masked_sum(logps.chosen, batch.chosen_mask, dim=-1)
    r = masked_sum(logps.rejected, batch.rejected_mask, dim=-1)
    if average:
        c = c / batch.chosen_mask.sum(-1).clamp_min(1)
        r = r / batch.rejected_mask.sum(-1).clamp_min(1)
    return c, r


def chosen_nll(batch: PreferenceBatch, policy: PairLogps) -> torch.Tensor:
    """The SFT term on the chosen response: its token-mean negative log-likelihood per pair (N,)."""
    return -sequence_logps(batch, policy, average=True)[0]


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's ``rewards/*`` metrics from implicit rewards (N,) of the chosen and rejected responses."""
    c, r = chosen.detach(), rejected.detach()
    return {"rewards/chosen": c.mean(), "rewards/rejected": r.mean(), "rewards/margins": (c - r).mean(),
            "rewards/accuracies": (c > r).float().mean()}


@PREFERENCE_LOSSES.register("dpo", paper="Direct Preference Optimization: Your Language Model is Secretly a Reward "
                            "Model", arxiv="2305.18290")
@dataclass(frozen=True)
class DPO:
    """DPO (sigmoid loss) on the reference-relative log-ratio margin; label_smoothing > 0 is conservative DPO."""

    beta: float = hp(0.1, gt=0)
    label_smoothing: float = hp(0.0, ge=0, lt=0.5)
    length_normalize: bool = False
    needs: ClassVar[frozenset[str]] = frozenset({"ref_logprobs"})

    def __call__(self, batch: PreferenceBatch, policy: PairLogps, ref: PairLogps | None) -> PreferenceOut:
        chosen, rejected = implicit_rewards(batch, policy, ref, self.beta, self.length_normalize)
        h = chosen - rejected
        loss = -(1 - self.label_smoothing) * F.logsigmoid(h) - self.label_smoothing * F.logsigmoid(-h)
        return PreferenceOut(loss, {"loss/dpo": loss.detach().mean(), **reward_metrics(chosen, rejected)})


PRESETS = {
    # DPO (arXiv:2305.18290): beta 0.1 (Sec. 6, the value of its summarisation and dialogue runs; TRL's default).
    "dpo": {"preference": {"loss": {"name": "dpo", "beta": 0.1}}},
}
