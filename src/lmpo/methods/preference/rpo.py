"""RPO: Provably Mitigating Overoptimization in RLHF: Your SFT Loss is Implicitly an Adversarial Regularizer.

Liu, Lu, Zhang, Liu, Guo, Yang, Blanchet, Wang (2024), arXiv:2405.16436, the RPO objective (Sec. 4, from the
max-min problem max_pi min_r { L_MLE(r) / eta + E[r(x, pi) - r(x, pi_base)] - beta KL(pi || pi_ref) }):

    L_RPO = -log sigmoid( beta * h ) + eta * beta * ( -log pi(y_base|x) )

with ``h`` DPO's log-ratio margin and, as in the paper's LLM experiments, ``y_base = y_w`` (the chosen response);
``log pi(y|x)`` is the sequence log-prob (a sum over tokens). The SFT term is the pessimism against an adversarial
reward model, so the chosen likelihood does not collapse. Property: eta = 0 is DPO. Defaults: the paper does not
state beta or eta in what we could read; we use beta 0.1 (DPO's) and eta 1.0. Differs from ``dpo_nll``
(Iterative RPO, TRL's ``rpo_alpha``) in the NLL's weight (eta * beta) and scale (summed, not token-averaged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F

from lmpo.batch import PreferenceBatch
from lmpo.methods.base import PairLogps, PreferenceOut, hp
from lmpo.methods.preference.dpo import implicit_rewards, reward_metrics, sequence_logps
from lmpo.registry import PREFERENCE_LOSSES


@PREFERENCE_LOSSES.register("rpo", paper="Provably Mitigating Overoptimization in RLHF: Your SFT Loss is "
                            "Implicitly an Adversarial Regularizer", arxiv="2405.16436")
@dataclass(frozen=True)
class RPO:
    """DPO plus eta * beta x the chosen response's summed NLL (the SFT loss as adversarial regulariser)."""

    beta: float = hp(0.1, gt=0)
    eta: float = hp(1.0, ge=0)
    needs: ClassVar[frozenset[str]] = frozenset({"ref_logprobs"})

    def __call__(self, batch: PreferenceBatch, policy: PairLogps, ref: PairLogps | None) -> PreferenceOut:
        chosen, rejected = implicit_rewards(batch, policy, ref, self.beta)
        dpo = -F.logsigmoid(chosen - rejected)
        nll = -sequence_logps(batch, policy)[0]
        loss = dpo + self.eta * self.beta * nll
        return PreferenceOut(loss, {"loss/dpo": dpo.detach().mean(), "loss/nll": nll.detach().mean(),
                                    **reward_metrics(chosen, rejected)})


PRESETS = {
    # RPO (arXiv:2405.16436): beta 0.1, eta 1.0 (not stated in the paper; see the module docstring).
    "rpo": {"preference": {"loss": {"name": "rpo", "beta": 0.1, "eta": 1.0}}},
}
