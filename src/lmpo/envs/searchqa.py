"""Search QA over the shipped corpus: questions about an invented island, answerable only by searching.

The questions are ``lmpo/tools/data/corpus_qa.jsonl`` (one per passage of the shipped corpus, about Teskar, an
island no model has read about), so a right answer means the policy looked it up with the ``search`` tool (BM25,
:mod:`lmpo.tools.search`). Seed ``k`` asks question ``k mod 32`` in a fixed shuffled order, so the ``env`` task's
training seeds ``0..num_train-1`` and held-out seeds ``num_train..num_train+num_eval-1`` ask different questions
whenever ``num_train + num_eval <= 32``. The reward is 1 if the answer appears in the final reply (a reply without a
tool call; after ``Answer:`` if present), plus ``format_reward`` once for the first turn with a valid search.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lmpo.envs.tool_env import ToolEnv
from lmpo.errors import ConfigError
from lmpo.registry import ENVS
from lmpo.tools import ToolSet
from lmpo.tools.search import make_search_tool, shipped_questions

EXAMPLE_CALL = '<tool_call>{"name": "search", "arguments": {"query": "height of Mount Karsk"}}</tool_call>'


@ENVS.register("searchqa", paper="Search-R1: Training LLMs to Reason and Leverage Search Engines with Reinforcement "
                                 "Learning", arxiv="2503.09516")
@dataclass
class SearchQAEnv(ToolEnv):
    """Questions about the shipped corpus with a ``search`` tool (module docstring).

    Attributes:
        k: Passages a search returns (1-5; each is about 40 tokens of context).
        format_reward: Added once, on the first turn with a valid search call (0 = reward only the right answer).
        timeout: Seconds a search may take.
        example: Start each episode with one worked exchange (question, search, passage, answer) after the system
            prompt.
    """

    k: int = 1
    format_reward: float = 0.0
    timeout: float = 10.0
    example: bool = True

    preamble = ("Answer questions about the island of Teskar. You cannot know the answer: search for it. To search, "
                "reply with only a tool call like this:\n" + EXAMPLE_CALL + "\nThe passages come back in the next "
                "message. Then reply with the final answer as 'Answer: <answer>'.")

    def __post_init__(self) -> None:
        if not 1 <= self.k <= 5:
            raise ConfigError(f"searchqa k must be in [1, 5], got {self.k}.")
        if not 0.0 <= self.format_reward < 1.0:
            raise ConfigError(f"searchqa format_reward must be in [0, 1), got {self.format_reward}.")
        ToolEnv.__init__(self, ToolSet([make_search_tool(default_k=self.k)], timeout=self.timeout))
        questions = shipped_questions()
        random.Random(0).shuffle(questions)
        self.questions = questions

    @property
    def system_prompt(self) -> str:
        return self.preamble

    def system_prompt_for(self, template_renders_tools: bool) -> str:
        return self.preamble

    @property
    def examples(self) -> list[dict]:
        """One worked exchange (a search, its passage, the answer) when ``example`` is on."""
        if not self.example:
            return []
        return [{"role": "user", "content": "How tall is Mount Karsk?"}, {"role": "assistant", "content": EXAMPLE_CALL},
                {"role": "tool", "name": "search", "content": self.tools.functions["search"]("height of Mount Karsk", 1)},
                {"role": "assistant", "content": "Answer: 2,214 metres"}]

    def problem(self, seed: int | None) -> tuple[str, str]:
        q = self.questions[(seed or 0) % len(self.questions)]
        return q["question"], str(q["answer"])
