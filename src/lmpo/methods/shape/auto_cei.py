"""Auto-CEI: a length-aware "I don't know" reward with an automatic curriculum on its centre.

Paper: Zhao et al. 2025 (ICLR), "Automatic Curriculum Expert Iteration for Reliable LLM Reasoning",
arXiv:2410.07627; forms from the paper's Sec. 3 and the official code (utils.py, curriculum.py).
- Reward: R = +1 for a correct answer, -1 for a wrong one, and for an IDK response with n reasoning steps
      R_IDK(n) = 2 / (1 + exp(-c2 (n - c1))) - 1 = tanh(c2 (n - c1) / 2)                   (in (-1, 1))
  so giving up is rewarded only after trying for about c1 steps.
- Initialisation: c1 = mean #steps of IDK responses + delta, delta = min(0.2 sigma, 0.5); c2 = ln(10) / (4 sigma),
  sigma = std of #steps over all responses.
- Curriculum: f = (1 - lambda) * precision + lambda * (1 - IDK rate), precision = correct / answered; c1 moves by
  delta per curriculum round and the direction flips whenever f drops (hill climbing).

Differs from GRPO: the outcome reward is replaced by the three-way reward above, whose IDK branch is moved by a
stateful curriculum (``state_dict`` / ``load_state_dict``, so it survives ``--resume``).

Gaps filled (fidelity "reconstructed"):
- the paper optimises with expert iteration (resampling by exp(R/T), SFT on non-wrong samples); here the shaped
  reward feeds the configured policy-gradient update (GRPO in the preset);
- the curriculum reads f from the training rollouts (every ``update_every`` shaper calls) rather than from a separate
  validation pass; the first direction is +1 (towards more assertive answers);
- c1/c2 are initialised from the first batch seen (with no IDK response, from the mean #steps of all responses);
- steps are the non-empty segments of the completion split at newlines and sentence ends (". ").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.base import Stateful
from lmpo.methods.params import Rule, hp, rule
from lmpo.registry import SHAPERS

_SPLIT = re.compile(r"\n|(?<=\.)\s")


def count_steps(text: str) -> int:
    """Reasoning steps of a response: non-empty segments split at newlines and sentence ends."""
    return sum(1 for s in _SPLIT.split(text) if s.strip())


def idk_reward(n: Tensor, c1: float, c2: float) -> Tensor:
    """R_IDK(n) = 2 / (1 + exp(-c2 (n - c1))) - 1, written as tanh(c2 (n - c1) / 2)."""
    return torch.tanh(0.5 * c2 * (n - c1))


def objective(precision: float, idk_rate: float, lam: float) -> float:
    """Auto-CEI's curriculum objective f = (1 - lambda) precision + lambda (1 - IDK rate)."""
    return (1.0 - lam) * precision + lam * (1.0 - idk_rate)


@SHAPERS.register("auto_cei", paper="Automatic Curriculum Expert Iteration for Reliable LLM Reasoning",
                  arxiv="2410.07627", fidelity="reconstructed")
@dataclass
class AutoCEI(Stateful):
    """+1 correct / -1 wrong / tanh(c2 (n - c1) / 2) for "I don't know", with c1 hill-climbed on f.

    Args:
        idk_phrase: a completion containing it (case-insensitive) is an IDK response.
        correct_threshold: the task reward at or above which an answer is correct.
        lam: lambda, the precision vs. IDK-rate trade-off of the curriculum objective.
        update_every: shaper calls (rollout rounds) per curriculum round.
        c1, c2: the sigmoid's centre and slope; ``None`` initialises them from the first batch (paper's rule).
    """

    idk_phrase: str = "I don't know"
    correct_threshold: float = 1.0
    lam: float = hp(0.5, ge=0, le=1)
    update_every: int = hp(3, ge=1)
    c1: float | None = None
    c2: float | None = hp(None, gt=0)
    needs: ClassVar[frozenset[str]] = frozenset()
    constraints: ClassVar[tuple[Rule, ...]] = (
        rule(lambda idk_phrase: bool(idk_phrase), "{idk_phrase} must be a non-empty string"),
    )

    def initial_state(self) -> dict[str, Any]:
        return dict(c1=self.c1, c2=self.c2, delta=None, direction=1.0, prev_f=None, calls=0, counts=[0, 0, 0])

    def _init_curriculum(self, steps: Tensor, idk: Tensor) -> None:
        sigma = float(steps.std()) if steps.numel() > 1 else 0.0
        sigma = sigma if sigma > 0 else 1.0  # all responses equally long: unit scale
        delta = min(0.2 * sigma, 0.5)
        s = self.state
        s["delta"] = delta
        if s["c1"] is None:
            base = steps[idk] if idk.any() else steps
            s["c1"] = float(base.mean()) + delta
        if s["c2"] is None:
            s["c2"] = math.log(10.0) / (4.0 * sigma)

    def _advance(self, correct: Tensor, idk: Tensor) -> None:
        s = self.state
        c = s["counts"]
        c[0] += int(correct.sum())
        c[1] += int((~correct & ~idk).sum())
        c[2] += int(idk.sum())
        s["calls"] += 1
        if s["calls"] % self.update_every:
            return
        answered, total = c[0] + c[1], sum(c)
        f = objective(c[0] / answered if answered else 0.0, c[2] / total if total else 0.0, self.lam)
        if s["prev_f"] is not None and f < s["prev_f"]:
            s["direction"] = -s["direction"]
        s["c1"] += s["direction"] * s["delta"]
        s["prev_f"], s["counts"] = f, [0, 0, 0]

    def __call__(self, batch: RolloutBatch) -> RolloutBatch:
        texts = [m.get("completion", "") for m in batch.meta] if batch.meta else None
        if texts is not None:
            idk = torch.tensor([self.idk_phrase.lower() in t.lower() for t in texts], dtype=torch.bool)
            steps = torch.tensor([float(count_steps(t)) for t in texts])
        else:  # no text: no IDK detection possible; steps = response tokens
            idk = torch.zeros(batch.batch_size, dtype=torch.bool)
            steps = ops.response_lengths(batch.response_mask)
        if self.state["c1"] is None or self.state["c2"] is None or self.state["delta"] is None:
            self._init_curriculum(steps, idk)
        correct = (batch.rewards >= self.correct_threshold) & ~idk
        r = torch.where(correct, 1.0, -1.0).to(batch.rewards.dtype)
        r = torch.where(idk, idk_reward(steps, self.state["c1"], self.state["c2"]).to(r.dtype), r)
        self._advance(correct, idk)
        return batch.replace(rewards=r)


PRESETS = {
    # Auto-CEI (arXiv:2410.07627): IDK reward curriculum (lambda 0.5, c1/c2 from the first samples) driving GRPO.
    "auto_cei": {
        "advantage": {"name": "grpo"},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "seq_mean_token_mean"},
        "shapers": [{"name": "auto_cei", "lam": 0.5, "update_every": 3}],
        "kl": {"beta": 0.0},
    },
}
