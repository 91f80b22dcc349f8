"""Tree rollouts: expand (sample k steps of a prefix), evaluate (reward, value function or Monte-Carlo rollouts), back
up (returns at the nodes), under a budget of sampled steps and a depth limit, deterministic under a seed.

Algorithms (``SearchConfig.algorithm``):

- ``mcts``: PUCT selection a* = argmax_a Q(s,a) + c_puct p(a|s) sqrt(N(s)) / (1 + N(s,a)) with p the softmax of the
  children's length-normalised log-probs (MCTS-DPO, arXiv:2405.00451, Sec. 2.1); expansion of ``k_root`` steps at
  the root and ``k`` elsewhere; each new child is evaluated and its value backed up to the root.
- ``best_first``: a frontier ordered by the path's log-prob (``length_alpha`` > 0 divides it by tokens^alpha); pop the
  best, expand ``k``, stop at the first success (BFS-Prover, arXiv:2509.06493).
- Widening (``max_children``): a node may get more than one round of children, so a search whose branches all end
  early (illegal steps) keeps spending its budget instead of stalling.
- ``dfs``: depth-first with backtracking, children (``k`` a round, up to ``max_children``) tried in order of
  log-prob (DFSDT, the inference trees TP-LLaMA
  mines, arXiv:2406.07115); stops at the first success.
- :func:`sample_paths`: the baseline at equal budget: independent one-step-at-a-time trajectories.

Evaluation of a new non-terminal node (``value``): ``"rollout"`` (``rollouts`` Monte-Carlo continuations, one step
at a time up to ``max_depth``, their mean return), ``"zero"`` (rewards only), or a callable ``prefix -> float``.
Every step sample (expansion or rollout) counts towards ``budget``.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass
from typing import Any

from lmpo.errors import ConfigError
from lmpo.search.domain import SearchDomain, StepProposer
from lmpo.search.tree import Node, Tree

ALGORITHMS = ("mcts", "best_first", "dfs")


@dataclass(frozen=True)
class SearchConfig:
    algorithm: str = "mcts"
    budget: int = 64  # step samples (expansions + rollouts)
    max_depth: int = 3
    k_root: int = 4
    k: int = 2
    iterations: int = 1000  # MCTS selections (the budget usually stops first)
    c_puct: float = 1.0
    value: Any = "rollout"  # "rollout" | "zero" | callable(prefix) -> float
    rollouts: int = 1
    gamma: float = 1.0
    length_alpha: float = 0.0
    success_reward: float = 1.0
    dedup: bool = True
    max_children: int = 0  # widening cap per node (0: none): dfs samples k more when all failed; mcts re-expands
    # the parent of a dead end; best_first keeps a node in the frontier until it has this many children
    seed: int = 0

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            from lmpo.errors import did_you_mean

            raise ConfigError(f"search.algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}."
                              f"{did_you_mean(str(self.algorithm), ALGORITHMS)}")
        if self.max_children < 0:
            raise ConfigError(f"search.max_children must be >= 0 (0: k), got {self.max_children}.")
        for key in ("budget", "max_depth", "k_root", "k", "iterations", "rollouts"):
            if getattr(self, key) < 1:
                raise ConfigError(f"search.{key} must be >= 1, got {getattr(self, key)}.")
        if not (self.value in ("rollout", "zero") or callable(self.value)):
            raise ConfigError(f'search.value must be "rollout", "zero" or a callable, got {self.value!r}.')
        if self.c_puct < 0 or not 0 < self.gamma <= 1:
            raise ConfigError(f"search: need c_puct >= 0 and 0 < gamma <= 1, got {self.c_puct}, {self.gamma}.")


class TreeSearch:
    """One search over one domain (build a new one per prompt)."""

    def __init__(self, domain: SearchDomain, proposer: StepProposer, cfg: SearchConfig) -> None:
        self.domain, self.proposer, self.cfg = domain, proposer, cfg
        self.rng = random.Random(cfg.seed)
        prompt, state = domain.start()
        self.tree = Tree([Node(prompt, state)], success_reward=cfg.success_reward)

    # ------------------------------------------------------------------ primitives
    def _sample(self, prefix: str, k: int):
        k = min(k, self.cfg.budget - self.tree.generated)
        if k < 1:
            return []
        self.tree.generated += k
        return self.proposer.propose(prefix, k, self.rng.getrandbits(31))

    def expand(self, i: int, k: int) -> list[int]:
        """Sample ``k`` steps after node ``i`` and add them as children (duplicates merged when ``dedup``)."""
        node = self.tree.nodes[i]
        node.expanded = True
        new, seen = [], {self.tree.nodes[c].action for c in node.children}
        for p in self._sample(node.prefix, k):
            if self.cfg.dedup and p.text in seen:
                continue
            seen.add(p.text)
            t = self.domain.step(node.state, p.text)
            new.append(self.tree.add(Node(node.prefix + t.text, t.state, i, p.text, p.logprob, p.num_tokens,
                                          t.reward, t.done, node.depth + 1)))
        return new

    def evaluate(self, i: int) -> float:
        """The value of node ``i``'s state onwards (0 at a terminal or at the depth limit)."""
        node = self.tree.nodes[i]
        if node.terminal or node.depth >= self.cfg.max_depth or self.cfg.value == "zero":
            return 0.0
        if callable(self.cfg.value):
            return float(self.cfg.value(node.prefix))
        returns = []
        for _ in range(self.cfg.rollouts):
            g, disc, prefix, state, depth = 0.0, 1.0, node.prefix, node.state, node.depth
            ret, actions = node.ret, []
            while depth < self.cfg.max_depth:
                props = self._sample(prefix, 1)
                if not props:
                    break
                t = self.domain.step(state, props[0].text)
                g += disc * t.reward
                disc *= self.cfg.gamma
                ret += t.reward
                actions.append(props[0].text)
                prefix, state, depth = prefix + t.text, t.state, depth + 1
                if t.done:
                    if ret >= self.cfg.success_reward - 1e-9:  # a rollout that solved it: an explored solution
                        path = [self.tree.nodes[j].action for j in self.tree.path(i)[1:]]
                        self.tree.rollout_solutions.append(path + actions)
                    break
            returns.append(g)
        return sum(returns) / len(returns)

    def priors(self, i: int) -> list[float]:
        """p(a|s) of node ``i``'s children: softmax of their length-normalised log-probs."""
        kids = [self.tree.nodes[c] for c in self.tree.nodes[i].children]
        z = [k.logprob / max(k.num_tokens, 1) for k in kids]
        m = max(z)
        e = [math.exp(x - m) for x in z]
        return [x / sum(e) for x in e]

    def puct_child(self, i: int) -> int:
        node, c = self.tree.nodes[i], self.cfg.c_puct
        scores = [self.tree.nodes[ch].q + c * p * math.sqrt(node.visits) / (1 + self.tree.nodes[ch].visits)
                  for ch, p in zip(node.children, self.priors(i))]
        return node.children[scores.index(max(scores))]  # ties: the earliest child

    # ------------------------------------------------------------------ algorithms
    def run(self) -> Tree:
        getattr(self, f"_{self.cfg.algorithm}")()
        return self.tree

    def _mcts(self) -> None:
        cfg, tree = self.cfg, self.tree
        for _ in range(cfg.iterations):
            if tree.generated >= cfg.budget:
                break
            path = [0]
            while tree.nodes[path[-1]].children and not tree.nodes[path[-1]].terminal:
                path.append(self.puct_child(path[-1]))
            leaf = tree.nodes[path[-1]]
            if leaf.terminal or leaf.depth >= cfg.max_depth:
                parent = leaf.parent
                if parent is not None and len(tree.nodes[parent].children) < cfg.max_children:
                    path = path[:-1]  # progressive widening: a dead end sends the sample to its parent
                else:
                    tree.backup(path, 0.0, cfg.gamma)
                    continue
            new = self.expand(path[-1], cfg.k_root if path[-1] == 0 else cfg.k)
            if not new:  # everything sampled was a duplicate: count a visit so selection moves on
                tree.backup(path, self.evaluate(path[-1]), cfg.gamma)
            for c in new:
                tree.backup([*path, c], self.evaluate(c), cfg.gamma)

    def _score(self, i: int) -> float:
        path = self.tree.path(i)[1:]
        lp = sum(self.tree.nodes[j].logprob for j in path)
        toks = sum(self.tree.nodes[j].num_tokens for j in path)
        return lp / max(toks, 1) ** self.cfg.length_alpha

    def _best_first(self) -> None:
        frontier, order = [(0.0, 0, 0)], 1
        while frontier and self.tree.generated < self.cfg.budget:
            _, _, i = heapq.heappop(frontier)
            if len(self.tree.nodes[i].children) + self.cfg.k < self.cfg.max_children:
                heapq.heappush(frontier, (-self._score(i), order, i))  # widening: i may be expanded again
                order += 1
            for c in self.expand(i, self.cfg.k):
                self.tree.backup(self.tree.path(c), 0.0, self.cfg.gamma)
                if self.tree.is_success(c):
                    return
                node = self.tree.nodes[c]
                if not node.terminal and node.depth < self.cfg.max_depth:
                    heapq.heappush(frontier, (-self._score(c), order, c))
                    order += 1

    def _dfs(self) -> None:
        width = self.cfg.max_children or self.cfg.k

        def visit(i: int) -> bool:
            while len(self.tree.nodes[i].children) < width and self.tree.generated < self.cfg.budget:
                kids = self.expand(i, min(self.cfg.k, width - len(self.tree.nodes[i].children)))
                if not kids:
                    return False  # only duplicates: this node has nothing new to offer
                for c in sorted(kids, key=lambda c: -self.tree.nodes[c].logprob):
                    node = self.tree.nodes[c]
                    self.tree.backup(self.tree.path(c), 0.0, self.cfg.gamma)
                    if self.tree.is_success(c):
                        return True
                    if not node.terminal and node.depth < self.cfg.max_depth and visit(c):
                        return True
            return False

        visit(0)


def search(domain: SearchDomain, proposer: StepProposer, cfg: SearchConfig) -> Tree:
    """Run ``cfg.algorithm`` on ``domain`` and return the tree."""
    return TreeSearch(domain, proposer, cfg).run()


def sample_paths(domain: SearchDomain, proposer: StepProposer, budget: int, max_depth: int, seed: int = 0,
                 success_reward: float = 1.0) -> Tree:
    """Independent trajectories, one step sample at a time, until ``budget`` step samples: the sampling baseline
    (a tree whose root has one child per trajectory)."""
    ts = TreeSearch(domain, proposer, SearchConfig(algorithm="dfs", budget=budget, max_depth=max_depth, seed=seed,
                                                   success_reward=success_reward, dedup=False, k=1, k_root=1))
    tree = ts.tree
    while tree.generated < budget:
        i = 0
        while True:
            new = ts.expand(i, 1)
            if not new:
                break
            i = new[0]
            node = tree.nodes[i]
            if node.terminal or node.depth >= max_depth:
                break
        tree.backup(tree.path(i), 0.0)
    return tree

