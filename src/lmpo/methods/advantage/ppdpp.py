"""PPDPP: the plug-and-play dialogue policy planner's REINFORCE credit, per-episode standardised discounted returns.

Paper: Deng et al., "Plug-and-Play Policy Planner for Large Language Model Powered Dialogue Agents", ICLR 2024,
arXiv:2311.00262 (code dengyang17/PPDPP). A small planner picks a dialogue act each turn; a frozen dialogue LLM turns
the act into the reply; a critic LLM's verdict on goal progress is the turn reward r_t. The planner is trained with
REINFORCE over each self-play episode:

  G_t = sum_{k >= t} gamma^{k-t} r_k,   G^_t = (G_t - mean_t G) / (std_t G + eps)  (within the episode, Bessel std,
  only when it has more than one turn),   L = - sum_t log pi(a_t | s_t) G^_t

In lmpo the trained policy is the planner: each policy turn of a ``rollout.mode: episodes`` row is its act (the
tokens it writes), the environment holds the rest (the frozen responder, the user simulator and the critic: its
per-turn rewards ``extras["turn_rewards"]``, e.g. from a judge shaper such as ``calm``). This advantage puts G^_t on
the tokens of turn t; the preset's ``reinforce`` loss with a per-sequence token sum gives - sum_t log pi(a_t) G^_t.

Differs from GRPO: no group baseline; each episode is its own baseline (its mean return over turns), so a turn is
credited for being better than the episode's other turns. Fidelity "reconstructed": the planner's act set,
the classifier head over it (RoBERTa in the paper) and the SFT stage on annotated acts are not part of this
component (a model lmpo loads writes its act as text); an episode of one turn keeps its raw return (no std to
divide by), as the code's standardisation applies only to longer episodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo.batch import RolloutBatch
from lmpo.methods.advantage.grpo import outcome_returns
from lmpo.methods.params import hp
from lmpo.methods.turns import discounted_turn_returns, played, turn_layout, turns_to_tokens
from lmpo.registry import ADVANTAGES


def standardised_returns(returns: Tensor, num_turns: Tensor, eps: float) -> Tensor:
    """(B, M) G^: each row's played returns minus their mean over (Bessel std + eps); raw for one-turn rows."""
    live = played(num_turns, returns.shape[1])
    n = num_turns.clamp_min(1).to(returns.dtype)[:, None]
    g = torch.where(live, returns, torch.zeros_like(returns))
    mean = g.sum(-1, keepdim=True) / n
    var = (torch.where(live, g - mean, torch.zeros_like(g)) ** 2).sum(-1, keepdim=True) / (n - 1).clamp_min(1)
    z = (g - mean) / (var.sqrt() + eps)
    return torch.where(live, torch.where(num_turns[:, None] > 1, z, g), torch.zeros_like(g))


@ADVANTAGES.register("ppdpp", paper="Plug-and-Play Policy Planner for Large Language Model Powered Dialogue Agents",
                     arxiv="2311.00262", fidelity="reconstructed")
@dataclass(frozen=True)
class PPDPPAdvantage:
    """Per-turn discounted returns standardised within each episode (arXiv:2311.00262; the code's REINFORCE).

    Args:
        gamma: the discount (code default 0.999). eps: added to the std.
    """

    gamma: float = hp(0.999, ge=0, le=1)
    eps: float = hp(1e-6, ge=0)
    needs: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, batch: RolloutBatch) -> Tensor:
        n, rewards = turn_layout(batch, outcome_returns(batch))
        return turns_to_tokens(standardised_returns(discounted_turn_returns(rewards, n, self.gamma), n, self.eps),
                               batch)


# Code defaults: gamma 0.999, REINFORCE (no ratio, no clipping), the episode's loss summed over its turns (the
# planner's act is one decision: here its tokens' log-probs summed), one update per batch, no KL.
PRESETS = {
    "ppdpp": {
        "advantage": {"name": "ppdpp", "gamma": 0.999},
        "loss": {"name": "reinforce"},
        "aggregator": {"name": "seq_mean_token_sum"},
        "kl": {"beta": 0.0},
    },
}
