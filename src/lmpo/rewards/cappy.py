"""Cappy: Tan et al., "Cappy: Outperforming and Boosting Large Multi-Task LMs with a Small Scorer" (NeurIPS 2023),
arXiv:2311.06720 (Sec. 3: the scorer, its pre-training data and objective; Sec. 4: reranking candidates).

A small scorer s(x, y) = sigmoid(w . h(x ; y) + b) in [0, 1] estimates how correct the response y is for the
instruction x. It is trained by binary cross-entropy against soft labels: 1 for the gold response, 0 for the response
of another example, and, for model-generated candidates, their similarity to the gold (Rouge-L). It is used alone
(score every candidate label) or to boost a generator: sample K candidates, keep argmax_y s(x, y).

In lmpo: ``stage: reward_model`` with ``scorer.objective: pointwise`` trains it (any LM backbone with a scalar head;
the paper's is RoBERTa-large); :func:`cappy_rows` builds the three kinds of rows from the copy task (gold /
mismatched / corrupted replies labelled by Rouge-L); ``rewards: [{name: cappy, path: runs/cappy}]`` makes its
score an RL reward in [0, 1]; :meth:`Cappy.rerank` is best-of-N (ties: the first candidate).

Gaps filled (``fidelity="reconstructed"``): the similarity label is Rouge-L F1 over characters (the paper's
label metric was reconstructed from summaries, not confirmed; characters, because the tiny task's "words" are
digits); the pre-training mixture's proportions were not recovered (we use one gold, one mismatched and one
corrupted reply per prompt). What differs from GRPO: only the reward (or, for reranking, no training at all).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from lmpo.methods.params import hp
from lmpo.registry import REWARDS
from lmpo.rewards.reward_model import RewardModel


def rouge_l_f1(candidate: str, reference: str) -> float:
    """Rouge-L F1 over characters: 2PR / (P + R) with P = LCS/len(candidate), R = LCS/len(reference)."""
    if not candidate or not reference:
        return 0.0
    prev = [0] * (len(reference) + 1)
    for c in candidate:
        cur = [0]
        for j, r in enumerate(reference):
            cur.append(prev[j] + 1 if c == r else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(candidate), lcs / len(reference)
    return 2 * p * r / (p + r)


def cappy_rows(num: int = 300, seed: int = 0, length: int = 2) -> list[dict]:
    """Per prompt ("37="), three pointwise rows: the gold reply (label 1), another prompt's gold reply (label 0) and
    the gold with some digits changed (label: its Rouge-L to the gold)."""
    rng = random.Random(seed)
    golds = ["".join(rng.choice("0123456789") for _ in range(length)) for _ in range(num)]
    rows = []
    for i, g in enumerate(golds):
        other = golds[(i + 1 + rng.randrange(num - 1)) % num] if num > 1 else g[::-1]
        k = rng.randint(1, length)
        noisy = list(g)
        for j in rng.sample(range(length), k):
            noisy[j] = rng.choice([d for d in "0123456789" if d != g[j]])
        noisy = "".join(noisy)
        rows += [{"prompt": g + "=", "completion": g, "label": 1.0},
                 {"prompt": g + "=", "completion": other, "label": 1.0 if other == g else 0.0},
                 {"prompt": g + "=", "completion": noisy, "label": rouge_l_f1(noisy, g)}]
    return rows


@REWARDS.register("cappy", paper="Cappy: Outperforming and Boosting Large Multi-Task LMs with a Small Scorer",
                  arxiv="2311.06720", fidelity="reconstructed")
@dataclass(frozen=True, eq=False)
class Cappy:
    """The scorer at ``path`` as a reward in [0, 1] (module docstring).

    Attributes:
        path: A ``stage: reward_model`` run trained with ``objective: pointwise`` (or any scorer spec).
        batch_size, max_length, device, threads, on_failure, dtype, seed: as ``reward_model``.
    """

    path: str
    batch_size: int = hp(16, ge=1)
    max_length: int = hp(1024, ge=1)
    device: str = "cpu"
    threads: int | None = hp(None, ge=1)
    on_failure: str = hp("mask", choices=("mask", "error"))
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "rm", RewardModel(
            self.path, batch_size=self.batch_size, max_length=self.max_length, device=self.device, threads=self.threads,
            normalize="sigmoid", on_failure=self.on_failure, dtype=self.dtype, seed=self.seed))

    def __call__(self, prompts: list, completions: list[str], **_: Any) -> list[float]:
        return self.rm(prompts, completions)

    def rerank(self, prompt: str, candidates: list[str]) -> int:
        """Best-of-N: the index of the highest-scored candidate (the first among equals)."""
        scores = self(prompts=[prompt] * len(candidates), completions=candidates)
        return max(range(len(candidates)), key=lambda i: (scores[i], -i))

    def pop_metrics(self) -> dict[str, float]:
        return self.rm.pop_metrics()
