"""Tool environments: a question the policy answers, calling tools on the way.

:class:`ToolEnv` joins the environment protocol and :mod:`lmpo.tools`. Each reply is parsed for ``<tool_call>``s:

- a reply with calls (valid or not) is answered by the tool results: ``info["messages"]`` holds one ``tool``
  message per call (invalid ones say "invalid call: ..."), ``info["assistant_message"]`` the reply with its
  ``tool_calls`` for templates that render them, ``info["tool_metrics"]`` the counters; reward 0, not done;
- a reply without calls is the final answer: ``score(answer, target)`` is the reward and the episode ends.

Subclasses define ``problem(seed) -> (question, target)`` and may override ``score``; the turn limit is the
rollout's. ``format_reward`` (0 by default) is added once, on the first turn with a valid call. ``system_prompt`` lists the tools in the ``<tool_call>`` format for chat templates that do not render
``tools`` (see :func:`lmpo.tools.template_renders_tools`); ``tools.schemas`` is what ``apply_chat_template`` takes.
"""

from __future__ import annotations

import abc
import re

from lmpo.envs.base import Step
from lmpo.tools import ToolSet, assistant_message, tools_system_prompt

_ANSWER = re.compile(r"answer\s*[:=]\s*(.+)", re.I | re.S)


def normalize(text: str) -> str:
    """Lower case, thousands separators and surrounding punctuation removed, spaces collapsed."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.lower())
    return " ".join(text.strip(" \t\n.!?\"'").split())


def contains_answer(answer: str, target: str) -> float:
    """1.0 if ``target`` appears as a whole word or number in the answer (after ``Answer:`` if present)."""
    found = _ANSWER.findall(answer)
    text, want = normalize(found[-1] if found else answer), normalize(target)
    return float(bool(want) and re.search(rf"(?<![\w.]){re.escape(want)}(?![\w]|\.\d)", text) is not None)


class ToolEnv(abc.ABC):
    """Base class of question-answering environments with tools (see the module docstring)."""

    preamble = "Answer the question. Use the tools when they help, then give the final answer as 'Answer: ...'."
    format_reward = 0.0

    def __init__(self, tools: ToolSet):
        self.tools = tools
        self.target: str | None = None
        self._rewarded_call = False

    @property
    def system_prompt(self) -> str:
        """The preamble with the tools listed in the ``<tool_call>`` format (for templates that do not render tools)."""
        return tools_system_prompt(self.tools.schemas, self.preamble)

    def system_prompt_for(self, template_renders_tools: bool) -> str:
        """The system prompt a rollout uses: the preamble alone where the chat template renders ``tools`` itself."""
        return self.preamble if template_renders_tools else self.system_prompt

    @abc.abstractmethod
    def problem(self, seed: int | None) -> tuple[str, str]:
        """The question shown to the policy and the target answer for ``seed``."""
        ...

    def score(self, answer: str, target: str) -> float:
        """The reward of a final answer (default: the target appears in it)."""
        return contains_answer(answer, target)

    def reset(self, seed: int | None = None) -> str:
        question, self.target = self.problem(seed)
        self._rewarded_call = False
        return question

    def step(self, action: str) -> Step:
        turn = self.tools.respond(action)
        if turn.calls:
            observation = "\n\n".join(m["content"] for m in turn.messages)
            info = {"messages": turn.messages, "assistant_message": assistant_message(action, turn.calls),
                    "tool_metrics": turn.metrics}
            bonus = 0.0
            if self.format_reward and turn.metrics["valid"] and not self._rewarded_call:
                self._rewarded_call, bonus = True, float(self.format_reward)
            return Step(observation, bonus, False, info)
        reward = float(self.score(action, self.target or ""))
        return Step("", reward, True, {"target": self.target, "tool_metrics": turn.metrics})
