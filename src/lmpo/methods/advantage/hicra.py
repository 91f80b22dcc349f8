"""HICRA: hierarchy-aware credit assignment, GRPO's advantage amplified on planning tokens.

Paper: "Emergent Hierarchical Reasoning in LLMs through Reinforcement Learning", Wang et al., 2025, arXiv:2509.03646
(no released code found). Planning tokens are the tokens covered by a Strategic Gram (an n-gram phrase that steers
the reasoning: deduction "we can use the fact", branching "let's try a different", backtracking "but the problem
mentions"); every other token is execution. With A_{i,t} GRPO's advantage (group mean/std of the outcome):

  A^HICRA_{i,t} = A_{i,t} + alpha * |A_{i,t}| * 1[t in S_i]        (the paper's HICRA advantage, Sec. 4)

so a planning token of a successful reply gets (1 + alpha) A and one of a failed reply (1 - alpha) A (a softened
penalty); execution tokens keep A. alpha = 0 or no planning token in the batch is GRPO exactly.

Planning tokens are found during collection (this component's ``after_score`` hook, which has the tokenizer): each
gram of ``grams`` is matched in the reply text (case-insensitive, on word boundaries where the gram starts or ends
with a letter or digit), and every token whose characters overlap a match is marked, via the tokenizer's offsets
(:func:`lmpo.rewards.steps.token_char_ends`), in ``extras["planning_tokens"]`` (B, horizon) float 0/1.

Gaps filled (fidelity "reconstructed"): the paper mines its Strategic Grams offline (semantic clustering of 3-5-grams
of successful solutions, cluster document frequency, partly hand-validated); that list is not published, so the
default ``grams`` are phrases of the kinds the paper names (deduction, branching, backtracking, verification);
pass your own lexicon (``grams``) for your domain. alpha = 0.2 comes from third-party summaries, not the paper's
text we could read. The paper's semantic-entropy monitor (entropy of strategic-gram frequencies) is not computed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.errors import DataError
from lmpo.methods.advantage.grpo import GRPOAdvantage
from lmpo.methods.params import hp
from lmpo.registry import ADVANTAGES
from lmpo.rewards.steps import token_char_ends

STRATEGIC_GRAMS = (
    "let's try a different", "let's try", "another approach", "alternatively", "we can use the fact",
    "we can use", "notice that", "the key is", "this means that", "which implies", "but the problem mentions",
    "but wait", "wait,", "let me check", "let me verify", "let's verify", "double-check", "on second thought",
    "that doesn't seem right", "i made a mistake", "going back to", "we need to find", "first, we need",
    "the problem asks", "so the answer is",
)


def gram_pattern(grams: tuple[str, ...]) -> re.Pattern | None:
    """One case-insensitive regex for all grams (longest first; word boundaries at alphanumeric ends)."""
    parts = []
    for g in sorted(set(grams), key=len, reverse=True):
        if not g:
            continue
        p = re.escape(g)
        parts.append((r"\b" if g[0].isalnum() else "") + p + (r"\b" if g[-1].isalnum() else ""))
    return re.compile("|".join(parts), re.IGNORECASE) if parts else None


def planning_positions(text: str, char_ends: list[int], pattern: re.Pattern | None) -> list[int]:
    """Indices of the tokens whose characters (char_ends[j-1], char_ends[j]] overlap a gram match in ``text``."""
    if pattern is None:
        return []
    out = set()
    for m in pattern.finditer(text):
        start = 0
        for j, end in enumerate(char_ends):
            if end > m.start() and start < m.end() and end > start:
                out.add(j)
            start = end
    return sorted(out)


@ADVANTAGES.register("hicra", paper="Emergent Hierarchical Reasoning in LLMs through Reinforcement Learning",
                     arxiv="2509.03646", fidelity="reconstructed")
@dataclass(frozen=True)
class HICRAAdvantage:
    """GRPO advantage + alpha |A| on planning (strategic-gram) tokens (module docstring).

    Args:
        alpha: amplification of planning tokens (0.2). grams: the strategic-gram lexicon.
        horizon: width of ``extras["planning_tokens"]`` (filled from rollout.max_new_tokens).
    """

    alpha: float = hp(0.2, ge=0, le=1)
    grams: tuple[str, ...] = STRATEGIC_GRAMS
    horizon: int = hp(64, ge=1)
    needs: ClassVar[frozenset[str]] = frozenset()

    def after_score(self, ctx: Any, batch: RolloutBatch) -> RolloutBatch:  # ScoreAugmenter: mark planning tokens
        if len(batch.meta) != batch.batch_size:
            raise DataError("advantage: hicra needs each row's reply text (batch.meta[i]['completion']).")
        attn = batch.response_attn if batch.response_attn is not None else batch.response_mask
        pattern = gram_pattern(tuple(self.grams))
        marks = torch.zeros(batch.batch_size, self.horizon)
        for i, m in enumerate(batch.meta):
            pos = attn[i].nonzero().flatten()
            if not len(pos):
                continue
            ends = token_char_ends(ctx.tokenizer, batch.response_ids[i, pos].tolist(), m["completion"])
            for j in planning_positions(m["completion"], ends, pattern):
                if int(pos[j]) < self.horizon:
                    marks[i, int(pos[j])] = 1.0
        return batch.replace(extras={**batch.extras, "planning_tokens": marks})

    def __call__(self, batch: RolloutBatch) -> Tensor:
        adv = GRPOAdvantage()(batch)
        plan = batch.extras.get("planning_tokens")
        if plan is None or self.alpha == 0:
            return adv
        s = ops.fit_width(plan, adv)
        return ops.zero_outside(adv + self.alpha * adv.abs() * s, batch.response_mask)


# Paper: GRPO on Qwen3-4B-Instruct / Qwen2.5-7B-Base; alpha 0.2; GRPO's clipped loss (clip 0.2), no KL.
PRESETS = {
    "hicra": {
        "advantage": {"name": "hicra", "alpha": 0.2},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "seq_mean_token_mean"},
        "kl": {"beta": 0.0},
    },
}
