"""A process reward model: a score for every reasoning step, read at the step's last token (its separator).

A completion is cut into steps at ``separator`` (TRL's PRM convention: ``"\\n"``; each step keeps its separator);
a completion without any separator is one step, and is counted (``reward/<name>/no_separator``): a PRM asked to
grade a reply that never separates its steps grades only its end. Tokens are laid out as the PRM stage trains them
(:mod:`lmpo.train.scorer_stage`): the prompt's tokens, then each step's text tokenised on its own, so a step's score
position is the same in training and in use. Step scores are ``sigmoid(head(h))`` in (0, 1) (the probability the
step is correct).

Two uses:

- as an outcome reward (``rewards: [{name: process_reward_model, path: runs/prm/..., aggregate: min}]``): the step
  scores are reduced by ``min`` (the weakest step; PURE's min-form), ``last``, ``mean`` or ``prod``;
- as dense process credit: :meth:`ProcessRewardModel.step_scores` returns, per completion, the step scores and the
  character span ``[start, end)`` of each step in the completion. Mapping these spans onto token positions is the
  credit stage's job (``lmpo.rewards.steps``, issue 20 item 3); this module does not map them itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from lmpo.methods.params import hp
from lmpo.registry import REWARDS
from lmpo.rewards.scorer_base import ON_FAILURE, FailureLog, build_scorer, mask_failures, num_threads, pad_right

AGGREGATES = ("min", "last", "mean", "prod")


class StepScores(NamedTuple):
    """One completion's step scores (each in (0, 1)) and the ``[start, end)`` character span of each step."""

    scores: list[float]
    spans: list[tuple[int, int]]


def split_steps(text: str, separator: str) -> list[tuple[int, int]]:
    """Character spans of the steps of ``text``: each ends after its separator; a trailing empty piece is dropped;
    an empty text is one empty step."""
    spans, start = [], 0
    while True:
        hit = text.find(separator, start) if separator else -1
        if hit < 0:
            if start < len(text) or not spans:
                spans.append((start, len(text)))
            return spans
        spans.append((start, hit + len(separator)))
        start = hit + len(separator)


def encode_steps(tok, prompt: str, steps: list[str], max_length: int) -> tuple[list[int], list[int]]:
    """Ids of the prompt then each step (tokenised on its own) and, per step, the position of its last token. When
    the total exceeds ``max_length`` the prompt is cut from the left first, then the last steps are dropped."""
    step_ids = [tok(s, add_special_tokens=False)["input_ids"] for s in steps]
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    room = max(0, max_length - sum(len(s) for s in step_ids))
    ids = prompt_ids[len(prompt_ids) - min(room, len(prompt_ids)):] if room < len(prompt_ids) else list(prompt_ids)
    ends = []
    for s in step_ids:
        if len(ids) + len(s) > max_length:
            break
        ids += s
        ends.append(max(len(ids) - 1, 0))
    return ids, ends


