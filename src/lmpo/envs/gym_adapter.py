"""Gymnasium adapter: any ``gymnasium`` environment as a text environment, through a text codec.

A :class:`TextCodec` says how the wrapped environment is shown to the model and how a reply becomes an action:

- ``describe(env)``: the instructions (goal, legal actions, answer format), put before the first observation;
- ``render(env, obs, info)``: one observation as text;
- ``parse(env, text)``: the action in a reply, or ``None`` if there is none.

An unparsable reply is not a crash: the environment does not move, the observation says what was wrong and lists
the legal actions, the reward is 0 and ``info["invalid_action"]`` is True (the rollout counts these). Gymnasium's
``terminated or truncated`` is ``done``; ``info["terminated"]``/``info["truncated"]`` keep the distinction.

:class:`GymnasiumEnv` (registered as ``gymnasium``) wraps any environment id with :class:`WordCodec`: a discrete
action is named by one of ``action_words`` (or its index), the observation is Python's ``repr`` of Gymnasium's.
"""

from __future__ import annotations

import abc

import re
from dataclasses import dataclass, field
from typing import Any

from lmpo.envs.base import Step
from lmpo.errors import ConfigError
from lmpo.registry import ENVS

_ACTION_TAG = re.compile(r"<action>(.*?)</action>", re.S | re.I)


def _gymnasium():
    try:
        import gymnasium
    except ImportError:
        raise ConfigError(
            "The Gymnasium adapter needs the `gymnasium` package: pip install 'lmpo[agents]'."
        ) from None
    return gymnasium


class TextCodec(abc.ABC):
    """How a Gymnasium environment reads and writes text; subclass and override what differs."""

    def describe(self, env: Any) -> str:
        return ""

    def render(self, env: Any, obs: Any, info: dict) -> str:
        return repr(obs)

    @abc.abstractmethod
    def parse(self, env: Any, text: str) -> Any | None:
        ...

    def legal(self, env: Any) -> str:
        """The legal actions, as the invalid-action message lists them."""
        return str(env.action_space)


@dataclass
class WordCodec(TextCodec):
    """Discrete actions named by words (``words[i]`` is action ``i``) or, without words, by their index.

    The reply's ``<action>...</action>`` part is read if there is one, else the whole reply; by default the last
    action word in it wins ("not left but right" -> right), with ``pick="first"`` the first one ("Down. Then
    right." -> down: what a small model that starts with its move and then rambles means).
    """

    words: list[str] = field(default_factory=list)
    pick: str = "last"

    def __post_init__(self) -> None:
        if self.pick not in ("first", "last"):
            raise ConfigError(f'WordCodec pick must be "first" or "last", got "{self.pick}".')

    def legal(self, env: Any) -> str:
        return ", ".join(self.words) if self.words else ", ".join(str(i) for i in range(env.action_space.n))

    def parse(self, env: Any, text: str) -> int | None:
        tagged = _ACTION_TAG.findall(text)
        text = (tagged[-1] if tagged else text).lower()
        names = [w.lower() for w in self.words] or [str(i) for i in range(env.action_space.n)]
        hits = re.findall(r"\b(" + "|".join(map(re.escape, names)) + r")\b", text)
        if not hits:
            return None
        return names.index(hits[0] if self.pick == "first" else hits[-1])


class GymTextEnv:
    """A Gymnasium environment behind the text protocol (:class:`lmpo.envs.base.Env`)."""

    def __init__(self, env: Any, codec: TextCodec):
        self.env = env
        self.codec = codec
        self.invalid_actions = 0

    def reset(self, seed: int | None = None) -> str:
        obs, info = self.env.reset(seed=seed)
        self._obs, self.invalid_actions = obs, 0
        intro = self.codec.describe(self.env)
        shown = self.codec.render(self.env, obs, info)
        return f"{intro}\n\n{shown}" if intro else shown

    def step(self, action: str) -> Step:
        act = self.codec.parse(self.env, action)
        if act is None or not self.env.action_space.contains(act):
            self.invalid_actions += 1
            text = (
                f"Invalid action: no legal action found in your reply ({action.strip()[:60]!r}). "
                f"Legal actions: {self.codec.legal(self.env)}. Nothing moved.\n\n"
                + self.codec.render(self.env, self._obs, {})
            )
            return Step(text, 0.0, False, {"invalid_action": True})
        obs, reward, terminated, truncated, info = self.env.step(act)
        self._obs = obs
        info = {**info, "invalid_action": False, "terminated": bool(terminated), "truncated": bool(truncated)}
        return Step(self.codec.render(self.env, obs, info), float(reward), bool(terminated or truncated), info)


@ENVS.register("gymnasium", paper="Gymnasium: A Standard Interface for Reinforcement Learning Environments",
               arxiv="2407.17032")
@dataclass
class GymnasiumEnv(GymTextEnv):
    """Any Gymnasium environment id, actions named by ``action_words`` (or their index), ``repr`` observations."""

    env_id: str = "FrozenLake-v1"
    make_kwargs: dict = field(default_factory=dict)
    action_words: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        gym = _gymnasium()
        try:
            env = gym.make(self.env_id, **self.make_kwargs)
        except Exception as exc:  # noqa: BLE001 - unknown ids and bad kwargs are config errors
            raise ConfigError(
                f'Cannot make Gymnasium environment "{self.env_id}" with {self.make_kwargs}: {exc}'
            ) from None
        if not hasattr(env.action_space, "n"):
            raise ConfigError(f'GymnasiumEnv handles discrete action spaces; "{self.env_id}" has {env.action_space}.')
        if self.action_words and len(self.action_words) != env.action_space.n:
            raise ConfigError(
                f'"{self.env_id}" has {env.action_space.n} actions but action_words has {len(self.action_words)}.'
            )
        GymTextEnv.__init__(self, env, WordCodec(list(self.action_words)))
