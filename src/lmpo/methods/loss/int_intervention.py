"""InT: the policy proposes a fix for the first wrong step of its own failed rollout; SFT on prefix + fix.

Paper: 2026, "InT: Self-Proposed Interventions Enable Credit Assignment in LLM Reasoning", arXiv:2601.14209 (ICLR
2026; project site intervention-training.github.io, no code found).

For a failed trace y = (y_1..y_T) (steps) of problem x, the same model, prompted with x, its step-numbered trace and
the reference solution y_ref, names the first wrong step t* and writes one replacement step y~_t*. Training uses
    L_InT(theta) = - E[ log pi_theta(y_<t* (+) y~_t* | x) ]
(token NLL on the on-policy prefix before the error plus the intervention; the rest of the trace is excluded), so
credit lands on the erroneous step; a proposer answer without a valid step ("No error", unparsable, out of range)
adds nothing. Outcome-reward RL with the mean-baseline advantage A_i = r_i - mean_j r_j follows.

Here both run online in one step (``guide`` extension point, lmpo.train.guidance): intervention rows are added to
their groups (``off_policy`` 1, behaviour = the policy's own log-probs) and get the NLL term times ``sft_coef``;
the policy's rollouts get the PPO clip surrogate with the advantage of the preset (``rl_plus``: the on-policy-only
mean baseline, so intervention rows never move the group baseline).

Gaps filled (fidelity "reconstructed"): the paper runs SFT as a stage before RL, we interleave them (``sft_coef``);
the proposer prompt (``propose_template``) and its answer format "Step <k>: <text>" are ours; steps are the reply
split on ``step_sep``; one failed rollout per failed group, at most ``max_proposals`` per step; the optional check
that some continuation after the intervention succeeds is not done.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.errors import DataError
from lmpo.methods.base import LossOut
from lmpo.methods.loss.ampo import off_policy_rows
from lmpo.methods.loss.ppo_clip import clipped_surrogate
from lmpo.methods.params import hp, rule
from lmpo.registry import LOSSES

PROPOSE = ("Problem: {problem}\nAttempt:\n{attempt}\nReference solution: {reference}\nFind the first wrong step of the "
           "attempt and rewrite it. Answer 'Step <k>: <corrected step>', or 'No error'.")
STEP = re.compile(r"step\s*(\d+)\s*:\s*(.+)", re.IGNORECASE | re.DOTALL)


def parse_intervention(text: str, n_steps: int) -> tuple[int, str] | None:
    """(t*, replacement step) from a proposer reply, or None (no error named, unparsable, t* out of 1..n_steps)."""
    m = STEP.search(text)
    if m is None:
        return None
    k, fix = int(m.group(1)), m.group(2).strip().splitlines()[0].strip() if m.group(2).strip() else ""
    return (k, fix) if 1 <= k <= n_steps and fix else None


def splice(steps: list[str], k: int, fix: str, sep: str) -> str:
    """The SFT target: steps 1..k-1 of the attempt, then the intervention (nothing after it)."""
    return sep.join([*steps[: k - 1], fix])


@LOSSES.register("int", paper="InT: Self-Proposed Interventions Enable Credit Assignment in LLM Reasoning",
                 arxiv="2601.14209", fidelity="reconstructed")
@dataclass(frozen=True)
class InTLoss:
    """PPO clip on the policy's rollouts + sft_coef x NLL on self-proposed interventions (prefix + fixed step).

    Args:
        epsilon: the clip range of the on-policy surrogate.
        sft_coef: weight of the intervention rows' NLL.
        reference_column: the row's reference solution shown to the proposer.
        step_sep: how a reply splits into steps.
        propose_template: the proposer prompt ("{problem}", "{attempt}", "{reference}").
        max_proposals: failed rollouts sent to the proposer per step; success: a reward >= this is not a failure.
    """

    epsilon: float = hp(0.2, ge=0)
    sft_coef: float = hp(1.0, ge=0)
    reference_column: str = "solution"
    step_sep: str = "\n"
    propose_template: str = PROPOSE
    max_proposals: int = hp(8, ge=1)
    success: float = 1.0
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs"})
    constraints: ClassVar = (rule(lambda propose_template: all(f"{{{k}}}" in propose_template for k in
                                                               ("problem", "attempt", "reference")),
                                  "{propose_template} must contain {{problem}}, {{attempt}} and {{reference}}"),)

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask = batch.response_mask
        on, clipped = clipped_surrogate(ops.token_ratio(logprobs, batch.old_logprobs), batch.advantages,
                                        self.epsilon, self.epsilon, None)
        rows = off_policy_rows(batch)
        per_token = ops.zero_outside(torch.where(rows, -self.sft_coef * logprobs, on), mask)
        return LossOut(per_token, {"loss/clip_frac": ops.masked_mean(clipped.float(), mask & ~rows).detach(),
                                   "loss/sft_nll": ops.masked_mean(-logprobs.detach(), mask & rows)})

    def guide(self, guide, batch: RolloutBatch) -> RolloutBatch:  # GuidanceSource
        picks: dict[int, int] = {}  # group -> its first failed rollout
        for i, (g, r) in enumerate(zip(batch.group_ids.tolist(), batch.rewards.tolist())):
            if r < self.success and g not in picks and len(picks) < self.max_proposals:
                picks[g] = i
        if not picks:
            return batch
        groups = list(picks)
        rows = guide.rows_of(batch, groups)
        missing = [r.get("prompt") for r in rows if r.get(self.reference_column) is None]
        if missing:
            raise DataError(f"int: rows {missing[:3]} have no reference solution column {self.reference_column!r} "
                            "(set loss.reference_column).")
        steps = [[s for s in str(batch.meta[picks[g]].get("completion", "")).split(self.step_sep) if s.strip()]
                 for g in groups]
        prompts = [self.propose_template.format(
            problem=r["prompt"], attempt="\n".join(f"Step {j + 1}: {s}" for j, s in enumerate(st)),
            reference=r[self.reference_column]) for r, st in zip(rows, steps)]
        replies = guide.sample(prompts)
        keep = [(g, r, splice(st, *fix, self.step_sep)) for g, r, st, reply in zip(groups, rows, steps, replies)
                if (fix := parse_intervention(reply, len(st))) is not None]
        guide.count("interventions", len(keep))
        if not keep:
            return batch
        gs, rs, targets = zip(*keep)
        fixed = guide.traces(list(rs), list(targets), list(gs), behaviour="policy", source="intervention")
        return guide.mix(batch, fixed, replace=False)


PRESETS = {
    # InT (arXiv:2601.14209) interleaved with its RL stage: interventions for failed rollouts trained by NLL (weight 1),
    # PPO clip 0.2 on the rollouts with the mean-baseline advantage r - mean (on-policy rows), token mean, no KL.
    "int": {
        "advantage": {"name": "rl_plus"},
        "loss": {"name": "int"},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.0},
    },
}
