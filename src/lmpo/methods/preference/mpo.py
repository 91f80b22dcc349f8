"""MPO: Enhancing the Reasoning Ability of Multimodal Large Language Models via Mixed Preference Optimization.

Wang, Chen, Wang, Cao, Liu, Gao, Zhu, Zhu, Lu, Qiao, Dai (2024), arXiv:2411.10442, Sec. 3.2 (Eq. 1 and the three terms):

    L_MPO = w_p * L_p + w_q * L_q + w_g * L_g
    L_p = DPO's sigmoid loss (relative preference);  L_q = BCO's loss (absolute quality of each response, the
    chosen labelled good and the rejected bad);  L_g = the chosen response's token-mean NLL (generation / SFT)

with weights 0.8, 0.2, 1.0 and beta 0.1 (the paper's settings, also TRL's MPO recipe:
``loss_type=["sigmoid", "bco_pair", "sft"]``, ``loss_weights=[0.8, 0.2, 1.0]``). The paper's BCO keeps a running
reward shift delta; as TRL's ``bco_pair``, lmpo fixes it (``delta``, default 0): fidelity "reconstructed".

The issue's card #72 ("Mixed Preference Optimization", arXiv:2403.19443, Xiao et al.) is a different method of the
same name: a data recipe (split pairs into easy / hard by a reward model's gap, DPO on the easy set, then PPO on the
hard prompts with the DPO model as reference); its loss is plain DPO, see docs/preference.md. The loss described by
the issue ("preference + quality + generation losses") is this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F

from lmpo.batch import PreferenceBatch
from lmpo.methods.base import PairLogps, PreferenceOut, hp
from lmpo.methods.preference.bco import bco_pair_loss
from lmpo.methods.preference.dpo import chosen_nll, implicit_rewards, reward_metrics
from lmpo.registry import PREFERENCE_LOSSES


@PREFERENCE_LOSSES.register("mpo", paper="Enhancing the Reasoning Ability of Multimodal Large Language Models via "
                            "Mixed Preference Optimization", arxiv="2411.10442", fidelity="reconstructed")
@dataclass(frozen=True)
class MPO:
    """w_p x DPO + w_q x BCO + w_g x NLL of the chosen response."""

    beta: float = hp(0.1, gt=0)
    preference_weight: float = hp(0.8, ge=0)
    quality_weight: float = hp(0.2, ge=0)
    generation_weight: float = hp(1.0, ge=0)
    delta: float = 0.0
    needs: ClassVar[frozenset[str]] = frozenset({"ref_logprobs"})

    def __call__(self, batch: PreferenceBatch, policy: PairLogps, ref: PairLogps | None) -> PreferenceOut:
        chosen, rejected = implicit_rewards(batch, policy, ref, self.beta)
        lp = -F.logsigmoid(chosen - rejected)
        lq = bco_pair_loss(chosen, rejected, self.delta)
        lg = chosen_nll(batch, policy)
        loss = self.preference_weight * lp + self.quality_weight * lq + self.generation_weight * lg
        return PreferenceOut(loss, {"loss/dpo": lp.detach().mean(), "loss/bco": lq.detach().mean(),
                                    "loss/nll": lg.detach().mean(), **reward_metrics(chosen, rejected)})


PRESETS = {
    # MPO (arXiv:2411.10442): weights 0.8 / 0.2 / 1.0, beta 0.1.
    "mpo": {"preference": {"loss": {"name": "mpo", "beta": 0.1}}},
}
