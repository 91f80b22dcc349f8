"""GSPR: "GSPR: Aligning LLM Safeguards as Generalizable Safety Policy Reasoners", arXiv:2509.24418 (Sec. 3.3, the
reward; checked against the authors' released reward function, verl/utils/reward_score/safety_checklist_box.py).

The guard model reads a safety policy list and a prompt (or prompt + response) and writes a short reasoning in
``<think>...</think>``, then ``\\safety{safe|unsafe}`` and ``\\category{<violated policy or "not applicable">}``:

    f = 1 iff the reply matches <think>.*</think>.*\\safety{.*}.*\\category{.*}.* (whole reply, any characters)
          and no whitespace 5-gram occurs 10+ times and no CJK character appears, else 0
    s = 1[safety == label],  c = 1[category == gold category]   (case-insensitive, normalised)
    m = 0.5 if the reply has >= 2.5x the words of its think block, else 1
    r = m * (0.55 * f * s + 0.45 * f * c)

The last ``\\safety{`` / ``\\category{`` block is read, with nested braces balanced; extracted text drops ``**``,
joins ", " into ",", is lower-cased and stripped of spaces and quotes. Training is GRPO on r (temperature 0.7, top-p
0.8, 5 rollouts per prompt in the released launcher); the cold-start SFT and the 19-taxonomy data mix are data, not
code here. What differs from GRPO: only the reward.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from lmpo.errors import RewardError
from lmpo.registry import REWARDS

_FORMAT = re.compile(r"<think>.*</think>.*\\safety\{.*\}.*\\category\{.*\}.*", re.DOTALL)
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_CJK = re.compile(r"[\u4e00-\u9fff]")


def last_block(text: str, command: str) -> str | None:
    """The content of the last ``\\command{...}`` (nested braces balanced), or None."""
    start = text.rfind("\\" + command + "{")
    if start < 0:
        return None
    depth, body = 0, text[start + len(command) + 2:]
    for i, ch in enumerate(body):
        depth += (ch == "{") - (ch == "}")
        if depth < 0:
            return body[:i].strip()
    return None


def normalise(text: str) -> str:
    return text.replace("**", "").replace(", ", ",").lower().strip().strip("'\"")


def repeats(text: str, n: int = 5, times: int = 10) -> bool:
    words = text.lower().split()
    return any(c >= times for c in Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1)).values())


def format_ok(reply: str) -> bool:
    return bool(_FORMAT.fullmatch(reply)) and not repeats(reply) and not _CJK.search(reply)


def gspr_score(reply: str, label: str, category: str) -> float:
    f = float(format_ok(reply))
    safety, cat = last_block(reply, "safety"), last_block(reply, "category")
    s = float(safety is not None and normalise(safety) == str(label).strip().lower())
    c = float(cat is not None and normalise(cat) == str(category).strip().lower())
    think = _THINK.search(reply)
    think_words = len(think.group(1).split()) if think else 0
    m = 0.5 if think_words and len(reply.split()) >= 2.5 * think_words else 1.0
    return m * (0.55 * f * s + 0.45 * f * c)


@REWARDS.register("gspr_safety", paper="GSPR: Aligning LLM Safeguards as Generalizable Safety Policy Reasoners",
                  arxiv="2509.24418", fidelity="exact")
@dataclass(frozen=True)
class GSPRSafety:
    """GSPR's format-gated safety + category reward with the overlong scale (module docstring).

    Attributes:
        label_column: The row column with "safe" / "unsafe".
        category_column: The row column with the violated policy ("not applicable" when safe).
    """

    label_column: str = "answer"
    category_column: str = "category"

    def __call__(self, prompts: list, completions: list[str], **columns: Any) -> list[float]:
        labels, cats = columns.get(self.label_column), columns.get(self.category_column)
        if labels is None or cats is None:
            raise RewardError(f'gspr_safety needs the columns "{self.label_column}" (safe/unsafe) and '
                              f'"{self.category_column}"; columns here: {", ".join(sorted(columns)) or "(none)"}.')
        return [gspr_score(c, lab, cat) for c, lab, cat in zip(completions, labels, cats)]
