"""AdaSearch: an explicit search-or-not decision rewarded by whether it matches the model's own parametric knowledge.

Paper: Lin, Chen, Li, Lee, Chen & Meng 2025, "AdaSearch: Balancing Parametric Knowledge and Search in Large
Language Models via Reinforcement Learning", arXiv:2512.16883 (code and artifacts: hank0316/AdaSearch).

Search agents trained on outcome rewards (Search-R1) search almost always; penalising the number of calls needs
reward engineering and is gamed by agents that merely call less. AdaSearch separates *solving* from *deciding*:
stage 1 trains answering under two explicit modes (parametric only / search enabled) on the outcome reward alone;
stage 2 trains the model to state first whether it needs search, rewarded by whether that decision matches the
question's parametric solvability. No reward ever counts tool calls.

Implemented, per episode i of question q (one group = the episodes of one question):
  d_i   = 1 if the episode's decision is "search" (its first policy turn called a tool), else 0
  y(q)  = 1 ("search needed") unless q is solvable from parametric knowledge, estimated from the model's own
          parametric-mode attempts: y(q) = 0 iff  #correct / #attempts >= tau  over the group's episodes with d = 0
          (or, when the task rows carry it, the offline label column ``label_column``: 1 = needs search)
  R_dec = 1[d_i = y(q)]                                                          (stage 2's decision reward)
  stage 1 (the first ``solve_steps`` training steps): R_i <- R_out,i, the outcome alone;
  stage 2, "decide": R_i <- R_dec;   "joint": R_i <- R_out,i + w * R_dec
and the self-knowledge metric F1_aware (:func:`f1_aware`): the F1 of "parametric knowledge suffices" (d = 0)
against the label (positive class: y = 0). An always-search policy has F1_aware = 0.

Differs from GRPO: the reward of an episode depends on whether its search decision matched the question's parametric
solvability, measured on the group's own non-search episodes, not on its answer alone; search calls are never
counted.

Gaps filled (fidelity "reconstructed": the formulas were reconstructed from the abstract and a review; the label
rule and defaults were not found):
- the label rule: solvable iff the parametric success rate reaches ``tau`` (default 0.5, majority);
- the paper trains the stages one after the other; here they are one run, stage 1 for ``solve_steps`` steps (a
  count of ours: the paper's stage lengths were not found). Starting with the decision stage on an untrained policy
  collapses: nothing is solvable yet, so every question is labelled "search", and an always-search policy leaves no
  parametric attempt to label (measured on ``tiny_search``: outcome 0.09 -> 0.0);
- the paper builds labels from separate parametric-mode rollouts; here a
  group's parametric-mode rollouts are its episodes that decided not to search (the mode is the first turn's
  choice), so both stages can run in one ``rollout.mode: episodes`` run (``stage="joint"`` adds the decision reward
  to the outcome reward with weight ``decision_weight``: our combination, not the paper's). A group with no
  parametric attempt has no label: ``unknown="skip"`` gives it no decision reward (R_dec = 0 for every member, so
  its relative signal is the outcome's), ``unknown="search"`` labels it "search needed";
- the decision is read from ``extras["turn_tool_calls"][:, 0]`` (the first turn searched), or, without per-turn
  counts, from ``extras["tool_calls"] > 0``; a batch with neither (not an episode batch) passes through unchanged;
- "correct" is ``R_out >= correct_threshold`` on the incoming (outcome) reward, exact match in the paper.
The shaper leaves its decisions and labels in ``extras["search_decision"]`` and ``extras["search_label"]`` (-1 where
unknown) for inspection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.base import Stateful
from lmpo.methods.params import hp
from lmpo.registry import SHAPERS


def search_decisions(batch: RolloutBatch) -> Tensor | None:
    """(B,) bool: the episode decided to search (its first policy turn called a tool); None without tool data."""
    ex = batch.extras
    if "turn_tool_calls" in ex:
        return ex["turn_tool_calls"].reshape(batch.batch_size, -1)[:, 0] > 0
    if "tool_calls" in ex:
        return ex["tool_calls"].reshape(-1) > 0
    return None


def f1_aware(searched: Tensor, needs_search: Tensor) -> float:
    """F1 of the decision "parametric knowledge suffices" (not searched) against the label (not needs_search)."""
    pred, true = ~searched.bool(), ~needs_search.bool()
    tp = float((pred & true).sum())
    if tp == 0:
        return 0.0
    precision, recall = tp / float(pred.sum()), tp / float(true.sum())
    return 2 * precision * recall / (precision + recall)


def parametric_labels(searched: Tensor, correct: Tensor, group_ids: Tensor, tau: float) -> Tensor:
    """(B,) float label per row: 1 = search needed, 0 = solvable parametrically, -1 = no parametric attempt in the
    group. Solvable iff the group's non-search episodes are correct at a rate >= tau."""
    param = (~searched).double()
    n = ops.group_sum(param, group_ids)
    s = ops.group_sum(param * correct.double(), group_ids)
    rate = s / n.clamp_min(1)
    y = torch.where(rate >= tau, torch.zeros_like(rate), torch.ones_like(rate))
    return torch.where(n > 0, y, torch.full_like(y, -1.0)).float()


