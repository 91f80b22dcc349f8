"""``tiny_search``: the smallest search environment, for the tool-use methods' learning tests on the tiny model.

The question is one digit followed by a mark: ``"3="`` is a question whose answer the policy can know (the digit
itself: the copy rule of ``configs/tiny.yaml``), ``"3+"`` one whose answer is hidden (a digit drawn from the seed,
unrelated to the one shown). A reply is

* a **search** when it starts with ``"+"``: the environment answers with the answer digit and ``"="`` (``"7="``),
  counts one valid tool call (``info["tool_metrics"]``, summed into ``extras["tool_calls"]`` and per turn into
  ``extras["turn_tool_calls"]`` by ``rollout.mode: episodes``), reward 0, not done;
* an **answer** when it starts with a digit: reward 1 if it is the answer, and the episode ends; with
  ``retry: true`` a wrong answer shows the question again instead of ending the episode (so a right answer can come
  after a wrong guess and a later search);
* anything else is an invalid action (the question is shown again).

With ``require_search: true`` an answer to a hidden question counts only after a search (a lucky guess earns 0 and
is treated as wrong), so the task cannot be solved without the tool: the setting of tool-integrated reasoning,
where ASPO shapes *when* the tool is called.

Only characters of the tiny test tokenizer appear (digits, ``+``, ``=``). ``known_fraction`` is the share of
questions of the first kind (drawn per seed, so a group's episodes share the question). The search decision is the
first reply: AdaSearch rewards searching exactly on hidden questions the policy cannot answer; ASPO prefers correct
episodes that search earlier (``retry: true``, where searching after a wrong guess also succeeds).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lmpo.errors import ConfigError
from lmpo.registry import ENVS

DIGITS = "0123456789"


@ENVS.register("tiny_search", paper="", arxiv="")
@dataclass
class TinySearchEnv:
    """Answer a one-digit question, searching ("+") when the answer is hidden (module docstring).

    Attributes:
        known_fraction: Share of seeds whose answer is the digit shown (``"d="``); the others are hidden (``"d+"``).
        retry: A wrong answer shows the question again instead of ending the episode.
        require_search: An answer to a hidden question counts only after a search.
    """

    known_fraction: float = 0.5
    retry: bool = False
    require_search: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.known_fraction, bool) or not isinstance(self.known_fraction, (int, float)) \
                or not 0.0 <= self.known_fraction <= 1.0:
            raise ConfigError(f"env tiny_search: known_fraction must be a number in [0, 1], got {self.known_fraction!r}.")
        for key in ("retry", "require_search"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"env tiny_search: {key} must be true or false, got {getattr(self, key)!r}.")
        self.question = ""
        self.answer = ""
        self.known = False
        self.searches = 0

    def reset(self, seed: int | None = None) -> str:
        rng = random.Random(seed)
        shown = rng.choice(DIGITS)
        self.known = rng.random() < self.known_fraction
        self.answer = shown if self.known else rng.choice(DIGITS)
        self.question = shown + ("=" if self.known else "+")
        self.searches = 0
        return self.question

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        if not self.question:
            raise RuntimeError("tiny_search: step() before reset()")
        first = action.strip()[:1]
        if first == "+":
            self.searches += 1
            return self.answer + "=", 0.0, False, {"tool_metrics": {"calls": 1, "valid": 1}}
        if first and first in DIGITS:
            right = first == self.answer and (self.known or self.searches > 0 or not self.require_search)
            if right or not self.retry:
                return "", float(right), True, {"known": self.known, "searches": self.searches}
            return self.question, 0.0, False, {}
        return self.question, 0.0, False, {"invalid_action": True}
