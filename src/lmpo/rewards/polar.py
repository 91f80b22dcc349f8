"""POLAR: Dou et al., "Pre-Trained Policy Discriminators are General Reward Models", arXiv:2507.05197 (Sec. 3).

A reward model read as a *policy discriminator*: r(x, y_ref, y) scores how likely the candidate y comes from the
same policy as the reference trajectory y_ref. The RM sees the concatenation [x ; y_ref ; y] and a scalar head reads
its last token. Pre-training needs no human labels: with policies A != B from a pool, y_ref and y+ are two samples
of pi_A, y- a sample of pi_B, and the Bradley-Terry loss -log sigmoid(r(x, y_ref, y+) - r(x, y_ref, y-)) is
minimised (the paper's pre-training objective; its fine-tuning uses the same loss on human-ranked triples). In RL the
prompt's reference answer is y_ref.

In lmpo the discriminator is an ordinary ``reward_model`` trained by ``stage: reward_model`` on pairs whose prompt is
``x + y_ref + separator`` (:func:`polar_pairs` builds the pre-training triples from a pool of toy policies; any TRL
pair file with that prompt layout works too), and this reward feeds it ``prompt + reference + separator`` with the
reference from a row column (``answer`` by default).

Gaps filled (``fidelity="reconstructed"``): the paper's exact input template, special tokens and policy-pool
sampling recipe were not recovered; we concatenate with a configurable separator and, for the toy pool, use
digit-shift policies (policy k writes digit (d + k) mod 10 for each prompt digit d, or a random digit with
probability ``noise``). What differs from GRPO: only the reward.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from lmpo.errors import RewardError
from lmpo.methods.params import hp
from lmpo.registry import REWARDS
from lmpo.rewards.reward_model import NORMALIZE, RewardModel


def toy_policy_sample(rng: random.Random, digits: str, k: int, noise: float) -> str:
    """A sample of toy policy k: each prompt digit shifted by k (mod 10), or a random digit with prob ``noise``."""
    return "".join(rng.choice("0123456789") if rng.random() < noise else str((int(d) + k) % 10) for d in digits)


def polar_pairs(num: int = 512, seed: int = 0, length: int = 1, policies: int = 4, noise: float = 0.2,
                separator: str = " ") -> list[dict]:
    """POLAR pre-training triples as TRL pairs: prompt ``x + y_ref + separator``, chosen a second sample of y_ref's
    policy, rejected a sample of another policy of the pool (policy 0 is the copy policy of the ``copy`` task)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        d = "".join(rng.choice("0123456789") for _ in range(length))
        a, b = rng.sample(range(policies), 2)
        ref, pos, neg = (toy_policy_sample(rng, d, k, noise) for k in (a, a, b))
        rows.append({"prompt": f"{d}={ref}{separator}", "chosen": pos, "rejected": neg, "policy": a, "other": b})
    return rows


@REWARDS.register("polar", paper="Pre-Trained Policy Discriminators are General Reward Models", arxiv="2507.05197",
                  fidelity="reconstructed")
@dataclass(frozen=True, eq=False)
class Polar:
    """r(x, y_ref, y): the discriminator at ``path`` scores ``prompt + reference + separator`` then the reply.

    Attributes:
        path: A ``stage: reward_model`` run trained on POLAR triples (or any scorer spec).
        reference_column: The row column holding y_ref (the task's reference answer).
        separator: Between the reference and the candidate (as in training).
        normalize, scale, batch_size, max_length, device, threads, on_failure, dtype, seed: as ``reward_model``.
    """

    path: str
    reference_column: str = "answer"
    separator: str = " "
    normalize: str = hp("none", choices=NORMALIZE)
    scale: float = 1.0
    batch_size: int = hp(16, ge=1)
    max_length: int = hp(1024, ge=1)
    device: str = "cpu"
    threads: int | None = hp(None, ge=1)
    on_failure: str = hp("mask", choices=("mask", "error"))
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        rm = RewardModel(self.path, batch_size=self.batch_size, max_length=self.max_length, device=self.device,
                         threads=self.threads, normalize=self.normalize, scale=self.scale,
                         on_failure=self.on_failure, dtype=self.dtype, seed=self.seed)
        object.__setattr__(self, "rm", rm)

    def __call__(self, prompts: list, completions: list[str], **columns: Any) -> list[float]:
        refs = columns.get(self.reference_column)
        if refs is None or any(r is None for r in refs):
            raise RewardError(f'polar needs the reference answer of every prompt in the "{self.reference_column}" '
                              f"column (set reference_column); columns here: {', '.join(sorted(columns)) or '(none)'}.")
        return self.rm([f"{p}{r}{self.separator}" for p, r in zip(prompts, refs)], completions)

    def pop_metrics(self) -> dict[str, float]:
        return self.rm.pop_metrics()
