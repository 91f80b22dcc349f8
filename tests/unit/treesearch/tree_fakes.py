"""A scripted proposer and a table-driven domain for the tree-search tests (values derivable by hand)."""

from __future__ import annotations

from lmpo.search import Proposal, Transition


class Scripted:
    """``steps[prefix]`` lists (text, logprob) proposals, served in order and cycled; logs every call."""

    def __init__(self, steps: dict[str, list[tuple[str, float]]]):
        self.steps, self.calls, self.cursor = steps, [], {}

    def propose(self, prefix, k, seed):
        self.calls.append((prefix, k))
        opts = self.steps.get(prefix, [])
        if not opts:
            raise AssertionError(f"no scripted steps for {prefix!r}")
        start = self.cursor.get(prefix, 0)
        self.cursor[prefix] = start + k
        return [Proposal(t, lp, 1) for t, lp in (opts[(start + j) % len(opts)] for j in range(k))]


class Table:
    """State = the path's steps; ``outcome[path]`` = (reward, done) of the step ending that path (default 0, not done).
    Prefix = "r" + the steps joined with "/" (so "r/a/c")."""

    def __init__(self, outcome: dict[tuple[str, ...], tuple[float, bool]]):
        self.outcome = outcome

    def start(self):
        return "r", ()

    def step(self, state, action):
        path = (*state, action)
        reward, done = self.outcome.get(path, (0.0, False))
        return Transition(path, reward, done, "/" + action)
