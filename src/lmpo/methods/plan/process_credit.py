"""Process credit in the pipeline: every reply cut into steps, every step scored, each score on its step's last token.

The layout is step-by-step PPO's (Math-Shepherd, arXiv:2312.08935, Sec. 3.3: a step's process reward at the step's
final token). Runs as the ``after_score`` extension point (each scoring round's batch, before the shapers, with the rollout
context, whose tokenizer maps characters to tokens). For row i with reply text y_i:

  steps      = :func:`lmpo.rewards.steps.split_steps` (``separator``/``pattern``), or ``segment: cutpoints``: the
               model's own segmentation, a cut after every ``cut_every``-th token whose sampling probability is below
               ``cut_prob`` (SPO-chain's cutpoints, arXiv:2505.23564 Sec. 4.1)
  r_{i,k}    = weight * scorer(prompt, y_i, [text of step k], **row columns)[k]
  token_rewards[i, e_k] += r_{i,k}  at e_k, the token holding step k's last character (tokenizer offsets)
  turn_ids[i, t] = k  for e_{k-1} < t <= e_k (a separator counts towards the next step; tokens after the last
                   step's end, e.g. EOS, towards the last step)
  extras: ``step_rewards`` (B, horizon) r_{i,k} in column k, ``step_ends`` (B, horizon) e_k (-1 after the last
          step), ``num_steps`` (B,), ``step_failed`` (B,) 1.0 on rows whose scoring failed.

Advantage estimators then see a dense signal: those that add ``token_rewards`` to the outcome (GRPO and most
others), GAE's per-token rewards, the step-level ones (``pure``, ``spo_segment``) and the turn-level ones through
``turn_ids``. A reply with no separator is one step; an empty reply has none (no process reward). Steps whose last
characters fall in the same token are merged (their scores add up) and counted. Scores that are not one finite
number per step, or a scorer that raises, stop the run naming the row (``on_error: raise``) or, with
``on_error: mask``, take the row out of training (its ``response_mask`` cleared) and are counted. The counters
(rows, failed, one_step, empty, merged) are the component's state (``lmpo.methods.base.Stateful``), saved in
checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lmpo.batch import RolloutBatch
from lmpo.errors import DataError
from lmpo.methods.base import Stateful
from lmpo.methods.params import hp
from lmpo.registry import PLANNERS
from lmpo.rewards.steps import (check_pattern, check_scorer_spec, check_scores, place_steps, resolve_scorer,
                                split_steps, step_end_tokens, token_char_ends)

COUNTERS = ("rows", "failed", "one_step", "empty", "merged")


def cutpoint_ends(logprobs: torch.Tensor, n: int, cut_prob: float, every: int) -> list[int]:
    """Token indices ending each segment: after every ``every``-th token with probability < ``cut_prob``; the last
    segment ends on the last token (``n`` tokens)."""
    cuts = [t for t in range(n) if float(logprobs[t].exp()) < cut_prob]
    ends = [c for j, c in enumerate(cuts, 1) if j % every == 0 and c < n - 1]
    return ends + [n - 1] if n else []


@PLANNERS.register("process_credit", paper="Math-Shepherd: Verify and Reinforce LLMs Step-by-step without Human "
                   "Annotations (step-by-step PPO: each step's process reward on its last token)", arxiv="2312.08935",
                   fidelity="exact")
@dataclass
class ProcessCredit(Stateful):
    """Step scores onto tokens: ``token_rewards`` at each step's last token, ``turn_ids`` = step index.

    Args:
        scorer: a step scorer (``lmpo.rewards.steps.STEP_SCORERS`` name or ``module:attr``): ``(prompt,
            completion, steps, **columns) -> list[float]``; a process reward model satisfies it.
        separator / pattern: where steps are cut (a string, or a regex that wins over it).
        segment: ``separator`` (text) or ``cutpoints`` (low-probability tokens, ``cut_prob``, ``cut_every``).
        weight: factor on every score. on_error: ``raise`` or ``mask`` (module docstring).
        horizon: width of the per-step extras (filled from rollout.max_new_tokens).
    """

    scorer: str = "equation_steps"
    separator: str = "\n\n"
    pattern: str | None = None
    segment: str = hp("separator", choices=("separator", "cutpoints"))
    cut_prob: float = hp(0.5, gt=0, le=1)
    cut_every: int = hp(5, ge=1)
    weight: float = 1.0
    on_error: str = hp("raise", choices=("raise", "mask"))
    horizon: int = hp(64, ge=1)
    needs: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset({"step_rewards"})

    def __post_init__(self) -> None:
        check_scorer_spec(self.scorer, "planners: process_credit.scorer")
        check_pattern(self.pattern, "planners: process_credit.pattern")

    def initial_state(self) -> dict[str, Any]:
        return {k: 0 for k in COUNTERS}

    def _scorer(self):
        if "_scorer_fn" not in self.__dict__:
            self.__dict__["_scorer_fn"] = resolve_scorer(self.scorer)
        return self.__dict__["_scorer_fn"]

    def _spans(self, tokenizer, ids, logprobs, text) -> tuple[list[tuple[int, int]], list[int]]:
        ends = token_char_ends(tokenizer, ids, text)
        if self.segment == "separator":
            spans = split_steps(text, self.separator, self.pattern)
            return spans, step_end_tokens(ends, spans)
        toks = cutpoint_ends(logprobs, len(ids), self.cut_prob, self.cut_every)
        starts = [0] + [ends[e] for e in toks[:-1]]
        spans = []
        for s, e in zip(starts, (ends[e] for e in toks)):  # each segment's text without surrounding whitespace
            piece = text[s:e]
            if piece.strip():
                spans.append((s + len(piece) - len(piece.lstrip()), s + len(piece.rstrip())))
        return spans, step_end_tokens(ends, spans)

    def after_score(self, ctx: Any, batch: RolloutBatch) -> RolloutBatch:  # ScoreAugmenter
        if batch.turn_ids is not None:
            raise DataError("planners: process_credit cuts single replies into steps, but this batch already has "
                            "turn_ids (rollout.mode=episodes numbers the turns); use rollout.mode=sample.")
        if len(batch.meta) != batch.batch_size:
            raise DataError("planners: process_credit needs each row's reply text (batch.meta[i]['completion']).")
        B, T = batch.response_ids.shape
        attn = batch.response_attn if batch.response_attn is not None else batch.response_mask
        rewards, turns = torch.zeros(B, T), torch.zeros(B, T, dtype=torch.long)
        S = self.horizon
        step_r, step_e = torch.zeros(B, S), torch.full((B, S), -1, dtype=torch.long)
        n_steps, failed = torch.zeros(B, dtype=torch.long), torch.zeros(B)
        mask = batch.response_mask.clone()
        st = self.state
        for i, m in enumerate(batch.meta):
            st["rows"] += 1
            pos = attn[i].nonzero().flatten()
            ids = batch.response_ids[i, pos].tolist()
            text = m["completion"]
            spans, ends = self._spans(ctx.tokenizer, ids, batch.sampler_logprobs[i, pos], text) if ids else ([], [])
            if not spans:
                st["empty"] += 1
                continue
            st["one_step"] += len(spans) == 1
            row = dict(m.get("row") or {})
            prompt = row.pop("prompt", m.get("prompt", ""))
            steps = [text[s:e] for s, e in spans]
            try:
                scores = self._scorer()(prompt if isinstance(prompt, str) else m.get("prompt", ""), text, steps, **row)
                why = check_scores(scores, len(steps))
            except Exception as e:  # noqa: BLE001  (a scorer's own failure is reported with the row)
                why = f"the scorer raised {type(e).__name__}: {e}"
            if why:
                if self.on_error == "raise":
                    raise DataError(f"planners: process_credit scorer {self.scorer!r} on row {i} ({len(steps)} steps, "
                                    f"reply {text[:80]!r}): {why}. Fix the scorer, or set on_error=mask to skip "
                                    "such rows (counted).")
                st["failed"] += 1
                failed[i], mask[i] = 1.0, False
                continue
            r_row, t_row, merged = place_steps(ends, [self.weight * float(s) for s in scores], len(ids))
            st["merged"] += merged
            rewards[i, pos], turns[i, pos] = r_row, t_row
            uniq = sorted(set(ends))[:S]
            n_steps[i] = len(uniq)
            step_e[i, :len(uniq)] = torch.tensor(uniq)
            step_r[i, :len(uniq)] = torch.tensor([r_row[e].item() for e in uniq])
        if batch.token_rewards is not None:
            rewards = rewards + batch.token_rewards
        extras = {**batch.extras, "step_rewards": step_r, "step_ends": step_e, "num_steps": n_steps,
                  "step_failed": failed}
        return batch.replace(token_rewards=rewards, turn_ids=turns, response_mask=mask, extras=extras)

