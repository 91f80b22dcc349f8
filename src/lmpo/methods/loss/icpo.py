"""ICPO: the policy's own few-shot (in-context) rollouts as implicit expert guidance, mixed into GRPO groups.

Paper: Huang, Tang, Liu, Bai, Yang, Wu 2025, "Think Outside the Policy: In-Context Steered Policy Optimization",
arXiv:2510.26519 (ACL 2026 Findings); code on anonymous.4open.science (not reachable here).

Implicit expert forcing (the ``guide`` extension point, lmpo.train.guidance): for query q the same policy samples
N_off replies tau ~ pi_old(. | [D; q]) under k demonstrations D (question, solution) taken from the training data
(here: other rows of the step's batch). Each reply is re-attached to the plain query q: the training forward scores
pi_theta(tau | q) while its behaviour stays the in-context sampler's pi_old(tau | [D; q]) (``Guide.hinted(...,
rescore=True)``), an input-conditioned off-policy distribution. Expert-region reject sampling keeps only ICL replies
the verifier accepts (reward >= ``success``); kept ones replace rollouts of the group (lowest rewards first) and get
the annealed expert bonus R = r + alpha(t), alpha(t) = alpha_0 max(0, 1 - t / anneal_steps).
Loss (mixed-policy GRPO, LUFFY-style): on-policy tokens the clipped surrogate -min(r A, clip(r) A), r = pi/pi_old;
ICL tokens -A f(pi_theta(tau_t | q) / pi_old(tau_t | [D; q])) with the policy shaping f(x) = x / (x + gamma).
Advantages are GRPO's over the mixed group.

Differs from GRPO: extra in-context rollouts replace on-policy ones, an annealed reward bonus, and the shaped
importance ratio on those tokens.

Gaps filled (fidelity "reconstructed": only the abstract and summaries could be read): N_off = 1 and k = 2
demonstrations, gamma = 0.1 (LUFFY's shaping), the linear annealing alpha_0 = 0.5 over 200 steps, the demonstration
format ``demo_template``; demonstrations are the solutions (``solution_column``) of the batch's next k other rows.
"""

from __future__ import annotations

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


@LOSSES.register("icpo", paper="Think Outside the Policy: In-Context Steered Policy Optimization", arxiv="2510.26519",
                 fidelity="reconstructed")
@dataclass(frozen=True)
class ICPOLoss:
    """Clipped surrogate on policy tokens, -A f(pi/mu) on in-context (implicit expert) tokens; makes those rollouts.

    Args:
        epsilon: the on-policy clip range; gamma: the shaping f(x) = x / (x + gamma).
        n_off: in-context rollouts per group; shots: demonstrations in their prompt.
        alpha0, anneal_steps: the expert bonus alpha(t) = alpha0 max(0, 1 - t / anneal_steps).
        success: an ICL reply is kept when its reward is >= this (expert-region reject sampling).
        solution_column: a row's solution used when it serves as a demonstration.
        demo_template: one demonstration ("{prompt}", "{solution}"); the query's prompt follows the demonstrations.
    """

    epsilon: float = hp(0.2, ge=0)
    gamma: float = hp(0.1, gt=0)
    n_off: int = hp(1, ge=1)
    shots: int = hp(2, ge=1)
    alpha0: float = hp(0.5, ge=0)
    anneal_steps: int = hp(200, ge=1)
    success: float = 1.0
    solution_column: str = "solution"
    demo_template: str = "{prompt} {solution}\n\n"
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs"})
    constraints: ClassVar = (rule(lambda demo_template: "{prompt}" in demo_template and "{solution}" in demo_template,
                                  "{demo_template} must contain {{prompt}} and {{solution}}"),)

    def alpha(self, step: int) -> float:
        """The annealed expert bonus at ``step``: non-increasing, 0 from ``anneal_steps`` on."""
        return self.alpha0 * max(0.0, 1.0 - step / self.anneal_steps)

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask, adv = batch.response_mask, batch.advantages
        on, clipped = clipped_surrogate(ops.token_ratio(logprobs, batch.old_logprobs), adv, self.epsilon,
                                        self.epsilon, None)
        x = ops.token_ratio(logprobs, batch.sampler_logprobs.detach())  # pi_theta(. | q) / pi_old(. | D, q)
        off = -adv * x / (x + self.gamma)
        rows = off_policy_rows(batch)
        per_token = ops.zero_outside(torch.where(rows, off, on), mask)
        return LossOut(per_token, {"loss/clip_frac": ops.masked_mean(clipped.float(), mask & ~rows).detach(),
                                   "loss/icl_ratio": ops.masked_mean(x.detach(), mask & rows)})

    # ------------------------------------------------------------------ collection (GuidanceSource)
    def demo_prompt(self, row: dict, demos: list[dict]) -> str:
        text = "".join(self.demo_template.format(prompt=d["prompt"], solution=d[self.solution_column]) for d in demos)
        return text + row["prompt"]

    def guide(self, guide, batch: RolloutBatch) -> RolloutBatch:
        groups = torch.unique_consecutive(batch.group_ids).tolist()
        rows = guide.rows_of(batch, groups)
        pool = [r for r in rows if r.get(self.solution_column) is not None]
        if len(pool) < len(rows):
            bad = [r.get("prompt") for r in rows if r.get(self.solution_column) is None]
            raise DataError(f"icpo: rows {bad[:3]} have no solution column {self.solution_column!r} for "
                            "demonstrations (set loss.solution_column).")
        if len(rows) < 2:
            return batch  # no other row to demonstrate with
        prompts = []
        for i, row in enumerate(rows):
            demos = [rows[(i + j) % len(rows)] for j in range(1, min(self.shots, len(rows) - 1) + 1)]
            prompts.append(self.demo_prompt(row, demos))
        icl = guide.hinted(rows, prompts, groups, self.n_off, rescore=True, source="in_context")
        keep = icl.rewards >= self.success  # expert-region reject sampling
        guide.count("icl_accepted", float(keep.sum()))
        if not keep.any():
            return batch
        kept = icl.select(keep)
        kept = kept.replace(rewards=kept.rewards + self.alpha(guide.step))
        return guide.mix(batch, kept, replace=True)


PRESETS = {
    # ICPO (arXiv:2510.26519): one in-context rollout per group (2 demonstrations), accepted only when verified,
    # annealed expert bonus 0.5 -> 0 over 200 steps, LUFFY shaping gamma 0.1, clip 0.2, GRPO advantages, token mean.
    "icpo": {
        "advantage": {"name": "grpo"},
        "loss": {"name": "icpo"},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.0},
    },
}
