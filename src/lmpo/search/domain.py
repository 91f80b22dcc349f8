"""What the tree search searches in (a :class:`SearchDomain`) and what proposes its steps (a :class:`StepProposer`).

A **domain** gives the root (its prompt text and state) and the transition of a state under one step's text:
the next state, the step's reward, whether the episode ended, and the text the step adds to the prefix (the step,
a separator and the environment's answer). :class:`EnvDomain` makes any text environment of :mod:`lmpo.envs` a
domain by replaying the path from ``reset(seed)`` (environments are deterministic given the seed and the replies).

A **proposer** samples ``k`` continuations of a prefix, each one step with its log-probability under the policy:
:class:`GeneratorProposer` puts a rollout :class:`~lmpo.rollout.base.Generator` behind the interface (one
``generate`` call of ``k`` copies of the prefix; one step = one completion, cut at ``max_new_tokens`` or EOS), seeded
per call so a search is deterministic under its seed. Tests use scripted proposers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch

from lmpo.envs.base import checked_reset, checked_step
from lmpo.rollout.base import SamplingParams


class Proposal(NamedTuple):
    """One sampled step: its text, its summed log-prob under the proposer, its token count."""

    text: str
    logprob: float
    num_tokens: int


class Transition(NamedTuple):
    state: Any
    reward: float
    done: bool
    text: str  # what the step adds to the prefix (the step itself, a separator, the environment's reply)


class SearchDomain(Protocol):
    def start(self) -> tuple[str, Any]:
        """The root's prompt text and state."""
        ...

    def step(self, state: Any, action: str) -> Transition: ...


class StepProposer(Protocol):
    def propose(self, prefix: str, k: int, seed: int) -> list[Proposal]:
        """``k`` sampled steps continuing ``prefix`` (deterministic given ``seed``)."""
        ...


@dataclass
class EnvDomain:
    """A text environment as a search domain: the state is the tuple of steps taken, replayed from ``reset(seed)``.

    The prefix after steps a_1..a_t is ``instructions + o_0 + a_1 + sep + o_1 + ... + a_t + sep + o_t``.
    """

    env: Any
    seed: int = 0
    instructions: str = ""
    sep: str = " "

    def start(self) -> tuple[str, Any]:
        return self.instructions + checked_reset(self.env, self.seed), ()

    def step(self, state: tuple[str, ...], action: str) -> Transition:
        checked_reset(self.env, self.seed)
        for a in state:
            checked_step(self.env, a)
        obs, reward, done, _ = checked_step(self.env, action)
        return Transition((*state, action), reward, done, action + self.sep + ("" if done else obs))


@dataclass
class GeneratorProposer:
    """Steps sampled by a rollout generator (:class:`lmpo.rollout.base.Generator`), e.g. ``HFGenerator``."""

    generator: Any
    params: SamplingParams
    stop: str | None = None  # cut each completion before the first ``stop`` (after its first character)
    tokenizer: Any = None  # with ``stop``: counts the kept tokens (exact for character-level tokenizers)

    def propose(self, prefix: str, k: int, seed: int) -> list[Proposal]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = self.generator.generate([prefix] * k, self.params)
        lps = (out.sampler_logprobs * out.response_attn).tolist()
        n = out.response_attn.sum(-1).tolist()
        props = []
        for text, lp, m in zip(out.completions, lps, n):
            if self.stop and self.stop in text[1:]:
                text = text[: text.index(self.stop, 1)]
                m = len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if self.tokenizer else m
            props.append(Proposal(text, float(sum(lp[: int(m)])), int(m)))
        return props


@dataclass
class TokenProposer:
    """One-token steps drawn from a causal LM's next-token distribution at ``temperature`` (one forward per call):
    a fast proposer for single-token actions (the tiny tasks' digits), with the same seeding contract."""

    model: Any
    tokenizer: Any
    temperature: float = 1.0

    @torch.no_grad()
    def propose(self, prefix: str, k: int, seed: int) -> list[Proposal]:
        ids = self.tokenizer(prefix, add_special_tokens=False)["input_ids"]
        logits = self.model(torch.tensor([ids])).logits[0, -1].float()
        logp = torch.log_softmax(logits / max(self.temperature, 1e-6), -1)
        if self.temperature == 0:
            draws = logp.argmax().repeat(k)
        else:
            draws = torch.multinomial(logp.exp(), k, replacement=True, generator=torch.Generator().manual_seed(seed))
        return [Proposal(self.tokenizer.decode([int(t)]), float(logp[t]), 1) for t in draws]
