"""``countdown``: the Countdown puzzle (:mod:`lmpo.tasks.countdown`) as a multi-step environment, one equation a turn.

``reset(seed)`` draws the puzzle of that seed and shows the pool and the target (``"3 5 2 16="`` with the default
tiny template). Each reply's first equation ``a op b = c`` is one move: a legal move replaces ``a`` and ``b`` by
``c`` in the pool; reaching the target earns 1 and ends the episode; a pool of one number that is not the target
ends it with 0. A reply without a legal equation is an invalid action (``info["invalid_action"]``): with
``on_invalid="end"`` (default) the episode ends with 0, with ``"retry"`` the same state is shown again. The state
is the pool, so two move orders that reach the same pool reach the same state (``info["state"]``).

The environment is deterministic given the seed and the replies, so the tree search (:mod:`lmpo.search`) can
replay any path; :meth:`CountdownEnv.solved_by` checks a whole transcript with the task's checker.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmpo.errors import ConfigError
from lmpo.registry import ENVS
from lmpo.tasks.countdown import OPS, CountdownSpec, apply_equation, check_solution, parse_equations, render


@ENVS.register("countdown", paper="", arxiv="")
@dataclass
class CountdownEnv:
    """Countdown, one equation per turn (module docstring); difficulty knobs as :class:`CountdownSpec`.

    Attributes:
        num_count, steps, min_value, max_value, ops, max_target: The puzzle generator's knobs.
        template: Observation with ``{numbers}`` (the pool), ``{target}`` and optionally ``{ops}``.
        on_invalid: ``"end"`` or ``"retry"`` after a reply with no legal equation.
    """

    num_count: int = 3
    steps: int = 2
    min_value: int = 1
    max_value: int = 9
    ops: str = "+"
    max_target: int = 99
    template: str = "{numbers} {target}="
    on_invalid: str = "end"
    _spec: CountdownSpec = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._spec = CountdownSpec(self.num_count, self.steps, self.min_value, self.max_value, self.ops,
                                   self.max_target)
        self._spec.validate("env countdown")
        if self.on_invalid not in ("end", "retry"):
            raise ConfigError(f'env countdown: on_invalid must be "end" or "retry", got {self.on_invalid!r}.')
        self.numbers: list[int] = []
        self.target = 0
        self.pool: tuple[int, ...] = ()
        self._done = True

    def reset(self, seed: int | None = None) -> str:
        p = self._spec.puzzle(0 if seed is None else int(seed))
        self.numbers, self.target = p["numbers"], p["target"]
        self.solution = p["solution"]
        self.pool = tuple(sorted(self.numbers))
        self._done = False
        return self.observation()

    def observation(self) -> str:
        return render(self.template, list(self.pool), self.target, self.ops)

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        if self._done:
            raise RuntimeError("countdown: step() before reset() or after the episode ended")
        eqs = parse_equations(action)
        error = "no equation of the form a+b=c" if not eqs else None
        if eqs:
            pool, error = apply_equation(self.pool, eqs[0], self.ops)
        if error:
            info = {"invalid_action": True, "error": error, "state": self.pool}
            if self.on_invalid == "end":
                self._done = True
                return "", 0.0, True, info
            return self.observation(), 0.0, False, info
        self.pool = pool
        solved = eqs[0].c == self.target
        self._done = solved or len(self.pool) < 2
        info = {"invalid_action": False, "state": self.pool, "solved": solved}
        return ("" if self._done else self.observation()), (1.0 if solved else 0.0), self._done, info

    def solved_by(self, text: str) -> bool:
        """Whether ``text`` (all moves written out) solves the current puzzle (the task's exact checker)."""
        return check_solution(self.numbers, self.target, text, self.ops or OPS).solved
