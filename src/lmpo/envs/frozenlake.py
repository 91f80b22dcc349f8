"""FrozenLake as a text grid world: the built-in example of the Gymnasium adapter.

The observation is the map with the player drawn as ``P``::

    P F F F
    F H F H
    F F F H
    H F F G

Actions are the words left, down, right, up (Gymnasium's actions 0-3), read from the reply (see
:class:`lmpo.envs.gym_adapter.WordCodec`). Reaching ``G`` gives reward 1 and ends the episode; stepping on a hole
``H`` ends it with 0. With ``random_map`` each seed draws its own solvable map, so a group of episodes with one
seed shares its map and different seeds teach navigation rather than one memorised path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmpo.envs.gym_adapter import GymTextEnv, WordCodec, _gymnasium
from lmpo.errors import ConfigError
from lmpo.registry import ENVS

ACTIONS = ["left", "down", "right", "up"]  # Gymnasium's FrozenLake action order


class FrozenLakeCodec(WordCodec):
    """The grid as text, actions as direction words."""

    def __init__(self) -> None:
        super().__init__(list(ACTIONS))

    def describe(self, env: Any) -> str:
        return (
            "You are P on a frozen lake. S is the start, F is frozen ice (safe), H is a hole (falling in ends the "
            "game), G is the goal. Reach G. Each turn, answer with one move: left, down, right or up."
        )

    def render(self, env: Any, obs: Any, info: dict) -> str:
        desc = env.unwrapped.desc
        ncol = desc.shape[1]
        rows = []
        for r, row in enumerate(desc):
            cells = [c.decode() for c in row]
            if r == int(obs) // ncol:
                cells[int(obs) % ncol] = "P"
            rows.append(" ".join(cells))
        grid = "\n".join(rows)
        cell = desc.flat[int(obs)].decode()
        if cell == "G":
            return grid + "\nYou reached the goal!"
        if cell == "H":
            return grid + "\nYou fell into a hole. Game over."
        return grid


@ENVS.register("frozenlake", paper="Gymnasium: A Standard Interface for Reinforcement Learning Environments",
               arxiv="2407.17032")
@dataclass
class FrozenLakeEnv(GymTextEnv):
    """FrozenLake-v1 as a text grid world; moves are the words left/down/right/up."""

    map_name: str = "4x4"
    is_slippery: bool = False
    random_map: bool = False
    size: int = 4
    max_episode_steps: int = 20

    def __post_init__(self) -> None:
        self._gym = _gymnasium()
        if self.map_name not in ("4x4", "8x8"):
            raise ConfigError(f'frozenlake map_name must be "4x4" or "8x8", got "{self.map_name}".')
        GymTextEnv.__init__(self, self._make(None), FrozenLakeCodec())

    def _make(self, desc: list[str] | None) -> Any:
        kwargs = {"desc": desc} if desc is not None else {"map_name": self.map_name}
        return self._gym.make("FrozenLake-v1", is_slippery=self.is_slippery,
                              max_episode_steps=self.max_episode_steps, **kwargs)

    def reset(self, seed: int | None = None) -> str:
        if self.random_map:
            from gymnasium.envs.toy_text.frozen_lake import generate_random_map

            self.env = self._make(generate_random_map(size=self.size, seed=seed))
        return super().reset(seed)
