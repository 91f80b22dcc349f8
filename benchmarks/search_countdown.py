"""Tree search vs independent sampling at an equal budget of step samples, on Countdown with the tiny model.

    PYTHONPATH=src python benchmarks/search_countdown.py [--puzzles 50] [--sft-steps 300] [--out FILE.json]

1. Warm start: the tiny random model is trained (SFT) to write *legal* equations, one step at a time: for random
   puzzles and random legal moves (not aimed at the target), prefix "pool target=" [+ earlier moves] -> "a+b=c ".
   It learns the format and the arithmetic, never which move solves the puzzle.
2. On held-out puzzles (4 numbers 1..9, target = a 2-step sum, up to 3 moves, "+" only: the tiny tokenizer's
   characters), each method gets the same budget of step samples: ``sample`` (independent trajectories, one step
   sample at a time), ``mcts`` (PUCT, k_root 4, k 2, one Monte-Carlo rollout per new node), ``best_first`` (k 4,
   length alpha 0.5) and ``dfs`` (k 2), all widening up to 8 children a node. A puzzle is solved when any explored
   path reaches the target (the environment's exact checker). Prints and writes the solve rates.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from lmpo.envs import build_env
from lmpo.models.tiny import build_tiny_model, build_tiny_tokenizer
from lmpo.rollout.base import SamplingParams
from lmpo.rollout.hf import HFGenerator
from lmpo.search import EnvDomain, GeneratorProposer, SearchConfig, sample_paths, search
from lmpo.search.train import sft_update
from lmpo.tasks.countdown import combine

ENV = dict(num_count=4, steps=2, min_value=1, max_value=9, ops="+", max_target=18)
DEPTH = 3  # a pool of 4 allows at most 3 moves


def sft_examples(env, rng: random.Random, n: int) -> list[tuple[str, str]]:
    out = []
    while len(out) < n:
        domain = EnvDomain(env, seed=rng.randrange(10**6))
        prefix, state = domain.start()
        pool = list(env.pool)
        for _ in range(rng.randint(1, 2)):
            i, j = rng.sample(range(len(pool)), 2)
            step = f"{pool[i]}+{pool[j]}={combine(pool[i], '+', pool[j])}"
            out.append((prefix, step + " "))
            t = domain.step(state, step)
            if t.done:
                break
            prefix, state = prefix + t.text, t.state
            pool = list(env.pool)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--puzzles", type=int, default=50)
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--budgets", default="8,16,32")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tok, env = build_tiny_tokenizer(), build_env("countdown", **ENV)
    model = build_tiny_model(seed=0, init_std=0.1).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng, t0 = random.Random(0), time.time()
    for step in range(args.sft_steps):
        m = sft_update(model, tok, opt, sft_examples(env, rng, 32))
        if step % 100 == 0:
            print(f"sft step {step}: loss {m['loss']:.3f}", flush=True)
    sft_s = time.time() - t0
    proposer = GeneratorProposer(HFGenerator(model, tok), SamplingParams(temperature=1.0, max_new_tokens=8),
                                 stop=" ", tokenizer=tok)
    held = range(10**7, 10**7 + args.puzzles)
    methods = {
        "mcts": dict(algorithm="mcts", k_root=4, k=2, value="rollout", max_depth=DEPTH, max_children=8),
        "best_first": dict(algorithm="best_first", k=4, length_alpha=0.5, max_depth=DEPTH, max_children=8),
        "dfs": dict(algorithm="dfs", k=2, max_children=8, max_depth=DEPTH),
    }
    results = {"env": ENV, "puzzles": args.puzzles, "sft_steps": args.sft_steps, "sft_seconds": round(sft_s, 1),
               "solve_rate": {}}
    for budget in [int(b) for b in args.budgets.split(",")]:
        row = {}
        t0 = time.time()
        row["sample"] = sum(sample_paths(EnvDomain(env, seed=s), proposer, budget, DEPTH, seed=s).solved
                            for s in held) / len(held)
        for name, kw in methods.items():
            row[name] = sum(search(EnvDomain(env, seed=s), proposer, SearchConfig(budget=budget, seed=s, **kw)).solved
                            for s in held) / len(held)
        results["solve_rate"][str(budget)] = row
        print(f"budget {budget}: {row} ({time.time() - t0:.0f} s)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
