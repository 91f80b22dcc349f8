"""CAPO: Cost-Aware Prompt Optimization, as a recipe (a prompt optimiser, not a trainer).

Zehle, Schlager, Heiß, Feurer (AutoML 2025), arXiv:2504.16005; code: finitearth/promptolution.

An evolutionary search over prompts (instruction + few-shot examples) for a frozen model:

- objective: the penalised score of prompt p on example x, s(p, x) - gamma * len(p) / L_max (len in tokens, L_max
  the longest initial prompt: cost awareness);
- racing (survivor selection): candidates are scored block by block on the dev set; after each block,
  C_ij = 1 when candidate j is significantly better than i under a one-sided paired t-test at level alpha on every
  example seen so far; i is eliminated when sum_j C_ij >= mu (the population to keep); racing stops when at most mu
  remain or after z_max blocks, and survivors are ranked by their mean penalised score;
- variation: each generation makes c crossovers of random parent pairs (the meta-LLM merges the instructions; the
  child's few-shots are a random half of the parents' union), then mutates each child (the meta-LLM rewrites the
  instruction; few-shots: add one with probability 1/3 (below k_max), drop one with probability 1/3, then shuffle).

The meta-LLM and the evaluated model are callables (``crossover(a, b) -> str``, ``rewrite(a) -> str``,
``score(prompt, row) -> float``): an LLM in practice, string operators or a fake in tests. Fidelity
``reconstructed``: alpha 0.2 (the paper; the library uses 0.05), block size, c = 4, k_max = 5, z_max = 10, gamma = 0.05
are the defaults. ``python -m lmpo.search.capo_prompt --help`` runs it offline on a task with the tiny model.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def t_sf(t: float, df: int) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom."""
    x = df / (df + t * t)
    lbeta = math.lgamma(df / 2) + math.lgamma(0.5) - math.lgamma(df / 2 + 0.5)
    front = math.exp(math.log(x) * df / 2 + math.log1p(-x) * 0.5 - lbeta) if 0 < x < 1 else 0.0
    ib = front * _betacf(df / 2, 0.5, x) / (df / 2) if x < (df / 2 + 1) / (df / 2 + 2.5) else \
        1.0 - (front * _betacf(0.5, df / 2, 1 - x) / 0.5 if x < 1 else 0.0)
    return 0.5 * ib if t > 0 else 1.0 - 0.5 * ib


def significantly_better(j: list[float], i: list[float], alpha: float) -> bool:
    """One-sided paired t-test: are scores ``j`` larger than ``i`` on the same examples, at level ``alpha``?"""
    d = [a - b for a, b in zip(j, i)]
    n = len(d)
    if n < 2:
        return False
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    if var == 0:
        return mean > 0
    return t_sf(mean / math.sqrt(var / n), n - 1) < alpha


@dataclass
class Prompt:
    instruction: str
    shots: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "\n\n".join([self.instruction, *self.shots])


def race(candidates: list[Prompt], rows: list[Any], score: Callable[[Prompt, Any], float], *, mu: int,
         block_size: int, z_max: int, alpha: float, penalty: Callable[[Prompt], float]) -> list[tuple[Prompt, float]]:
    """Racing (module docstring): the survivors with their mean penalised scores, best first."""
    alive = list(range(len(candidates)))
    scores: dict[int, list[float]] = {i: [] for i in alive}
    blocks = [rows[k:k + block_size] for k in range(0, len(rows), block_size)][:z_max]
    for block in blocks:
        for i in alive:
            scores[i] += [score(candidates[i], x) - penalty(candidates[i]) for x in block]
        beaten = {i: sum(significantly_better(scores[j], scores[i], alpha) for j in alive if j != i) for i in alive}
        alive = [i for i in alive if beaten[i] < mu]
        if len(alive) <= mu:
            break
    ranked = sorted(alive, key=lambda i: -sum(scores[i]) / max(len(scores[i]), 1))
    return [(candidates[i], sum(scores[i]) / max(len(scores[i]), 1)) for i in ranked]


