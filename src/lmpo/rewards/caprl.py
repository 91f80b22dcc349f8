"""CapRL: Xing et al., "CapRL: Stimulating Dense Image Caption Capabilities via Reinforcement Learning",
arXiv:2509.22647 (Sec. 3: the decoupled QA reward; the official reward code: option shuffling, the extra "cannot
answer" option, letter parsing).

A reply (the paper: an image caption) is good when a second, *text-only* model reading only the reply can answer
multiple-choice questions about the source it describes. For each question of the row's set the options are
shuffled (seeded), the option "Can not answer based on the text" is appended, the answerer sees (reply, question,
options) and its letter is parsed; the reward is the fraction answered right, in [0, 1]. The policy is trained with
GRPO on it. lmpo applies it to text: a row carries the questions in a column (``questions``: a list of
``{question, options: [...], answer: <the right option's text>}``) and the answerer is any loadable LM or a
``backend`` function (a :class:`lmpo.rewards.judge.Judge` does the generation: batching, caching, timeouts).

Gaps filled (``fidelity="reconstructed"``): the exact answerer prompt wording; an unparsable or timed-out answer
counts as wrong (the official code scores an unmatched letter 0) and is counted in ``reward/caprl/unanswered``; all
questions are asked (``num_questions`` subsamples, seeded by the row). The offline question curation is the user's
data. What differs from GRPO: only the reward.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from typing import Any

from lmpo.errors import RewardError
from lmpo.methods.params import hp
from lmpo.registry import REWARDS

CANNOT = "Can not answer based on the text"
_LETTER = re.compile(r"\b([A-Z])\b")


def shuffled_options(options: list[str], answer: str, rng: random.Random) -> tuple[list[str], str]:
    """The options shuffled, then the "cannot answer" option appended; and the right letter after the shuffle."""
    if answer not in options:
        raise RewardError(f"caprl: the answer {answer!r} is not one of the options {options!r}.")
    opts = list(options)
    rng.shuffle(opts)
    opts.append(CANNOT)
    return opts, string.ascii_uppercase[opts.index(answer)]


def parse_letter(text: str | None, n: int) -> str | None:
    """The first standalone capital letter among the first ``n`` option letters, or None."""
    m = next((m for m in _LETTER.finditer(text or "") if m.group(1) in string.ascii_uppercase[:n]), None)
    return m.group(1) if m else None


@REWARDS.register("caprl", paper="CapRL: Stimulating Dense Image Caption Capabilities via Reinforcement Learning",
                  arxiv="2509.22647", fidelity="reconstructed")
@dataclass(frozen=True, eq=False)
class CapRL:
    """The QA-utility reward (module docstring).

    Attributes:
        model: The answerer: any ``lmpo.models.load`` spec (ignored with ``backend``).
        backend: ``"module:function"``: prompts -> answers, instead of ``model``.
        questions_column: The row column with the question set.
        num_questions: Questions asked per reply (0: all).
        template: The answerer's prompt, with ``{text}``, ``{question}`` and ``{options}``.
        seed: Seeds the option shuffles (with the prompt and reply: the same sample gets the same shuffles).
        temperature, max_new_tokens, batch_size, timeout_s: the answerer's generation (as ``judge``).
    """

    model: str = "default"
    backend: str | None = None
    questions_column: str = "questions"
    num_questions: int = hp(0, ge=0)
    template: str = "Text: {text}\nQuestion: {question}\n{options}\nAnswer with the letter of the right option.\n"
    seed: int = 0
    temperature: float = hp(0.0, ge=0)
    max_new_tokens: int = hp(10, ge=1)
    batch_size: int = hp(8, ge=1)
    timeout_s: float | None = hp(None, gt=0)

    def __post_init__(self) -> None:
        from lmpo.rewards.judge import Judge

        object.__setattr__(self, "answerer", Judge(template="{completion}", model=self.model, backend=self.backend,
                                                   temperature=self.temperature, max_new_tokens=self.max_new_tokens,
                                                   batch_size=self.batch_size, timeout_s=self.timeout_s,
                                                   cache_size=0))
        object.__setattr__(self, "_stats", {})

    def __call__(self, prompts: list, completions: list[str], **columns: Any) -> list[float]:
        sets = columns.get(self.questions_column)
        if sets is None or any(not isinstance(q, list) or not q for q in sets):
            raise RewardError(f'caprl needs a non-empty list of questions per row in the "{self.questions_column}" '
                              f"column ({{question, options, answer}} each); columns here: "
                              f"{', '.join(sorted(columns)) or '(none)'}.")
        asks, keys = [], []  # one answerer prompt per (reply, question)
        for i, (text, qs) in enumerate(zip(completions, sets)):
            rng = random.Random(f"{self.seed}:{prompts[i]}:{text}")  # the same sample, the same shuffles
            picked = rng.sample(qs, min(self.num_questions, len(qs))) if self.num_questions else qs
            for q in picked:
                opts, right = shuffled_options(list(q["options"]), q["answer"], rng)
                listing = "\n".join(f"{string.ascii_uppercase[k]}. {o}" for k, o in enumerate(opts))
                asks.append(self.template.format(text=text, question=q["question"], options=listing))
                keys.append((i, right, len(opts)))
        answers = self.answerer.verdicts(asks)
        right_counts, totals = [0] * len(completions), [0] * len(completions)
        unanswered = 0
        for (i, right, n), got in zip(keys, answers):
            letter = parse_letter(got[0], n)
            unanswered += letter is None
            totals[i] += 1
            right_counts[i] += letter == right
        self._stats["unanswered"] = float(unanswered) + self._stats.get("unanswered", 0.0)
        return [r / t for r, t in zip(right_counts, totals)]

    def pop_metrics(self) -> dict[str, float]:
        out = {**self._stats, **self.answerer.pop_metrics()}
        self._stats.clear()
        return out
