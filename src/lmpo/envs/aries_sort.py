"""ARIES: Autonomous Reasoning with LLMs on Interactive Thought Graph Environments (arXiv:2502.21208), on sorting.

ARIES casts Graph-of-Thoughts reasoning as an MDP: the state is the thought graph, an action is a graph
transformation chosen by a *policy* LLM, and a *reasoner* LLM carries it out (Sec. 3). This environment is that MDP on
the paper's sorting task: the policy's reply is the action, the observation the serialised graph.

- State: nodes ``i`` with a sub-list to sort, the current attempt (or none), parent and children. Node 0 holds the
  whole list.
- Actions (one per turn, ``"<op> <node>"``; op by name or digit): ``decompose``/1 splits an unsolved leaf into two
  halves (exactly two children), ``solve``/2 has the reasoner sort the node's list, ``refine``/3 has it improve the
  node's attempt, ``aggregate``/4 merges the children's attempts into the node's (all children attempted).
- The reasoner is deterministic and limited, like a small LLM: it sorts lists of up to ``capacity`` items correctly
  and longer ones with errors (two neighbours swapped); refine is one bubble-sort pass; aggregate merges correctly up
  to ``merge_capacity`` items. Errors of an attempt = positions differing from the sorted list.
- Reward 1 (and the episode ends) when the root's attempt is correct; illegal actions are flagged and change nothing.

Fidelity ``reconstructed``: the paper's exact transformation set and prompts are richer (and its reasoner is an LLM);
the policy interface (graph text in, transformation out) and the static Graph-of-Thoughts schedule
(:func:`got_schedule`: decompose down to ``capacity``, solve the leaves, aggregate upwards), which ARIES replaces by a
policy, are as described. Only digits, spaces, ``+`` and ``=`` appear in observations when ``max_value`` < 10.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from lmpo.errors import ConfigError
from lmpo.registry import ENVS

OPS = {"decompose": "1", "solve": "2", "refine": "3", "aggregate": "4"}
_BY_CODE = {v: k for k, v in OPS.items()}


@dataclass
class Thought:
    items: list[int]
    parent: int | None = None
    children: list[int] = field(default_factory=list)
    attempt: list[int] | None = None


@ENVS.register("aries_sort", paper="ARIES: Autonomous Reasoning with LLMs on Interactive Thought Graph Environments",
               arxiv="2502.21208", fidelity="reconstructed")
@dataclass
class AriesSortEnv:
    """Sorting as an interactive thought graph (module docstring)."""

    length: int = 8
    max_value: int = 9
    capacity: int = 2
    merge_capacity: int = 16

    def __post_init__(self) -> None:
        if self.length < 2 or self.capacity < 1 or self.merge_capacity < 2 or self.max_value < 1:
            raise ConfigError("env aries_sort: need length >= 2, capacity >= 1, merge_capacity >= 2, max_value >= 1.")
        self.nodes: list[Thought] = []

    # ------------------------------------------------------------------ the reasoner
    def reason_sort(self, xs: list[int]) -> list[int]:
        out = sorted(xs)
        if len(xs) > self.capacity and len(set(xs)) > 1:
            i = next(k for k in range(len(out) - 1) if out[k] != out[k + 1])
            out[i], out[i + 1] = out[i + 1], out[i]
        return out

    def reason_merge(self, parts: list[list[int]]) -> list[int]:
        flat = [x for p in parts for x in p]
        if len(flat) <= self.merge_capacity:
            out, idx = [], [0] * len(parts)  # a k-way merge: correct only if the parts are sorted
            while len(out) < len(flat):
                k = min((j for j in range(len(parts)) if idx[j] < len(parts[j])), key=lambda j: parts[j][idx[j]])
                out.append(parts[k][idx[k]])
                idx[k] += 1
            return out
        return flat

    @staticmethod
    def errors(node: Thought) -> int:
        if node.attempt is None:
            return len(node.items)
        return sum(a != b for a, b in zip(node.attempt, sorted(node.items))) + abs(len(node.attempt) - len(node.items))

    # ------------------------------------------------------------------ the environment
    def reset(self, seed: int | None = None) -> str:
        rng = random.Random(seed)
        self.nodes = [Thought([rng.randint(0, self.max_value) for _ in range(self.length)])]
        return self.render()

    def render(self) -> str:
        def show(xs):
            return "+".join(map(str, xs)) if xs is not None else "="

        return " ".join(f"{i}={show(n.items)}={show(n.attempt)}={self.errors(n)}" for i, n in enumerate(self.nodes))

    def apply(self, op: str, i: int) -> str | None:
        """Apply one transformation; returns why it is illegal, or None."""
        if not 0 <= i < len(self.nodes):
            return f"no node {i}"
        n = self.nodes[i]
        if op == "decompose":
            if n.children or len(n.items) < 2:
                return f"node {i} cannot be decomposed"
            h = len(n.items) // 2
            for part in (n.items[:h], n.items[h:]):
                self.nodes.append(Thought(part, parent=i))
                n.children.append(len(self.nodes) - 1)
        elif op == "solve":
            n.attempt = self.reason_sort(n.items)
        elif op == "refine":
            if n.attempt is None:
                return f"node {i} has no attempt to refine"
            a = list(n.attempt)
            for k in range(len(a) - 1):
                if a[k] > a[k + 1]:
                    a[k], a[k + 1] = a[k + 1], a[k]
            n.attempt = a
        elif op == "aggregate":
            if not n.children or any(self.nodes[c].attempt is None for c in n.children):
                return f"node {i} needs attempted children to aggregate"
            n.attempt = self.reason_merge([self.nodes[c].attempt for c in n.children])
        return None

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        words = action.replace("+", " ").replace("=", " ").split()
        op = _BY_CODE.get(words[0], words[0].lower()) if words else ""
        if op not in OPS or len(words) < 2 or not words[1].isdigit():
            return self.render(), 0.0, False, {"invalid_action": True, "error": f"cannot read {action[:40]!r}"}
        why = self.apply(op, int(words[1]))
        solved = self.errors(self.nodes[0]) == 0
        info = {"invalid_action": why is not None, "error": why, "nodes": len(self.nodes)}
        return ("" if solved else self.render()), (1.0 if solved else 0.0), solved, info


def got_schedule(env: AriesSortEnv) -> list[str]:
    """The static Graph-of-Thoughts schedule for the current list: decompose every node longer than the reasoner's
    capacity, solve the leaves, aggregate bottom-up (the baseline a policy replaces). Simulated on the node sizes."""
    sizes, children, order = [len(env.nodes[0].items)], {}, [0]
    for i in order:
        if sizes[i] > env.capacity:
            h = sizes[i] // 2
            children[i] = [len(sizes), len(sizes) + 1]
            sizes += [h, sizes[i] - h]
            order += children[i]
    acts = [f"decompose {i}" for i in order if i in children]
    acts += [f"solve {i}" for i in order if i not in children]
    acts += [f"aggregate {i}" for i in reversed(order) if i in children]
    return acts
