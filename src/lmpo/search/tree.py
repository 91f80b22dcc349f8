"""The search tree: nodes are step prefixes, edges sampled steps; values are backed-up returns.

A node holds the step that led to it (text, log-prob, token count), the transition's reward and whether it ended
the episode, its prefix text (what the policy sees before the next step), and visit statistics: ``visits`` N and
``value_sum`` W, so Q = W / N is the mean return from entering the node (its own reward included). The tree turns
into training data:

- :meth:`Tree.step_pairs`: at every node with at least two visited children, the highest-Q child is preferred to the
  lowest-Q one (both continue the same prefix): step-level preference pairs (MCTS-DPO);
- :meth:`Tree.step_values`: (prefix, step, Q, N) for every visited edge (step values for a value model or PRM);
- :meth:`Tree.success_pairs`: along each path to a success, the on-path child is preferred to every explored sibling
  whose subtree holds no success (inference-tree failures, TP-LLaMA);
- :meth:`Tree.solutions`: the step sequences that reached a success.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Node:
    prefix: str
    state: Any
    parent: int | None = None
    action: str = ""
    logprob: float = 0.0
    num_tokens: int = 0
    reward: float = 0.0
    terminal: bool = False
    depth: int = 0
    children: list[int] = field(default_factory=list)
    visits: int = 0
    value_sum: float = 0.0
    expanded: bool = False
    ret: float = 0.0  # the sum of rewards from the root to here (success is judged on it)

    @property
    def q(self) -> float:
        return self.value_sum / self.visits if self.visits else 0.0


@dataclass(frozen=True)
class StepPair:
    """A step-level preference pair: two steps continuing ``prompt``, with their values and visits."""

    prompt: str
    chosen: str
    rejected: str
    q_chosen: float
    q_rejected: float
    n_chosen: int = 0
    n_rejected: int = 0
    depth: int = 0


@dataclass
class Tree:
    nodes: list[Node]
    success_reward: float = 1.0
    generated: int = 0  # step samples drawn (expansions and rollouts): the budget's unit
    rollout_solutions: list[list[str]] = field(default_factory=list)  # successes found by Monte-Carlo rollouts

    @property
    def root(self) -> Node:
        return self.nodes[0]

    def add(self, node: Node) -> int:
        self.nodes.append(node)
        if node.parent is not None:
            node.ret = self.nodes[node.parent].ret + node.reward
            self.nodes[node.parent].children.append(len(self.nodes) - 1)
        return len(self.nodes) - 1

    def path(self, i: int) -> list[int]:
        """Node ids from the root to ``i``."""
        out = []
        while i is not None:
            out.append(i)
            i = self.nodes[i].parent
        return out[::-1]

    def backup(self, path: list[int], future: float, gamma: float = 1.0) -> None:
        """Add the return of one visit along ``path``: ``future`` is the value from the last node's state on, and each
        node's return is its own reward plus ``gamma`` times its child's."""
        g = future
        for i in reversed(path):
            node = self.nodes[i]
            g = node.reward + gamma * g
            node.visits += 1
            node.value_sum += g

    def is_success(self, i: int) -> bool:
        n = self.nodes[i]
        return n.terminal and n.ret >= self.success_reward - 1e-9

    def has_success(self, i: int) -> bool:
        return self.is_success(i) or any(self.has_success(c) for c in self.nodes[i].children)

    def solutions(self) -> list[list[str]]:
        """The step sequences of the tree's successes, then those found by rollouts (not part of the tree)."""
        found = [[self.nodes[j].action for j in self.path(i)[1:]] for i in range(len(self.nodes)) if self.is_success(i)]
        return found + [s for s in self.rollout_solutions if s not in found]

    @property
    def solved(self) -> bool:
        return bool(self.rollout_solutions) or any(self.is_success(i) for i in range(len(self.nodes)))

    def step_pairs(self, min_gap: float = 0.0, min_visits: int = 1) -> list[StepPair]:
        """Max-Q vs min-Q visited children of each node, when their Q differ by more than ``min_gap`` (ties: the
        earlier child)."""
        out = []
        for node in self.nodes:
            kids = [self.nodes[c] for c in node.children if self.nodes[c].visits >= min_visits]
            if len(kids) < 2:
                continue
            best = max(kids, key=lambda n: n.q)  # max/min return the first of equal keys: earliest child
            worst = min(kids, key=lambda n: n.q)
            if best.q - worst.q > min_gap and best.action != worst.action:
                out.append(StepPair(node.prefix, best.action, worst.action, best.q, worst.q, best.visits,
                                    worst.visits, node.depth))
        return out

    def step_values(self) -> list[tuple[str, str, float, int]]:
        """(prefix, step, Q, N) of every visited non-root node."""
        return [(self.nodes[n.parent].prefix, n.action, n.q, n.visits) for n in self.nodes[1:] if n.visits]

    def success_pairs(self, explored_only: bool = True) -> list[StepPair]:
        """TP-LLaMA's pairs: at each node on a path to a success, (on-path child, failed sibling). A sibling failed
        when its subtree holds no success and (``explored_only``) it was tried: terminal or expanded."""
        out, seen = [], set()
        for s in range(len(self.nodes)):
            if not self.is_success(s):
                continue
            path = self.path(s)
            for parent, child in zip(path, path[1:]):
                good = self.nodes[child]
                for c in self.nodes[parent].children:
                    bad = self.nodes[c]
                    tried = bad.terminal or bad.expanded or not explored_only
                    key = (parent, child, c)
                    if c == child or not tried or self.has_success(c) or bad.action == good.action or key in seen:
                        continue
                    seen.add(key)
                    out.append(StepPair(self.nodes[parent].prefix, good.action, bad.action, 1.0, 0.0,
                                        good.visits, bad.visits, self.nodes[parent].depth))
        return out
