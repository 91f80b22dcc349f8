"""All-zero groups before and after guidance, per method, from ``lmpo compare`` / ``lmpo train`` run folders.

Usage: ``python benchmarks/guidance_stats.py docs/results/guidance-tiny/runs [more run-folder parents ...]``
prints the markdown table of docs/results/guidance.md: per method (mean over its seeds) the share of groups the policy
failed entirely (``rollout/all_fail_frac``, before guidance) over the first and the last 10 steps, the share of
equal-reward groups left after guidance (``guide/flat_frac_after``; GRPO: ``rollout/flat_frac``), the rows guidance
put into the batch (``guide/guided_frac``), and the training reward (``reward/mean``, the policy's own rollouts)
over the first and last 10 steps.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def mean(rows: list[dict], key: str, default: float = 0.0) -> float:
    vals = [r.get(key, default) for r in rows]
    return sum(vals) / max(1, len(vals))


def stats(metrics: Path) -> dict[str, float]:
    rows = [r for r in (json.loads(line) for line in metrics.read_text().splitlines() if line.strip())
            if "reward/mean" in r]
    flat_after = "guide/flat_frac_after" if "guide/flat_frac_after" in rows[0] else "rollout/flat_frac"
    return {"fail_first": mean(rows[:10], "rollout/all_fail_frac"), "fail_last": mean(rows[-10:], "rollout/all_fail_frac"),
            "flat_after": mean(rows, flat_after), "guided": mean(rows, "guide/guided_frac"),
            "reward_first": mean(rows[:10], "reward/mean"), "reward_last": mean(rows[-10:], "reward/mean"),
            "steps": float(len(rows))}


def main(parents: list[str]) -> None:
    by_method: dict[str, list[dict[str, float]]] = defaultdict(list)
    for parent in parents:
        for metrics in sorted(Path(parent).glob("*/metrics.jsonl")):
            label = metrics.parent.name.rsplit("-seed", 1)[0]
            if len(parents) > 1:
                label += f" ({Path(parent).resolve().parent.name})"
            by_method[label].append(stats(metrics))
    print("| method | seeds | all-fail groups, first 10 steps | all-fail groups, last 10 steps | equal-reward groups "
          "after guidance | guided rows in the batch | train reward, first 10 | train reward, last 10 |")
    print("|---|---|---|---|---|---|---|---|")
    for m, runs in by_method.items():
        avg = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
        print(f"| {m} | {len(runs)} | {avg['fail_first']:.3f} | {avg['fail_last']:.3f} | {avg['flat_after']:.3f} | "
              f"{avg['guided']:.4f} | {avg['reward_first']:.3f} | {avg['reward_last']:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
