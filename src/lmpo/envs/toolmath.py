"""Tool math: arithmetic a small model cannot do in its head but can do with the calculator.

Each seed draws one problem, by default a product of two 3-digit numbers ("What is 347 * 812?"): SmolLM2-135M gets
almost none right from memory, but the right answer is one ``calculator`` call away. A reply with a
``<tool_call>`` is answered by the tool (a ``tool`` message); a reply without one is the final answer and ends the
episode with reward 1 if the right number is in it (after ``Answer:`` if present), else 0. ``format_reward`` adds a
small reward for the first turn with a valid call, which helps a policy that never calls the tool get started; it
is 0 by default so that the return is exactly "the right number".

The system prompt is short on purpose (a 135M model reads every token of it each turn): it shows the one call
format with a worked example instead of the calculator's JSON schema. Chat templates that render ``tools`` get the
schema from the template as well (:meth:`ToolEnv.system_prompt_for`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lmpo.envs.tool_env import ToolEnv
from lmpo.errors import ConfigError
from lmpo.registry import ENVS
from lmpo.tools import build_tools

EXAMPLE_CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "12 * 34"}}</tool_call>'
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@ENVS.register("toolmath", paper="Toolformer: Language Models Can Teach Themselves to Use Tools",
               arxiv="2302.04761")
@dataclass
class ToolMathEnv(ToolEnv):
    """Arithmetic with a calculator tool (module docstring).

    Attributes:
        digits: Digits of each operand (``3``: 100-999).
        operations: The operators problems are drawn from, a string over ``+-*``.
        format_reward: Added once, on the first turn with a valid tool call (0 = reward only the right answer).
        timeout: Seconds a calculator call may take.
        example: Start each episode with one worked exchange (question, call, result, answer) after the system
            prompt: SmolLM2-135M never calls the tool from the instructions alone, and often does after one example.
    """

    digits: int = 3
    operations: str = "*"
    format_reward: float = 0.0
    timeout: float = 5.0
    example: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= 12:
            raise ConfigError(f"toolmath digits must be in [1, 12], got {self.digits}.")
        if not self.operations or set(self.operations) - set(_OPS):
            raise ConfigError(f'toolmath operations must be a non-empty string over "+-*", got "{self.operations}".')
        if not 0.0 <= self.format_reward < 1.0:
            raise ConfigError(f"toolmath format_reward must be in [0, 1), got {self.format_reward}.")
        ToolEnv.__init__(self, build_tools(["calculator"], timeout=self.timeout))

    preamble = ("You can use a calculator. To use it, reply with only a tool call like this:\n" + EXAMPLE_CALL
                + "\nThe result comes back in the next message. Then reply with the final answer as 'Answer: <number>'.")

    @property
    def system_prompt(self) -> str:
        return self.preamble

    def system_prompt_for(self, template_renders_tools: bool) -> str:
        return self.preamble  # the example shows the format; a template that renders tools adds the schema

    @property
    def examples(self) -> list[dict]:
        """One worked exchange (12 * 34 through the calculator) when ``example`` is on."""
        if not self.example:
            return []
        return [{"role": "user", "content": "What is 12 * 34?"}, {"role": "assistant", "content": EXAMPLE_CALL},
                {"role": "tool", "name": "calculator", "content": "408"},
                {"role": "assistant", "content": "Answer: 408"}]

    def problem(self, seed: int | None) -> tuple[str, str]:
        rng = random.Random(f"toolmath-{seed}")
        lo, hi = 10 ** (self.digits - 1) if self.digits > 1 else 0, 10**self.digits - 1
        op = rng.choice(self.operations)
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        return f"What is {a} {op} {b}?", str(_OPS[op](a, b))
