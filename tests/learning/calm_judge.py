"""A rule-based CALM judge for the tiny multi-turn task (``copy_turns``), used through ``shapers[0].judge:
learning.calm_judge:copy_judge`` (the ``module:function`` adapter of :mod:`lmpo.methods.shape.calm`).

Subgoal ``"k"`` (k = 1, 2, ...) is "the digit shown at turn k was copied": achieved by a transition at turn k - 1
whose reply starts with the digit before the last ``=`` of its history. Token ids of the tiny tokenizer: digits are
3..12, ``=`` is 14."""

from __future__ import annotations

import torch

EQUALS = 14


def copy_judge(transitions, subgoals):
    out = torch.zeros(len(transitions), len(subgoals))
    for n, tr in enumerate(transitions):
        eq = [j for j, tok in enumerate(tr.history) if tok == EQUALS]
        shown = tr.history[eq[-1] - 1] if eq and eq[-1] > 0 else None
        copied = bool(tr.action) and tr.action[0] == shown
        for k, g in enumerate(subgoals):
            out[n, k] = float(copied and int(g) == tr.turn + 1)
    return out
