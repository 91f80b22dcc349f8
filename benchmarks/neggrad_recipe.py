"""The on-policy / negative-gradient comparison of arXiv:2404.14367 on the tiny copy task (docs/preference-online.md).

2 x 2 grid at equal samples and equal optimizer steps (32 steps of 8 prompts x 8 samples):
- on-policy: 32 steps, each sampling its own 8 prompts from the current policy (train.steps=32);
- offline:   one collection of 256 prompts from the initial policy, then 32 optimizer steps over it as 32 mini-batches
             of 8 prompt groups (train.steps=1, train.num_minibatches=32): the data never follows the policy;
- negative gradient: online_pref + DPO on the (best, worst) pair of each group (pushes the worse reply down);
- none: filtered BC (reinforce on A = 1[correct]: likelihood of the good replies only).
Prints held-out accuracy (greedy, 32 prompts) before and after, per seed and mean, as a markdown table.

    PYTHONPATH=src python benchmarks/neggrad_recipe.py [--seeds 0 1 2] [--out runs/neggrad]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lmpo.config import load_config
from lmpo.train.loop import train

DATA = {"on-policy": ["train.steps=32", "rollout.prompts_per_step=8"],
        "offline": ["train.steps=1", "rollout.prompts_per_step=256", "train.num_minibatches=32"]}
OBJECTIVE = {"negative gradient (DPO pairs)": ["method=online_dpo", "rollout.num_generations=8"],
             "no negative gradient (filtered BC)": ["method=filtered_bc"]}


def one(out: Path, overrides: list[str], seed: int) -> tuple[float, float]:
    cfg = load_config("configs/tiny.yaml", [f"output.dir={out}", "eval.every=0", "output.checkpoint_every=0",
                                             "output.progress=false", "output.plot=false", f"train.seed={seed}",
                                             *overrides])
    r = train(cfg)
    return r.eval_before["eval/accuracy"], r.eval_after["eval/accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/neggrad")
    args = ap.parse_args()
    t0 = time.time()
    print("| data | objective | eval before | eval after (per seed) | mean after |\n|---|---|---|---|---|")
    for data, d in DATA.items():
        for obj, o in OBJECTIVE.items():
            res = [one(Path(args.out) / f"{data}-{obj[:8]}-{s}".replace(" ", "_"), o + d, s) for s in args.seeds]
            after = [a for _, a in res]
            print(f"| {data} | {obj} | {res[0][0]:.3f} | {', '.join(f'{a:.3f}' for a in after)} | "
                  f"{sum(after) / len(after):.3f} |", flush=True)
    print(f"\n{time.time() - t0:.0f} s for the grid")


if __name__ == "__main__":
    main()
