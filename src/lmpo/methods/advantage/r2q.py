"""r-to-Q*: DPO's implicit per-token reward as a token-level credit signal.

Rafailov, Hejna, Park, Finn 2024, "From r to Q*: Your Language Model is Secretly a Q-Function", arXiv:2404.12358.
In the token-level MDP with KL regularisation the optimal policy satisfies (Sec. 4, Eq. 9-10 of v2)

    beta log( pi*(a_t|s_t) / pi_ref(a_t|s_t) ) = Q*(s_t, a_t) - V*(s_t),

so a DPO-trained policy's per-token log-ratio ``r^_t = beta (log pi(a_t|s_t) - log pi_ref(a_t|s_t))`` is an estimate
of the optimal advantage of token t, and the sum over a response telescopes to the sequence-level implicit reward of
DPO (arXiv:2305.18290 Sec. 5): ``sum_t r^_t = beta log(pi(y|x) / pi_ref(y|x))`` (:func:`token_implicit_rewards`).
The paper uses it for credit assignment (Sec. 5.1): tokens that made a response worse get low r^_t.

This component exposes it to the RL pipeline as advantages any policy loss consumes:

    A_t = base_t + coef * c_t,   c_t = r^_t (``credit: token``)   or   c_t = sum_{s >= t} r^_s (``credit: to_go``)

``base`` is any registered advantage (default ``grpo``: the outcome signal); ``to_go`` telescopes to the
return-to-go minus V*(s_t). log pi is read from the batch's ``sampler_logprobs`` (the policy that sampled the batch,
available before the update on every schedule), log pi_ref from ``ref_logprobs``.

Use it where the policy is a DPO-type model: trained with a preference loss in the same run (``loss: online_pref``,
preset ``online_dpo_q``) or started from a DPO checkpoint. Without such a loss, c_t is beta x (minus) the k1 KL
estimate, a bonus for drifting from the reference: keep ``coef`` small or 0 there.

Fidelity "exact" for the credit read-out (the identity is the paper's); how the credit is combined with an outcome
advantage (``base + coef * c``) is this library's wiring, not a method of the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.loss.online_pref import build_spec
from lmpo.methods.params import hp
from lmpo.registry import ADVANTAGES

CREDITS = ("token", "to_go")


def token_implicit_rewards(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, beta: float) -> Tensor:
    """r^_t = beta (log pi - log pi_ref) per token (B, T), 0 off the mask; sums to DPO's implicit reward."""
    return ops.zero_outside(beta * (logprobs - ref_logprobs), mask)


def reverse_cumsum(x: Tensor) -> Tensor:
    """sum_{s >= t} x_s along the last dimension."""
    return x.flip(-1).cumsum(-1).flip(-1)


@ADVANTAGES.register("implicit_q", paper="From r to Q*: Your Language Model is Secretly a Q-Function",
                     arxiv="2404.12358")
@dataclass(frozen=True)
class ImplicitQCredit:
    """A base advantage plus coef x DPO's implicit per-token reward beta log(pi/pi_ref) (or its sum to go).

    Args:
        beta: the DPO temperature of the implicit reward.
        credit: ``token`` (r^_t, the implicit optimal advantage) or ``to_go`` (sum_{s>=t} r^_s).
        coef: weight of the credit in the advantage.
        base: a registered advantage (``{name: grpo}``) added to it, or null for the credit alone.
    """

    beta: float = hp(0.1, gt=0)
    credit: str = hp("token", choices=CREDITS)
    coef: float = hp(1.0, ge=0)
    base: dict[str, Any] | None = field(default_factory=lambda: {"name": "grpo"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "_base", build_spec(ADVANTAGES, self.base, "advantage.base"))

    __hash__ = object.__hash__

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({"ref_logprobs"}) | frozenset(getattr(self._base, "needs", frozenset()))

    def __call__(self, batch: RolloutBatch) -> Tensor:
        mask = batch.response_mask
        r = token_implicit_rewards(batch.sampler_logprobs.float(), batch.ref_logprobs.float(), mask, self.beta)
        c = ops.zero_outside(reverse_cumsum(r), mask) if self.credit == "to_go" else r
        adv = self.coef * c
        if self._base is not None:
            adv = adv + self._base(batch).to(adv.dtype)
        return ops.zero_outside(adv, mask).to(torch.float32)


PRESETS = {
    # Online DPO (beta 0.1, as online_dpo) whose policy's implicit per-token reward (r-to-Q*, arXiv:2404.12358) also
    # drives a REINFORCE term on the same rollouts: A_t = GRPO outcome advantage + r^_t.
    "online_dpo_q": {
        "advantage": {"name": "implicit_q", "beta": 0.1, "credit": "token", "coef": 1.0, "base": {"name": "grpo"}},
        "loss": {"name": "online_pref", "preference": {"name": "dpo", "beta": 0.1}, "pairs": "best_worst",
                 "rl": {"name": "reinforce"}, "rl_weight": 1.0},
        "aggregator": {"name": "seq_mean_token_mean"},
        "rollout": {"num_generations": 2, "temperature": 0.9},
        "kl": {"beta": 0.0},
    },
}
