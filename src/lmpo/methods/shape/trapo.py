"""TraPO: semi-supervised RL with majority-vote pseudo-rewards, trusted by learning-trajectory similarity.

Paper: Yang et al. 2025, "TraPO: A Semi-Supervised Reinforcement Learning Framework for Boosting LLM Reasoning",
arXiv:2512.13106; forms and defaults from the paper and its official code (as summarised on the method card).
- Reward: R(o) = 1[ans(o) = y] for a labeled prompt (the task's own reward); R(o) = 1[ans(o) = maj(q)] for an
  unlabeled one, maj(q) the unique most frequent answer of its G rollouts (a tie gives no label: R = 0).
- Trajectory of prompt q: its pass rates over epochs p_q = (p_q^1..p_q^E) (labeled: mean task reward; unlabeled:
  agreement rate with its modal answer). z_q = (p_q - mean p_q) / (std p_q + 1e-8).
- Reliability of unlabeled u: s_u = mean_{l in DB} cos(z_l, z_u), DB = labeled trajectories, all truncated to the
  shortest length. Selected = TopK(s, k = max(1, floor(ratio * N_u))) united with {u : s_u >= thr}.
- During the first W epochs only labeled prompts are trained; the policy loss is GRPO.

Differs from GRPO: unlabeled prompts get pseudo-rewards and are trained only when their learning trajectory moves
like the labeled ones'; unselected unlabeled rows are removed from the loss (their ``response_mask`` is cleared).

Gaps filled: online, an "epoch" entry of a prompt is each visit of it (the stream visits every prompt once per
epoch); the warm-up W counts a prompt's own visits; which prompts are unlabeled comes from a row's ``labeled`` column
or, if absent, a fixed hash of the prompt (``unlabeled_fraction``, for turning a labeled task semi-supervised);
answers are extracted by ``answer_regex`` (last match); selected unlabeled prompts are not added to the DB.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lmpo.batch import RolloutBatch
from lmpo.methods.base import Stateful
from lmpo.methods.params import Rule, hp, is_regex, rule
from lmpo.registry import SHAPERS


def majority(answers: list[str | None]) -> str | None:
    """The unique most frequent non-None answer, or None on a tie / no answer."""
    top = Counter(a for a in answers if a is not None).most_common(2)
    if not top or (len(top) == 2 and top[0][1] == top[1][1]):
        return None
    return top[0][0]


def znorm(p: Tensor) -> Tensor:
    """(..., E) -> z-normalised along time (population std, + 1e-8)."""
    return (p - p.mean(-1, keepdim=True)) / (p.std(-1, unbiased=False, keepdim=True) + 1e-8)


def reliability(db: list[list[float]], unl: list[list[float]]) -> Tensor:
    """s_u = mean_l cos(z_l, z_u) for each unlabeled trajectory (all truncated to the shortest length)."""
    if not db or not unl:
        return torch.zeros(len(unl), dtype=torch.float64)
    n = min(len(h) for h in db + unl)
    zl = znorm(torch.tensor([h[:n] for h in db], dtype=torch.float64))
    zu = znorm(torch.tensor([h[:n] for h in unl], dtype=torch.float64))
    cos = torch.nn.functional.cosine_similarity(zu[:, None, :], zl[None, :, :], dim=-1, eps=1e-12)
    return cos.mean(-1)


def select(scores: Tensor, ratio: float, threshold: float) -> Tensor:
    """TopK(scores, max(1, floor(ratio * N))) union {scores >= threshold}, as a (N,) bool mask."""
    keep = scores >= threshold
    if scores.numel():
        k = max(1, int(ratio * scores.numel()))
        keep[scores.topk(k).indices] = True
    return keep


@SHAPERS.register("trapo", paper="TraPO: Semi-Supervised RL for LLM Reasoning", arxiv="2512.13106",
                  fidelity="reconstructed")
@dataclass
class TraPO(Stateful):
    """Majority-vote pseudo-rewards for unlabeled prompts, kept only if their pass-rate trajectory matches.

    Args:
        warmup: W, visits of a prompt before it may be trained unlabeled (8 epochs in the paper).
        topk_ratio, threshold: the selection rule (0.1, 0.4).
        unlabeled_fraction: share of prompts treated as unlabeled when rows carry no ``labeled`` column.
        answer_regex: the answer of a completion is the last match (None if none).
    """

    warmup: int = hp(8, ge=0)
    topk_ratio: float = hp(0.1, gt=0, le=1)
    threshold: float = 0.4
    unlabeled_fraction: float = hp(0.75, ge=0, le=1)
    answer_regex: str = r"-?\d+(?:\.\d+)?"
    needs: ClassVar[frozenset[str]] = frozenset()
    constraints: ClassVar[tuple[Rule, ...]] = (
        rule(lambda answer_regex: is_regex(answer_regex), "{answer_regex} must be a valid regular expression"),
    )

    def initial_state(self) -> dict[str, Any]:
        return {"history": {}, "labeled": {}}

    def answer(self, text: str) -> str | None:
        found = re.findall(self.answer_regex, text)
        return found[-1] if found else None

    def is_labeled(self, row: dict[str, Any]) -> bool:
        if "labeled" in row:
            return bool(row["labeled"])
        key = str(row.get("id", row.get("prompt")))
        return zlib.crc32(key.encode()) % 10_000 >= self.unlabeled_fraction * 10_000

    def trusted(self) -> set[str]:
        """Unlabeled prompt keys currently selected (past warm-up and chosen by trajectory similarity)."""
        hist, lab = self.state["history"], self.state["labeled"]
        db = [h for k, h in hist.items() if lab[k]]
        keys = [k for k, h in hist.items() if not lab[k] and len(h) >= max(self.warmup, 1)]
        keep = select(reliability(db, [hist[k] for k in keys]), self.topk_ratio, self.threshold)
        return {k for k, m in zip(keys, keep.tolist()) if m}

    def __call__(self, batch: RolloutBatch) -> RolloutBatch:
        if not batch.meta or "row" not in batch.meta[0]:
            return batch  # no rows or text: every prompt counts as labeled
        rewards, mask = batch.rewards.clone(), batch.response_mask.clone()
        groups = {}
        for i, g in enumerate(batch.group_ids.tolist()):
            groups.setdefault(g, []).append(i)
        unlabeled_rows = {}
        for g, idx in groups.items():
            row = batch.meta[idx[0]]["row"]
            key = str(row.get("id", row.get("prompt")))
            labeled = self.is_labeled(row)
            if labeled:
                rate = float(rewards[idx].mean())
            else:
                answers = [self.answer(batch.meta[i]["completion"]) for i in idx]
                maj = majority(answers)
                top = Counter(a for a in answers if a is not None).most_common(1)
                rate = top[0][1] / len(idx) if top else 0.0
                rewards[idx] = torch.tensor([float(maj is not None and a == maj) for a in answers], dtype=rewards.dtype)
                unlabeled_rows[key] = idx
            self.state["labeled"][key] = labeled
            self.state["history"].setdefault(key, []).append(rate)
        trusted = self.trusted()
        for key, idx in unlabeled_rows.items():
            if key not in trusted:
                mask[idx] = False
        return batch.replace(rewards=rewards, response_mask=mask)




PRESETS = {
    # TraPO (arXiv:2512.13106): warm-up 8, top-k ratio 0.1, threshold 0.4, 3K of 4K prompts unlabeled, GRPO.
    "trapo": {
        "advantage": {"name": "grpo"},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "seq_mean_token_mean"},
        "shapers": [{"name": "trapo", "warmup": 8, "topk_ratio": 0.1, "threshold": 0.4, "unlabeled_fraction": 0.75}],
        "kl": {"beta": 0.0},
    },
}
