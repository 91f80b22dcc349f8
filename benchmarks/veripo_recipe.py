"""VerIPO's GRPO -> verifier -> DPO loop (arXiv:2505.19000), on text, on the tiny copy task (docs/preference-online.md).

VerIPO alternates an outcome-reward GRPO phase with a fast DPO phase whose pairs a verifier picks from the policy's
own rollouts (chosen: correct and consistent; rejected: wrong, or right but inconsistent / degenerate), the DPO
reference being the model at the start of the phase. Here each phase is one lmpo run started from the previous
phase's exported weights (``lmpo export``), so the DPO phase's reference is exactly that model:

- GRPO phase: ``method=grpo`` on the task's reward (prefix match: a reply is right when it starts with the digit);
- DPO phase: ``method=online_dpo`` with the *verifier* as the ranking reward and 8 rollouts per prompt, pairs
  (best, worst) of each group; groups the verifier cannot separate (all good or all bad) give no pair (counted ties);
- the verifier (a rule-based stand-in for VerIPO's small judge LLM): 1.0 when the reply is right and "consistent"
  (nothing but the answer, possibly repeated: "7", "77"), 0.5 when it starts right but then says something else
  ("73": the rest contradicts the answer), 0 when wrong.

The control is GRPO alone for the same number of steps. Both final models are scored by the verifier on the held-out
prompts (greedy): ``consistent`` = the fraction of replies the verifier accepts, ``prefix`` = the task's accuracy.
VerIPO's pruning of easy prompts (80% of groups with mean accuracy 1) is not reproduced (the task has 10 prompts).

    PYTHONPATH=src:benchmarks python benchmarks/veripo_recipe.py [--iterations 2] [--out runs/veripo]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from lmpo.config import load_config
from lmpo.export import export_run
from lmpo.train.loop import evaluate_run, train

VERIFIER = "{name: 'veripo_recipe:verifier'}"
COMMON = ["eval.every=0", "output.progress=false", "output.plot=false", "rollout.max_new_tokens=4"]


def verifier(prompts, completions, answer, **_):
    """1 = only the answer (possibly repeated); 0.5 = starts with it, then something else; 0 = wrong."""
    out = []
    for c, a in zip(completions, answer):
        c, a = c.strip(), str(a)
        right = bool(a) and c.startswith(a)
        out.append(1.0 if right and c == a * (len(c) // len(a)) else 0.5 if right else 0.0)
    return out


def phase(model: str, out: Path, overrides: list[str], steps: int, seed: int) -> Path:
    """One run of ``steps`` from ``model``; returns its exported folder."""
    cfg = load_config("configs/tiny.yaml", [f"model.name={model}", f"output.dir={out}", f"train.steps={steps}",
                                             f"output.checkpoint_every={steps}", f"train.seed={seed}", *COMMON,
                                             *overrides])
    train(cfg)
    run_dir = next(p for p in out.iterdir() if p.is_dir())
    return export_run(run_dir, out / "export", overwrite=True)


def score(model: str, out: Path) -> tuple[float, float]:
    """(consistent, prefix): held-out greedy accuracy under the verifier (threshold 1) and under the task's reward."""
    res = []
    for rewards in ([f"rewards=[{VERIFIER}]"], []):
        cfg = load_config("configs/tiny.yaml", [f"model.name={model}", f"output.dir={out}", *COMMON, *rewards])
        res.append(evaluate_run(cfg)["eval/accuracy"])
    return res[0], res[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--grpo-steps", type=int, default=15)
    ap.add_argument("--dpo-steps", type=int, default=5)
    ap.add_argument("--dpo-lr", type=float, default=5e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/veripo")
    args = ap.parse_args()
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.time()
    rows = []
    for seed in args.seeds:
        model, k = "tiny", 0
        for it in range(args.iterations):
            model = str(phase(model, root / f"s{seed}" / f"{k}-grpo", ["method=grpo"], args.grpo_steps, seed))
            k += 1
            dpo = ["method=online_dpo", "rollout.num_generations=8", f"rewards=[{VERIFIER}]",
                   f"train.learning_rate={args.dpo_lr}"]  # VerIPO's DPO phases use half the GRPO learning rate
            model = str(phase(model, root / f"s{seed}" / f"{k}-dpo", dpo, args.dpo_steps, seed))
            k += 1
        veripo = score(model, root / f"s{seed}" / "eval")
        total = args.iterations * (args.grpo_steps + args.dpo_steps)
        grpo = score(str(phase("tiny", root / f"s{seed}" / "grpo-only", ["method=grpo"], total, seed)),
                     root / f"s{seed}" / "eval-grpo")
        rows.append((seed, veripo, grpo))
        print(f"seed {seed}: VerIPO consistent {veripo[0]:.3f} prefix {veripo[1]:.3f} | GRPO alone consistent {grpo[0]:.3f} "
              f"prefix {grpo[1]:.3f}", flush=True)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"\nmean over seeds: VerIPO consistent {mean([r[1][0] for r in rows]):.3f} prefix {mean([r[1][1] for r in rows]):.3f}"
          f" | GRPO alone consistent {mean([r[2][0] for r in rows]):.3f} prefix {mean([r[2][1] for r in rows]):.3f}"
          f"  ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
