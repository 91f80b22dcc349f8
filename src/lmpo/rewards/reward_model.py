"""A sequence reward model as a reward: a scalar head on any loadable LM, scored batched and without gradients.

``rewards: [{name: reward_model, path: runs/rm/my-rm}]`` scores each (prompt, completion) with the scalar at the
completion's last token. ``path`` is any scorer spec (:mod:`lmpo.rewards.scorer_base`): a ``stage: reward_model``
run folder, a Hugging Face ``...ForSequenceClassification`` folder, or an LM spec (``tiny``, ``default``, a folder)
with a fresh scalar head. The model is loaded once, when the reward set is built (a bad path fails before the run
folder is written), on ``device``, and runs with ``threads`` intra-op threads while scoring.

Bradley-Terry rewards are defined up to a constant; ``normalize: batch`` whitens each batch's scores (PPO-style RM
normalisation), ``sigmoid`` maps them to (0, 1). A non-finite score is a failure (masked and counted, or an error:
``on_failure``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lmpo.methods.params import hp
from lmpo.registry import REWARDS
from lmpo.rewards.scorer_base import ON_FAILURE, FailureLog, build_scorer, encode_pair, mask_failures, num_threads, pad_right

NORMALIZE = ("none", "batch", "sigmoid")


def last_token_scores(model, tok, prompts: list[str], completions: list[str], *, max_length: int = 1024,
                      device: str | torch.device = "cpu", grad: bool = False) -> torch.Tensor:
    """(N,) the scorer's scalar at each (prompt + completion)'s last token, in one forward pass (with gradient when
    ``grad``); inputs longer than ``max_length`` keep their end."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows = [encode_pair(tok, p, c)[-max_length:] or [pad] for p, c in zip(prompts, completions)]
    ids, mask = pad_right(rows, pad, device)
    with torch.set_grad_enabled(grad):
        per_token = model(ids, mask)
    return per_token[torch.arange(len(rows), device=per_token.device), mask.long().sum(1) - 1]


def score_sequences(model, tok, prompts: list[str], completions: list[str], *, batch_size: int = 16,
                    max_length: int = 1024, device: str = "cpu") -> list[float]:
    """:func:`last_token_scores` in batches of ``batch_size``, no gradient, as floats."""
    out: list[float] = []
    for s in range(0, len(completions), batch_size):
        out.extend(last_token_scores(model, tok, prompts[s: s + batch_size], completions[s: s + batch_size],
                                     max_length=max_length, device=device).cpu().tolist())
    return out


@REWARDS.register("reward_model", paper="Training language models to follow instructions with human feedback "
                  "(Bradley-Terry reward model)", arxiv="2203.02155", fidelity="exact")
@dataclass(frozen=True, eq=False)
class RewardModel:
    """The reward model at ``path`` scores each completion (module docstring).

    Attributes:
        path: A scorer spec: a ``stage: reward_model`` run, an HF sequence-classification folder, or an LM spec.
        batch_size: Completions per forward pass.
        max_length: Token budget of prompt + completion (the end is kept).
        device: Where the scorer runs (``cpu``, ``cuda``, ``cuda:1``).
        threads: Intra-op threads while scoring (restored after); ``None``: the process setting.
        normalize: ``none`` | ``batch`` (whiten each batch) | ``sigmoid``.
        scale: Multiplies the score (after ``normalize``).
        on_failure: ``mask`` (a non-finite score gets its group's mean, counted) | ``error``.
        dtype: The scorer's parameter dtype.
        seed: Seed of a fresh head (an LM spec without a trained head).
    """

    path: str
    batch_size: int = hp(16, ge=1)
    max_length: int = hp(1024, ge=1)
    device: str = "cpu"
    threads: int | None = hp(None, ge=1)
    normalize: str = hp("none", choices=NORMALIZE)
    scale: float = 1.0
    on_failure: str = hp("mask", choices=ON_FAILURE)
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        model, tok = build_scorer(self.path, dtype=self.dtype, seed=self.seed)
        object.__setattr__(self, "model", model.to(self.device))
        object.__setattr__(self, "tokenizer", tok)
        object.__setattr__(self, "failures", FailureLog())

    def raw_scores(self, prompts: list, completions: list[str]) -> list[float]:
        """Unmasked, unnormalised scores (NaN stays NaN): what the ensemble and the tests read."""
        with num_threads(self.threads):
            return score_sequences(self.model, self.tokenizer, [str(p) for p in prompts], list(completions),
                                   batch_size=self.batch_size, max_length=self.max_length, device=self.device)

    def __call__(self, prompts: list, completions: list[str], **_: Any) -> list[float]:
        scores = mask_failures("reward_model", prompts, completions, self.raw_scores(prompts, completions),
                               self.on_failure, self.failures)
        t = torch.tensor(scores, dtype=torch.float64)
        if self.normalize == "batch" and len(scores) > 1:
            t = (t - t.mean()) / (t.std() + 1e-6)
        elif self.normalize == "sigmoid":
            t = torch.sigmoid(t)
        return (t * self.scale).tolist()

    def pop_metrics(self) -> dict[str, float]:
        return self.failures.pop()
