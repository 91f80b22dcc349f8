"""EPO's critical-turn judge at rollout time: a second model marks the turns whose strategy mattered.

Paper: Liu et al. 2025, "EPO: Explicit Policy Optimization for Strategic Reasoning in LLMs via Reinforcement
Learning", arXiv:2502.12486 (code lxqpku/EPO). A judge LLM (GPT-4o in the paper) reads a finished episode and selects
the turns critical to reaching the goal; each selected turn gets process reward 1, which the discounted returns of
``advantage: epo_strategic`` (:mod:`lmpo.methods.advantage.epo_strategic`) then spread back over earlier turns.

Here the judge is any causal LM lmpo can load: after each turn (its observation included) it gives
p_t = sigmoid(logit(yes_token) - logit(no_token)) at the turn's last token (the scorer of
:mod:`lmpo.methods.shape.prorag_prm`), and turn t is critical when p_t > ``threshold``: ``extras["critical_turns"]``
(B, max_turns), 1 = critical.

Gaps filled (fidelity "reconstructed"): the paper's judge is prompted with the whole dialogue and names the critical
turns in text; a causal LM read after each turn, with a threshold, stands in for it (no judge prompt, no access to
later turns), and the judge must share the policy's tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lmpo.batch import RolloutBatch
from lmpo.methods.params import hp
from lmpo.methods.shape.prorag_prm import ProRAGPRM
from lmpo.registry import SHAPERS


@SHAPERS.register("epo_judge", paper="EPO: Explicit Policy Optimization for Strategic Reasoning in LLMs via "
                  "Reinforcement Learning (critical-turn judge)", arxiv="2502.12486", fidelity="reconstructed")
@dataclass
class EPOJudge(ProRAGPRM):
    """Writes ``extras["critical_turns"]``: 1 where a second model's yes-probability after the turn exceeds
    ``threshold`` (module docstring). Fields as :class:`ProRAGPRM`, plus ``threshold``."""

    threshold: float = hp(0.5, gt=0, lt=1)
    registry_name: ClassVar[str] = "epo_judge"

    def __call__(self, batch: RolloutBatch) -> RolloutBatch:
        if batch.turn_ids is None:
            return batch
        K = batch.extras["turn_rewards"].shape[1] if "turn_rewards" in batch.extras else int(batch.turn_ids.max()) + 1
        critical = (self.scores(batch, K) > self.threshold).float()
        return batch.replace(extras={**batch.extras, "critical_turns": critical})
