"""Learning tests of the issue-16 tool-use and turn-credit presets: ASPO and AdaSearch on the tiny search task
(``configs/tiny-search.yaml``, environment ``tiny_search``), R3L, ProRAG and EPO-Strategic on the tiny multi-turn
copy task (``configs/tiny-agent.yaml``, judged by ``test_agent_presets``'s helpers and bars).

The tool-use methods need episodes that call a tool, which ``copy_turns`` never does; ``tiny_search`` is the smallest
task where searching matters: "3=" asks for the digit shown (copy it), "3+" for a hidden digit that a search (a reply
starting with "+") reveals. Measured numbers are in each test's comment (2 shared CPU cores, one thread).
"""

from __future__ import annotations

import pytest

from lmpo.config import load_config
from lmpo.train.loop import train

from learning.test_agent_presets import FALLBACK_SEEDS, agent_judge, assert_learns


def run_search(tmp_path, *overrides, steps: int):
    cfg = load_config("configs/tiny-search.yaml", [f"output.dir={tmp_path}", f"train.steps={steps}", "eval.every=0",
                                                    "output.checkpoint_every=0", "output.progress=false",
                                                    "output.plot=false", *overrides])
    return train(cfg)


def assert_search_learns(tmp_path, method: str, *overrides, steps: int, min_gain: float, min_eval_gain: float,
                         check=None) -> None:
    """Seed 0, or else the mean over seeds 0, 1, 2, clears the bars (train reward gain, held-out reward gain)."""

    def runs(seeds):
        return [run_search(tmp_path / f"{method}-seed{s}", f"method={method}", f"train.seed={s}", *overrides,
                           steps=steps) for s in seeds]

    results = runs([0])
    why = agent_judge(method, results, min_gain, min_eval_gain) or (check(results) if check else "")
    if why:
        results += runs(FALLBACK_SEEDS)
        again = agent_judge(method, results, min_gain, min_eval_gain) or (check(results) if check else "")
        why = again and f"{why}; over seeds 0, 1, 2: {again}"
    assert not why, why


def searches(results) -> float:
    """Mean tool calls per episode over the last 5 steps of the runs."""
    vals = [r["rollout/tool_calls"] for res in results for r in res.history[-5:] if "rollout/tool_calls" in r]
    return sum(vals) / max(1, len(vals))


def test_adasearch_learns_when_to_search(tmp_path):
    # Preset: stage 1 (outcome GRPO) for 30 steps, then the decision credit. Half the questions are hidden. Stage 1
    # learns to copy but almost never searches (2-4% of first turns); stage 2 labels hidden questions "search
    # needed" (their non-search answers are right ~10% < tau), the first turn learns to search there and the copy
    # rule carries over to the looked-up digit. Seed 0, 60 steps: train reward 0.083 -> 0.294, held-out
    # 0.06 -> 0.25; steps 45-60 search on 97% of hidden and 61% of answerable questions (GRPO alone: 89% / 17%,
    # reward 0.58; see docs/methods.md). Adding the decision reward to the whole episode's reward instead (a shaper,
    # as first built) collapsed to searching on both turns (0.08 -> 0.0).
    assert_search_learns(tmp_path, "adasearch", steps=60, min_gain=0.15, min_eval_gain=0.15,
                         check=lambda rs: "" if searches(rs) > 0.3 else f"adasearch: {searches(rs):.2f} searches")


ASPO_TASK = ("rollout.mode_params.env_params.retry=true", "rollout.mode_params.env_params.require_search=true",
             "rollout.mode_params.max_turns=3")
"""Tool-integrated setting for ASPO: hidden answers count only when looked up, and a wrong answer may be followed by
a search, so correct episodes call the tool at turn 0 or later (the first-call position ASPO shapes)."""


def test_aspo_learns_tool_use(tmp_path):
    # Seed 0, 80 steps: train reward 0.146 -> 0.506, held-out 0.03 -> 0.50, 0.4-0.9 searches per episode (GRPO's
    # preset on the same task: 0.125 -> 0.931, held-out 1.0). What ASPO shapes, measured on the training batches
    # against the same preset with delta = 0 (its GRPO base): among correct tool-using episodes of steps 60-80, the
    # share that searched at turn 0 is 0.985 vs 0.957 (mean first-call turn 0.015 vs 0.043; steps 0-20: 0.66 vs 0.74),
    # at a cost in speed (train reward 0.506 vs 0.775): late-calling successes keep only 0.3 |A|. Without
    # require_search the tiny model never starts to search (guessing pays: half the questions known, retries,
    # 0.198 -> 0.459 with ~0 tool calls), and ASPO, which only re-ranks correct tool-using episodes, is its GRPO base.
    assert_search_learns(tmp_path, "aspo", *ASPO_TASK, steps=80, min_gain=0.2, min_eval_gain=0.2,
                         check=lambda rs: "" if searches(rs) > 0.2 else f"aspo: {searches(rs):.2f} searches")


@pytest.mark.parametrize("method", ["r3l", "prorag", "epo_strategic"])
def test_turn_credit_preset_learns_copy_turns(tmp_path, method):
    # Seed 0, 40 steps (GRPO: 0.06 -> 0.30, held-out 0.00 -> 0.48): r3l 0.073 -> 0.411 (held-out 0.0 -> 0.41),
    # prorag 0.061 -> 0.434 (0.0 -> 0.52; process scores = copy_turns' per-turn rewards), epo_strategic
    # 0.056 -> 0.246 (0.0 -> 0.27; no baseline, so slower).
    assert_learns(tmp_path, method)