def step_logits(model, tok, prompts: list[str], steps: list[list[str]], *, batch_size: int, max_length: int,
                device: str = "cpu", grad: bool = False) -> list[torch.Tensor]:
    """Per completion, the (S_i,) head outputs at its steps' last tokens (steps past ``max_length`` are missing)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: list[torch.Tensor] = []
    for s in range(0, len(prompts), batch_size):
        enc = [encode_steps(tok, p, st, max_length) for p, st in zip(prompts[s: s + batch_size], steps[s: s + batch_size])]
        ids, mask = pad_right([e[0] or [pad] for e in enc], pad, device)
        with torch.set_grad_enabled(grad):
            per_token = model(ids, mask)
        out.extend(per_token[i, torch.tensor(e[1], dtype=torch.long, device=per_token.device)]
                   for i, e in enumerate(enc))
    return out


def aggregate(scores: list[float], how: str) -> float:
    if how == "min":
        return min(scores)
    if how == "last":
        return scores[-1]
    if how == "mean":
        return sum(scores) / len(scores)
    return math.prod(scores)


@REWARDS.register("process_reward_model", paper="Let's Verify Step by Step (process reward model)",
                  arxiv="2305.20050", fidelity="exact")
@dataclass(frozen=True, eq=False)
class ProcessRewardModel:
    """Step scores of the PRM at ``path`` (module docstring), aggregated into one reward per completion.

    Attributes:
        path: A scorer spec: a ``stage: prm`` run, or an LM spec (a fresh head).
        separator: Where one step ends (kept with the step).
        aggregate: ``min`` | ``last`` | ``mean`` | ``prod`` of the step scores.
        batch_size, max_length, device, threads, on_failure, dtype, seed: as for ``reward_model``.
    """

    path: str
    separator: str = "\n"
    aggregate: str = hp("min", choices=AGGREGATES)
    batch_size: int = hp(16, ge=1)
    max_length: int = hp(1024, ge=1)
    device: str = "cpu"
    threads: int | None = hp(None, ge=1)
    on_failure: str = hp("mask", choices=ON_FAILURE)
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.separator:
            from lmpo.errors import ConfigError

            raise ConfigError('process_reward_model: separator must be a non-empty string (e.g. "\\n").')
        model, tok = build_scorer(self.path, dtype=self.dtype, seed=self.seed, want="prm")
        object.__setattr__(self, "model", model.to(self.device))
        object.__setattr__(self, "tokenizer", tok)
        object.__setattr__(self, "failures", FailureLog())

    def step_scores(self, prompts: list, completions: list[str]) -> list[StepScores]:
        """The adapter point for process credit: per completion, its step scores and character spans."""
        spans = [split_steps(c, self.separator) for c in completions]
        self.failures.add("no_separator", sum(self.separator not in c for c in completions))
        with num_threads(self.threads):
            logits = step_logits(self.model, self.tokenizer, [str(p) for p in prompts],
                                 [[c[a:b] for a, b in sp] for c, sp in zip(completions, spans)],
                                 batch_size=self.batch_size, max_length=self.max_length, device=self.device)
        out = []
        for lg, sp in zip(logits, spans):
            if len(lg) < len(sp):
                self.failures.add("truncated_steps", len(sp) - len(lg))
            out.append(StepScores(torch.sigmoid(lg.double()).cpu().tolist(), sp[: len(lg)]))
        return out

    def score_steps(self, prompt: str, completion: str, steps: list[str], **_: Any) -> list[float]:
        """The process-credit step-scorer interface (``lmpo.rewards.steps``: ``scorer(prompt, completion, steps,
        **columns) -> one float per step``): scores the given step texts (the credit stage's segmentation), each
        followed by ``separator`` as in training. Use it as ``scorer: <module>:<a ProcessRewardModel>.score_steps``
        or through :func:`prm_step_scorer`."""
        if not steps:
            return []
        with num_threads(self.threads):
            logits = step_logits(self.model, self.tokenizer, [str(prompt)], [[s + self.separator for s in steps]],
                                 batch_size=1, max_length=self.max_length, device=self.device)[0]
        scores = torch.sigmoid(logits.double()).cpu().tolist()
        if len(scores) < len(steps):  # steps past max_length: no score (the credit stage masks the reply)
            self.failures.add("truncated_steps", len(steps) - len(scores))
            scores += [math.nan] * (len(steps) - len(scores))
        return scores

    def __call__(self, prompts: list, completions: list[str], **_: Any) -> list[float]:
        raw = [aggregate(s.scores, self.aggregate) if s.scores else None
               for s in self.step_scores(prompts, completions)]
        return mask_failures("process_reward_model", prompts, completions, raw, self.on_failure, self.failures)

    def pop_metrics(self) -> dict[str, float]:
        return self.failures.pop()


def prm_step_scorer(path: str, separator: str = "\n", **kw: Any):
    """A process-credit step scorer (``scorer(prompt, completion, steps, **columns)``) backed by the PRM at
    ``path``: ``scorer = prm_step_scorer("runs/tiny-prm", separator=" ")`` in a module of yours, then
    ``planners: [{name: process_credit, scorer: "my_module:scorer"}]`` (the credit stage, issue 20 item 3)."""
    from lmpo.registry import REWARDS

    return REWARDS.build("process_reward_model", where="prm_step_scorer", path=path, separator=separator,
                         **kw).score_steps
