"""The text-environment protocol and the checks a rollout puts around a user's environment.

An environment is any object with

    reset(seed: int | None = None) -> str                         # the first observation
    step(action: str) -> (observation: str, reward: float, done: bool, info: dict)

Text in, text out: the policy's reply is the action, the observation is the next message the policy sees. By
default an observation becomes one ``user`` message; an environment that answers with other roles (tool results)
puts the chat messages in ``info["messages"]`` (see :func:`observation_messages`) and may give the reply as a
structured assistant message in ``info["assistant_message"]`` (with ``tool_calls``; for transcripts, never
re-rendered into tokens). An environment may also define ``system_prompt`` (a string), ``examples`` (chat messages
put between the system prompt and the first observation: a worked exchange that shows a small model the format) and
``tools`` (a :class:`lmpo.tools.ToolSet`, whose ``schemas`` go to ``apply_chat_template(tools=...)``); all are
optional.
Seeds: ``reset(seed)`` with the same seed must give the same episode start, so that a group's episodes share their
initial state.

The multi-turn rollout calls environments only through :func:`checked_reset` and :func:`checked_step`, which turn an
environment that raises or returns the wrong types into an :class:`EnvError` naming the environment and what was
wrong, and truncate observations that are too long (``info["observation_truncated"]``). :func:`run_episode` is the
reference single-episode loop (a policy is any ``messages -> reply`` callable): the batched rollout must give the
same transcript for the same replies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Protocol, runtime_checkable

from lmpo.errors import LmpoError

MAX_OBSERVATION_CHARS = 8000


class EnvError(LmpoError):
    """An environment raised, or returned something that is not (str, float, bool, dict)."""


@runtime_checkable
class Env(Protocol):
    """What every text environment implements (structural: no base class needed)."""

    def reset(self, seed: int | None = None) -> str: ...

    def step(self, action: str) -> tuple[str, float, bool, dict]: ...


class Step(NamedTuple):
    """One environment transition; unpacks like Gymnasium's ``(observation, reward, done, info)``."""

    observation: str
    reward: float
    done: bool
    info: dict


def env_name(env: Any) -> str:
    """A readable name for error messages: the class's module path."""
    cls = type(env)
    return f"{cls.__module__}:{cls.__qualname__}"


def _truncate(text: str, limit: int) -> tuple[str, bool]:
    if len(text) <= limit:
        return text, False
    return text[:limit] + f"\n[... observation truncated: {len(text)} characters, limit {limit}]", True


def checked_reset(env: Any, seed: int | None = None, *, max_chars: int = MAX_OBSERVATION_CHARS) -> str:
    """``env.reset(seed)``, with a clear :class:`EnvError` if it raises or does not return a string."""
    try:
        obs = env.reset(seed)
    except Exception as exc:  # noqa: BLE001 - any user error becomes one clear message
        raise EnvError(
            f"Environment {env_name(env)} raised in reset(seed={seed}): {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(obs, str):
        raise EnvError(
            f"Environment {env_name(env)}.reset(seed={seed}) returned a {type(obs).__name__} ({str(obs)[:80]!r}); "
            f"it must return the first observation as a string."
        )
    return _truncate(obs, max_chars)[0]


def checked_step(env: Any, action: str, *, max_chars: int = MAX_OBSERVATION_CHARS) -> Step:
    """``env.step(action)`` as a :class:`Step`, type-checked; over-long observations are truncated (flagged in info)."""
    where = f"Environment {env_name(env)}.step"
    try:
        out = env.step(action)
    except Exception as exc:  # noqa: BLE001
        raise EnvError(f"{where} raised on action {action[:80]!r}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(out, tuple) or len(out) != 4:
        raise EnvError(f"{where} returned {str(out)[:80]!r}; it must return (observation, reward, done, info).")
    obs, reward, done, info = out
    problems = []
    if not isinstance(obs, str):
        problems.append(f"observation is a {type(obs).__name__}, expected str")
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(float(reward)):
        problems.append(f"reward is {reward!r}, expected a finite number")
    if not isinstance(done, bool):
        problems.append(f"done is {done!r} ({type(done).__name__}), expected a bool")
    if not isinstance(info, dict):
        problems.append(f"info is a {type(info).__name__}, expected a dict")
    if problems:
        raise EnvError(f"{where} returned bad values: {'; '.join(problems)}.")
    obs, cut = _truncate(obs, max_chars)
    if cut:
        info = {**info, "observation_truncated": True}
    return Step(obs, float(reward), done, info)


def observation_messages(observation: str, info: dict | None = None) -> list[dict]:
    """The chat messages an observation adds: ``info["messages"]`` if given, else one ``user`` message."""
    if info and info.get("messages"):
        return list(info["messages"])
    return [{"role": "user", "content": observation}]


@dataclass
class Episode:
    """The transcript of one episode: chat messages, per-turn rewards and infos, and how it ended."""

    messages: list[dict]
    rewards: list[float] = field(default_factory=list)
    infos: list[dict] = field(default_factory=list)
    done: bool = False

    @property
    def turns(self) -> int:
        return len(self.rewards)

    @property
    def total_reward(self) -> float:
        return sum(self.rewards)


def run_episode(
    env: Any, policy: Callable[[list[dict]], str], *, seed: int | None = None, max_turns: int = 10
) -> Episode:
    """Play one episode: the policy answers the chat so far, the environment answers the policy, until done or
    ``max_turns`` policy turns. The reference loop for the batched multi-turn rollout."""
    messages = []
    if getattr(env, "system_prompt", None):
        messages.append({"role": "system", "content": env.system_prompt})
    messages += [dict(m) for m in getattr(env, "examples", None) or []]
    messages.append({"role": "user", "content": checked_reset(env, seed)})
    episode = Episode(messages)
    for _ in range(max_turns):
        action = policy(list(messages))
        messages.append({"role": "assistant", "content": action})
        obs, reward, done, info = checked_step(env, action)
        episode.rewards.append(reward)
        episode.infos.append(info)
        if done:
            episode.done = True
            break
        messages.extend(observation_messages(obs, info))
    return episode
