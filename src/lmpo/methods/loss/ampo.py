"""AMPO: adaptive multi-teacher guidance, only for prompts the policy fails, with a mixed on/off-policy loss.

Paper: Yuan, Ding, Bin, Shao, Cai, Song, Yang, Shen 2025, "More Than One Teacher: Adaptive Multi-Guidance Policy
Optimization for Diverse Exploration", arXiv:2510.02227; code SII-Enigma/AMPO (verl; ``mix_dapo_trainer.py``,
``mix_core_alg.py``), read for the rules below.

Collection (the ``guide`` extension point, lmpo.train.guidance): a group of n on-policy rollouts is given guidance
iff none is correct (success rate < 1/n; ``strategy="adaptive"``; ``"hybrid"`` also guides a solved group with
probability 0.3, ``"always"`` every group). The guidance pool holds one solution per teacher: data columns
(``columns``: offline teacher solutions, the paper's setting) and/or teacher models sampled now (``teachers``:
model specs). Each candidate tau_m gets the comprehension score of the current policy,
    score_m = p_theta(a* | q, reasoning(tau_m)) - p_theta(a* | q)
(mean per-token probability of the gold answer a*, RLPR-style), the pool is sorted by it and the top k
(k = min(k, M, #failed)) replace failed rollouts. The paper's pool holds correct responses: traces the verifier
rejects are dropped (``verify``); the code instead raises an injected trace's reward to at least 1 (``verify=False``).
Loss (the code's ``mixed_token_off_policy_loss``): on-policy tokens the dual-clip PPO surrogate
    l_on = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), and for A < 0 min(that, -A c),   r = pi/pi_old;
off-policy (teacher) tokens l_off = -A f(pi_theta(o_t) / mu(o_t)), mu the row's behaviour probability
(``sampler_logprobs``): the code's ``target_probs=None`` case takes mu = 1 (declared constant log-prob 0, the
default ``behaviour=0.0``); a teacher model's rows carry its own log-probs. f is the policy shaping (``none``: f(x) =
x, the code's default; ``p_div_p``: x / (x + gamma), LUFFY's). Advantages are GRPO's over the mixed group.

Differs from GRPO: teacher traces only in failed groups, chosen by comprehension; teacher tokens have no clip and
a behaviour probability of 1.

Gaps filled (fidelity "reconstructed"): k (``n_prefix``) and the shaping the paper's runs use are not in the released
scripts: k = 2, f = none. reasoning(tau) = the trace before the last occurrence of the gold answer (the whole trace if
it does not contain it). The code's optional all-wrong/all-right group filter after mixing is left to a selector.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.errors import DataError
from lmpo.methods.base import LossOut
from lmpo.methods.loss.ppo_clip import clipped_surrogate
from lmpo.methods.params import hp
from lmpo.registry import LOSSES

STRATEGIES = ("adaptive", "hybrid", "always")
SHAPINGS = ("none", "p_div_p", "sqrt")


def off_policy_rows(batch: RolloutBatch) -> Tensor:
    """(B, 1) bool: the rows whose behaviour is not the policy under their own prompt (0 rows if unmarked)."""
    marks = batch.extras.get("off_policy")
    return (marks > 0)[:, None] if marks is not None else torch.zeros(batch.batch_size, 1, dtype=torch.bool,
                                                                       device=batch.rewards.device)


def reasoning_of(trace: str, answer: str) -> str:
    """The part of a trace before the last occurrence of the answer (the whole trace if it has none)."""
    i = trace.rfind(answer) if answer else -1
    return trace[:i] if i >= 0 else trace


@LOSSES.register("ampo", paper="More Than One Teacher: Adaptive Multi-Guidance Policy Optimization for Diverse "
                 "Exploration", arxiv="2510.02227", fidelity="reconstructed")
@dataclass(frozen=True)
class AMPOLoss:
    """Dual-clip PPO on the policy's tokens, -A f(pi/mu) on teacher tokens; guides failed groups with teacher traces.

    Args:
        epsilon, epsilon_high, dual_clip: the on-policy surrogate (eps_low, eps_high, c = 3).
        shaping, gamma: the off-policy shaping f and its gamma (``p_div_p``).
        columns: data columns with one teacher solution each (a column may hold a list of solutions).
        teachers: teacher model specs sampled at collection (same tokenizer as the policy).
        k: teacher traces put into a failed group.
        strategy: when a group is guided (``adaptive`` / ``hybrid`` / ``always``); hybrid_p: hybrid's probability.
        behaviour: declared log-prob per token of data-column traces (0.0: probability 1).
        success: a reward >= this is correct; answer_column: the gold answer of the comprehension score.
        verify: keep only verified-correct teacher traces in the pool (the paper's pool of correct responses); False
            keeps every trace and raises its reward to ``success``, as the released code does.
    """

    epsilon: float = hp(0.2, ge=0)
    epsilon_high: float | None = hp(None, ge=0)
    dual_clip: float | None = hp(3.0, gt=1)
    shaping: str = hp("none", choices=SHAPINGS)
    gamma: float = hp(0.1, gt=0)
    columns: tuple[str, ...] = ("teacher_solutions",)
    teachers: tuple[str, ...] = ()
    k: int = hp(2, ge=1)
    strategy: str = hp("adaptive", choices=STRATEGIES)
    hybrid_p: float = hp(0.3, ge=0, le=1)
    behaviour: float = hp(0.0, le=0)
    success: float = 1.0
    answer_column: str = "answer"
    verify: bool = True
    seed: int = 0
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs"})

    def shape(self, x: Tensor) -> Tensor:
        if self.shaping == "p_div_p":
            return x / (x + self.gamma)
        return x.sqrt() if self.shaping == "sqrt" else x

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask, adv = batch.response_mask, batch.advantages
        eps_high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        on, clipped = clipped_surrogate(ops.token_ratio(logprobs, batch.old_logprobs), adv, self.epsilon, eps_high,
                                        self.dual_clip)
        off_ratio = ops.token_ratio(logprobs, batch.sampler_logprobs.detach())  # pi_theta / mu
        off = -adv * self.shape(off_ratio)
        rows = off_policy_rows(batch)
        per_token = ops.zero_outside(torch.where(rows, off, on), mask)
        off_mask = mask & rows
        metrics = {"loss/clip_frac": ops.masked_mean(clipped.float(), mask & ~rows).detach(),
                   "loss/off_token_frac": (off_mask.sum() / mask.sum().clamp(min=1)).detach().float(),
                   "loss/off_prob": ops.masked_mean(logprobs.detach().exp(), off_mask).detach()}
        return LossOut(per_token, metrics)

    # ------------------------------------------------------------------ collection (GuidanceSource)
    def wants(self, batch: RolloutBatch, g: int) -> bool:
        solved = bool((batch.rewards[batch.group_ids == g] >= self.success).any())
        if self.strategy == "always" or not solved:
            return True
        if self.strategy == "hybrid":
            rng = self.__dict__.setdefault("_rng_state", random.Random(self.seed))
            return rng.random() < self.hybrid_p
        return False

    def pool(self, guide, row: dict, g: int) -> RolloutBatch:
        texts = []
        for c in self.columns:
            v = row.get(c)
            texts += [str(x) for x in v] if isinstance(v, (list, tuple)) else ([str(v)] if v is not None else [])
        parts = [guide.traces([row] * len(texts), texts, [g] * len(texts), behaviour=self.behaviour,
                              source="teacher_data")] if texts else []
        parts += [guide.teacher(spec, [row], [g]) for spec in self.teachers]
        if not parts:
            raise DataError(f"ampo: row {row.get('prompt')!r} has none of the teacher columns {list(self.columns)} and "
                            "no teacher model is set (loss.columns: the task's solution columns; loss.teachers: "
                            "model specs).")
        return RolloutBatch.concat(parts)

    def guide(self, guide, batch: RolloutBatch) -> RolloutBatch:
        groups = [g for g in torch.unique_consecutive(batch.group_ids).tolist() if self.wants(batch, g)]
        chosen = []
        for g, row in zip(groups, guide.rows_of(batch, groups)):
            cands = self.pool(guide, row, g)
            if self.verify:  # the guidance pool holds correct responses only
                right = cands.rewards >= self.success
                guide.count("pool_rejected", float((~right).sum()))
                if not right.any():
                    continue
                cands = cands.select(right)
            failed = int((batch.rewards[batch.group_ids == g] < self.success).sum())
            if failed == 0:
                continue
            answer = str(row.get(self.answer_column, ""))
            texts = [m["completion"] for m in cands.meta]
            with_trace = guide.answer_prob([row] * len(texts), [reasoning_of(t, answer) for t in texts],
                                           [answer] * len(texts))
            alone = guide.answer_prob([row], [""], [answer])
            score = with_trace - alone
            order = sorted(range(len(texts)), key=lambda i: -float(score[i]))[: min(self.k, failed)]
            top = cands.select(torch.tensor(order))
            chosen.append(top.replace(rewards=top.rewards.clamp(min=self.success)))
            guide.count("guided_groups")
            guide.count("comprehension_sum", float(score[order].mean()))
        if not chosen:
            return batch
        return guide.mix(batch, RolloutBatch.concat(chosen), replace=True)


PRESETS = {
    # AMPO (arXiv:2510.02227; code SII-Enigma/AMPO): adaptive injection into all-wrong groups, top-2 teacher traces
    # by comprehension, dual-clip PPO (c = 3) on policy tokens, unshaped pi_theta on teacher tokens, GRPO advantages,
    # token-mean aggregation, no KL (the released DAPO-style scripts).
    "ampo": {
        "advantage": {"name": "grpo"},
        "loss": {"name": "ampo"},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.0},
    },
}