@SHAPERS.register("adasearch", paper="AdaSearch: Balancing Parametric Knowledge and Search in Large Language Models "
                  "via Reinforcement Learning", arxiv="2512.16883", fidelity="reconstructed")
@dataclass
class AdaSearchShaper(Stateful):
    """Reward for a search decision that matches the question's parametric solvability (module docstring).

    Args:
        stage: "decide" (reward = decision reward, stage 2) or "joint" (outcome + decision_weight * decision reward).
        decision_weight: w of the joint stage.
        tau: parametric success rate at or above which a question counts as solvable without search.
        correct_threshold: an episode is correct when its outcome reward reaches this.
        unknown: a group without parametric attempts: "skip" (no decision reward) or "search" (label: search needed).
        label_column: task-row key of an offline label (1/True = needs search) used instead of the online estimate.
        solve_steps: the paper's stage 1 inside one run: for this many training steps the reward is the outcome
            alone (problem solving in both modes), then the decision stage starts (0: decision stage from the start).
    """

    stage: str = hp("joint", choices=("decide", "joint"))
    decision_weight: float = hp(1.0, ge=0)
    tau: float = hp(0.5, gt=0, le=1)
    correct_threshold: float = 1.0
    unknown: str = hp("skip", choices=("skip", "search"))
    label_column: str = "needs_search"
    solve_steps: int = hp(0, ge=0)
    needs: ClassVar[frozenset[str]] = frozenset()

    def initial_state(self) -> dict[str, Any]:
        return {"steps": 0}

    def observe(self, batch: RolloutBatch, logprobs_fn=None) -> None:  # StepObserver: one training step done
        self.state["steps"] += 1

    def labels(self, batch: RolloutBatch, searched: Tensor) -> Tensor:
        rows = [m.get("row") if isinstance(m, dict) else None for m in batch.meta]
        if rows and all(isinstance(r, dict) and self.label_column in r for r in rows):
            return torch.tensor([float(bool(r[self.label_column])) for r in rows])
        y = parametric_labels(searched, batch.rewards >= self.correct_threshold, batch.group_ids, self.tau)
        return torch.where(y < 0, torch.ones_like(y), y) if self.unknown == "search" else y

    def __call__(self, batch: RolloutBatch) -> RolloutBatch:
        d = search_decisions(batch)
        if d is None or self.state["steps"] < self.solve_steps:
            return batch
        y = self.labels(batch, d).to(batch.rewards.device)
        r_dec = ((d.to(y.dtype) == y) & (y >= 0)).to(batch.rewards.dtype)
        rewards = r_dec if self.stage == "decide" else batch.rewards + self.decision_weight * r_dec
        extras = {**batch.extras, "search_decision": d.float(), "search_label": y}
        return batch.replace(rewards=rewards, extras=extras)


# The paper's recipe has two stages; one preset is one run, so it trains both at once (stage "joint", weight 1) with
# GRPO (the paper trains with GRPO-style outcome RL; Search-R1's clip 0.2, no KL, token mean).
PRESETS = {
    "adasearch": {
        "advantage": {"name": "grpo"},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "token_mean"},
        "shapers": [{"name": "adasearch", "stage": "joint", "decision_weight": 1.0, "tau": 0.5}],
        "kl": {"beta": 0.0},
    },
}