@dataclass
class CAPO:
    """The evolutionary loop: crossover, mutation, racing; ``run`` returns the final ranked population."""

    score: Callable[[Prompt, Any], float]
    crossover_text: Callable[[str, str], str]
    rewrite: Callable[[str], str]
    length: Callable[[str], int] = lambda s: len(s.split())
    population: int = 4
    crossovers: int = 4
    k_max: int = 5
    block_size: int = 8
    z_max: int = 10
    alpha: float = 0.2
    gamma: float = 0.05
    seed: int = 0

    def run(self, instructions: list[str], dev: list[Any], shot_pool: list[str], generations: int) -> list:
        rng = random.Random(self.seed)
        pop = [Prompt(s, rng.sample(shot_pool, min(len(shot_pool), rng.randint(0, self.k_max)))) for s in instructions]
        l_max = max(self.length(p.text()) for p in pop)
        penalty = lambda p: self.gamma * self.length(p.text()) / l_max  # noqa: E731
        ranked = race(pop, dev, self.score, mu=self.population, block_size=self.block_size, z_max=self.z_max,
                      alpha=self.alpha, penalty=penalty)
        for _ in range(generations):
            pop = [p for p, _ in ranked]
            children = []
            for _ in range(self.crossovers):
                a, b = rng.sample(pop, 2) if len(pop) > 1 else (pop[0], pop[0])
                union = list(dict.fromkeys(a.shots + b.shots))
                child = Prompt(self.crossover_text(a.instruction, b.instruction), rng.sample(union, len(union) // 2))
                children.append(self.mutate(child, shot_pool, rng))
            rows = rng.sample(dev, len(dev))
            ranked = race(pop + children, rows, self.score, mu=self.population, block_size=self.block_size,
                          z_max=self.z_max, alpha=self.alpha, penalty=penalty)
        return ranked

    def mutate(self, p: Prompt, shot_pool: list[str], rng: random.Random) -> Prompt:
        shots, u = list(p.shots), rng.random()
        spare = [s for s in shot_pool if s not in shots]
        if u < 1 / 3 and len(shots) < self.k_max and spare:
            shots.append(rng.choice(spare))
        elif u < 2 / 3 and shots:
            shots.pop(rng.randrange(len(shots)))
        rng.shuffle(shots)
        return Prompt(self.rewrite(p.instruction), shots)


def _word_crossover(rng: random.Random) -> Callable[[str, str], str]:
    def cross(a: str, b: str) -> str:
        wa, wb = a.split(), b.split()
        return " ".join(wa[: len(wa) // 2] + wb[len(wb) // 2:]) or a
    return cross


def _word_rewrite(rng: random.Random) -> Callable[[str], str]:
    def rewrite(a: str) -> str:
        w = a.split()
        if len(w) > 1 and rng.random() < 0.5:
            w.pop(rng.randrange(len(w)))
        return " ".join(w)
    return rewrite


def main(argv: list[str] | None = None) -> None:
    """Optimise the instruction prefix of a task's prompts for a local model, scored by the task's rewards.
    Without a meta-LLM the operators are word-level (crossover: first half of one instruction + second half of the
    other; rewrite: drop a word), which keeps the racing and the cost penalty exact and the run offline."""
    import argparse
    import json

    import torch

    from lmpo.rewards.reward_set import RewardSet
    from lmpo.rollout.base import SamplingParams
    from lmpo.rollout.hf import HFGenerator
    from lmpo.tasks import build_task

    ap = argparse.ArgumentParser(prog="python -m lmpo.search.capo_prompt", description=main.__doc__)
    ap.add_argument("--task", default="countdown")
    ap.add_argument("--task-params", default='{"num_count": 3, "steps": 1, "ops": "+", "template": "{numbers} {target}=", '
                    '"num_train": 64, "num_eval": 0}')
    ap.add_argument("--instruction", action="append", required=True, help="an initial instruction (repeat)")
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from lmpo.models.tiny import build_tiny_model, build_tiny_tokenizer

    task = build_task(args.task, **json.loads(args.task_params))
    model, tok = build_tiny_model(seed=args.seed, init_std=0.1).eval(), build_tiny_tokenizer()
    gen, rewards = HFGenerator(model, tok), RewardSet.from_specs(task.rewards)
    params = SamplingParams(temperature=0, max_new_tokens=args.max_new_tokens)

    def score(p: Prompt, row: dict) -> float:
        with torch.no_grad():
            out = gen.generate([p.text() + row["prompt"]], params)
        return float(rewards([row["prompt"]], out.completions, task.columns([row]))[0][0])

    rng = random.Random(args.seed)
    pool = [r["prompt"] + r["answer"] for r in task.train[:8]]
    capo = CAPO(score, _word_crossover(rng), _word_rewrite(rng), seed=args.seed)
    for p, s in capo.run(args.instruction, task.train[8:], pool, args.generations):
        print(json.dumps({"score": round(s, 4), "instruction": p.instruction, "shots": p.shots}))


if __name__ == "__main__":
    main()
