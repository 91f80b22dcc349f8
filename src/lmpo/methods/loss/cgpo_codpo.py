"""CGPO's CODPO: Xu et al., "The Perfect Blend: Redefining RLHF with Mixture of Judges", arXiv:2409.20370 (Sec. 4,
constrained online DPO). A thin name over :class:`~lmpo.methods.loss.online_pref.OnlinePreference` with CODPO's pair
rule and loss as defaults (no second copy of the pair building or the DPO maths):

    y+ = argmax_{i: J_i = 1} r_i,   y- = argmin_{i: J_i = 0} r_i  (argmin over all rows when every row passes)
    L = -log sigmoid(beta * ((log pi(y+) - log pi(y-)) - (log pi_ref(y+) - log pi_ref(y-)))) - (lambda / |y+|) log pi(y+)

averaged over the prompts that have a satisfying row (``pairs: constrained``; the loss is ``dpo_nll`` with
``alpha = lambda``). J_i = 1 when the row's outcome reward is above ``feasible_above`` (0: ``cgpo_reward`` gives a
violating row exactly 0). Defaults of the TRL port: beta 0.1, lambda 5.0.

Reconstructed (``fidelity="reconstructed"``): the paper's text could not be read here; the rule and defaults follow
the TRL port (a contributed branch, not a release) as summarised on the method card, so no equation numbers are given.
Tied best / worst rows share the pair weight (``online_pref``'s tie rule); the paper's multi-task strata are not
implemented.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmpo.methods.loss.online_pref import PAIR_MODES, OnlinePreference
from lmpo.methods.params import hp
from lmpo.registry import LOSSES


@LOSSES.register("codpo", paper="The Perfect Blend: Redefining RLHF with Mixture of Judges (CGPO, CODPO)",
                 arxiv="2409.20370", fidelity="reconstructed")
@dataclass(frozen=True)
class CODPO(OnlinePreference):
    """``online_pref`` with CODPO's defaults: (best feasible, worst violating) pairs, DPO + lambda x chosen NLL."""

    preference: dict[str, Any] = field(default_factory=lambda: {"name": "dpo_nll", "beta": 0.1, "alpha": 5.0})
    pairs: str = hp("constrained", choices=PAIR_MODES)

    __hash__ = OnlinePreference.__hash__
