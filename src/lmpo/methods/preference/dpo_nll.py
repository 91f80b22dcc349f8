"""DPO + NLL: Iterative Reasoning Preference Optimization.

Pang, Yuan, Cho, He, Sukhbaatar, Weston (2024), arXiv:2404.19733, Sec. 2 (the DPO+NLL loss of one iteration):

    L = -log sigmoid( beta * h ) + alpha * ( -log pi(y_w|x) / |y_w| )

DPO's sigmoid loss on the log-ratio margin ``h`` plus the length-normalised NLL of the chosen response, which keeps
the chosen likelihood from falling (the paper's ablation: DPO alone lowers it). Defaults beta 0.1, alpha 1 (the
paper's). TRL: ``rpo_alpha`` / ``loss_type=["sigmoid", "sft"]`` with weights ``[1, alpha]``; TRL's NLL is a token
mean over the batch, lmpo's a mean per pair (equal when the chosen responses have equal lengths). The iteration loop
of the paper (generate, verify, build pairs, train) is the online side of lmpo's preference stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F

from lmpo.batch import PreferenceBatch
from lmpo.methods.base import PairLogps, PreferenceOut, hp
from lmpo.methods.preference.dpo import chosen_nll, implicit_rewards, reward_metrics
from lmpo.registry import PREFERENCE_LOSSES


@PREFERENCE_LOSSES.register("dpo_nll", paper="Iterative Reasoning Preference Optimization", arxiv="2404.19733")
@dataclass(frozen=True)
class DPONLL:
    """DPO plus alpha x the chosen response's token-mean NLL."""

    beta: float = hp(0.1, gt=0)
    alpha: float = hp(1.0, ge=0)
    needs: ClassVar[frozenset[str]] = frozenset({"ref_logprobs"})

    def __call__(self, batch: PreferenceBatch, policy: PairLogps, ref: PairLogps | None) -> PreferenceOut:
        chosen, rejected = implicit_rewards(batch, policy, ref, self.beta)
        dpo = -F.logsigmoid(chosen - rejected)
        nll = chosen_nll(batch, policy)
        loss = dpo + self.alpha * nll
        return PreferenceOut(loss, {"loss/dpo": dpo.detach().mean(), "loss/nll": nll.detach().mean(),
                                    **reward_metrics(chosen, rejected)})


PRESETS = {
    # Iterative RPO (arXiv:2404.19733): beta 0.1, NLL weight 1.
    "dpo_nll": {"preference": {"loss": {"name": "dpo_nll", "beta": 0.1, "alpha": 1.0}}},
}
