"""FrozenLake as a text grid world: the built-in example of the Gymnasium adapter.

The observation is the map with the player drawn as ``P``::

    P F F F
    F H F H
    F F F H
    H F F G

Actions are the words left, down, right, up (Gymnasium's actions 0-3), read from the reply (see
:class:`lmpo.envs.gym_adapter.WordCodec`; ``pick: first`` takes the first direction word anywhere in the reply).

``coordinates: true`` is the layout a small model can act on: numbered rows and columns, then one line saying where
the player and the goal are and asking for one word::

       1 2 3 4
    1  P F F F
    2  F H F H
    3  F F F H
    4  H F F G
    You are at row 1, column 1. The goal G is at row 4, column 4. Holes H end the game.
    Your move (left, down, right or up):
 Reaching ``G`` gives reward 1 and ends the episode; stepping on a hole
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
    """The grid as text, actions as direction words; ``coordinates`` numbers the rows and columns."""

    def __init__(self, pick: str = "last", coordinates: bool = False) -> None:
        super().__init__(list(ACTIONS), pick)
        self.coordinates = coordinates

    def describe(self, env: Any) -> str:
        if self.coordinates:
            return "A frozen lake. P is you, S the start, F safe ice, H is a hole, G is the goal. Walk to G without falling in."
        return (
            "You are P on a frozen lake. S is the start, F is frozen ice (safe), H is a hole (falling in ends the "
            "game), G is the goal. Reach G. Each turn, answer with one move: left, down, right or up."
        )

    def render(self, env: Any, obs: Any, info: dict) -> str:
        desc = env.unwrapped.desc
        ncol = desc.shape[1]
        here = divmod(int(obs), ncol)
        rows = []
        for r, row in enumerate(desc):
            cells = [c.decode() for c in row]
            if r == here[0]:
                cells[here[1]] = "P"
            rows.append((f"{r + 1}  " if self.coordinates else "") + " ".join(cells))
        if self.coordinates:
            rows.insert(0, "   " + " ".join(str(c + 1) for c in range(ncol)))
        grid = "\n".join(rows)
        cell = desc.flat[int(obs)].decode()
        if cell == "G":
            return grid + "\nYou reached the goal!"
        if cell == "H":
            return grid + "\nYou fell into a hole. Game over."
        if self.coordinates:
            goal = divmod(int(next(i for i, c in enumerate(desc.flat) if c == b"G")), ncol)
            return (grid + f"\nYou are at row {here[0] + 1}, column {here[1] + 1}. The goal G is at row {goal[0] + 1}, "
                    f"column {goal[1] + 1}. Holes H end the game.\nYour move (left, down, right or up):")
        return grid


@ENVS.register("frozenlake", paper="Gymnasium: A Standard Interface for Reinforcement Learning Environments",
               arxiv="2407.17032")
@dataclass
class FrozenLakeEnv(GymTextEnv):
    """FrozenLake-v1 as a text grid world; moves are the words left/down/right/up.

    Attributes:
        map_name: Gymnasium's fixed map ("4x4" or "8x8") when ``random_map`` is off.
        is_slippery: Gymnasium's slippery ice (moves go astray).
        random_map: Each seed draws its own solvable ``size`` x ``size`` map.
        size: Side of the random maps.
        max_episode_steps: Gymnasium's time limit (moves, invalid replies not counted).
        coordinates: Numbered rows and columns plus a line with the player's and the goal's positions.
        pick: Which direction word of a reply is the move: ``last`` or ``first``.
    """

    map_name: str = "4x4"
    is_slippery: bool = False
    random_map: bool = False
    size: int = 4
    max_episode_steps: int = 20
    coordinates: bool = False
    pick: str = "last"

    def __post_init__(self) -> None:
        self._gym = _gymnasium()
        if self.map_name not in ("4x4", "8x8"):
            raise ConfigError(f'frozenlake map_name must be "4x4" or "8x8", got "{self.map_name}".')
        if not 2 <= self.size <= 12:
            raise ConfigError(f"frozenlake size must be in [2, 12], got {self.size}.")
        GymTextEnv.__init__(self, self._make(None), FrozenLakeCodec(self.pick, self.coordinates))

    def _make(self, desc: list[str] | None) -> Any:
        kwargs = {"desc": desc} if desc is not None else {"map_name": self.map_name}
        return self._gym.make("FrozenLake-v1", is_slippery=self.is_slippery,
                              max_episode_steps=self.max_episode_steps, **kwargs)

    def reset(self, seed: int | None = None) -> str:
        if self.random_map:
            from gymnasium.envs.toy_text.frozen_lake import generate_random_map

            self.env = self._make(generate_random_map(size=self.size, seed=seed))
        return super().reset(seed)
