"""Learning tests: with each preset a tiny random LM learns the copy task; with shuffled rewards it must not.

The copy task: the prompt is one digit followed by "=", and the reward is 1 when the reply starts with that digit.
A random 16-token model starts near 1/16. Fixed seeds make the runs deterministic; thresholds were set from
several seeds' runs with margin on both sides (a preset that stops learning fails, and so does a control that
suddenly "learns").
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmpo.config import load_config
from lmpo.methods.presets import PRESETS
from lmpo.train.loop import train

STEPS = 40
"""30 until 2026-12-02: on an AVX512 CPU (other float rounding in the matmul kernels, so other trajectories) several
presets then sat at the +0.25 line for some seeds (reinforce_pp +0.246, disco +0.18 on seed 3); at 40 steps the
weakest default-run margin is +0.15."""
MIN_GAIN = 0.25
TWEAKS = Path(__file__).parent / "tweaks"


def tweak(method: str) -> dict:
    """Per-preset adjustments (``tweaks/<preset>.yaml``: overrides, steps, min_gain, min_eval_gain), each with its reason."""
    path = TWEAKS / f"{method}.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def run(tmp_path, *overrides, steps=STEPS):
    cfg = load_config("configs/tiny.yaml", [f"output.dir={tmp_path}", f"train.steps={steps}", "eval.every=0",
                                             "output.checkpoint_every=0", "output.progress=false",
                                             "output.plot=false", *overrides])
    return train(cfg)


def reward_gain(result) -> tuple[float, float]:
    rewards = [r["reward/mean"] for r in result.history if "reward/mean" in r]
    start = sum(rewards[:3]) / 3
    end = sum(rewards[-5:]) / 5
    return start, end


FALLBACK_SEEDS = (1, 2)
"""A preset whose first seed falls short is judged by its mean over three seeds (sequential test). The bars hold one
seed's trajectory, and trajectories follow the CPU's float rounding: on an Intel AVX-512 CPU without BF16, ``rover``
reached +0.227 on seed 0 (bar +0.25) while learning as well as elsewhere. A preset that does not learn sits near the
shuffled-reward control (below +0.15) on every seed and still fails; one slow seed no longer fails a learner."""


def judge(method: str, results: list, t: dict) -> str:
    """Why ``results`` (runs of one preset) fall short of the bars, or "" when they clear them (means over runs)."""
    gains = [reward_gain(r) for r in results]
    start, end = (sum(g[i] for g in gains) / len(gains) for i in (0, 1))
    if end < start + t.get("min_gain", MIN_GAIN):
        return f"{method}: train reward {start:.3f} -> {end:.3f} ({gains})"
    before, after = (sum(getattr(r, f)["eval/accuracy"] for r in results) / len(results)
                     for f in ("eval_before", "eval_after"))
    if after <= before + t.get("min_eval_gain", 0.2):
        return f"{method}: eval accuracy {before:.3f} -> {after:.3f}"
    return ""


@pytest.mark.parametrize("method", sorted(m for m in PRESETS if "preference" not in PRESETS[m]))  # RL presets;
# the preference presets learn from pairs: tests/learning/test_preference_presets.py
def test_preset_learns_copy_task(tmp_path, method):
    t = tweak(method)

    def runs(seeds):
        return [run(tmp_path / f"seed{seed}", f"method={method}", f"train.seed={seed}", *t.get("overrides", []),
                    steps=t.get("steps", STEPS)) for seed in seeds]

    seeds = t.get("seeds")  # a slow, trajectory-sensitive learner is always judged by its mean over several seeds
    results = runs(seeds or [0])
    why = judge(method, results, t)
    if why and not seeds:  # one short seed: judge the mean over three (FALLBACK_SEEDS)
        results += runs(FALLBACK_SEEDS)
        why = judge(method, results, t) and f"{why}; over seeds 0, 1, 2: {judge(method, results, t)}"
    assert not why, why


def test_shuffled_reward_control_does_not_learn(tmp_path):
    result = run(tmp_path, "method=grpo", "rewards=[{name: 'learning.shuffled_reward:shuffled_prefix_match'}]")
    start, end = reward_gain(result)
    assert end < start + 0.15, f"shuffled control improved {start:.3f} -> {end:.3f}"


def test_low_memory_recipe_learns(tmp_path):
    """Activation checkpointing + the optimizer folded into backward (clipping at 0.1 so replays happen), the
    recipe of docs/results/performance.md (its allocator setting is process-wide, so it stays out of the test
    process), still learns the copy task."""
    result = run(tmp_path, "method=grpo", "model.gradient_checkpointing=true", "train.optimizer_in_backward=true",
                 "train.max_grad_norm=0.1")
    start, end = reward_gain(result)
    assert end >= start + MIN_GAIN, f"low-memory recipe: train reward {start:.3f} -> {end:.3f}"
    assert sum(r.get("perf/backward_replays", 0) for r in result.history) >= 1


def test_bf16_autocast_learns_as_well_as_float32(tmp_path):
    """``model.autocast=bfloat16`` (the choice of ``auto`` on CPUs with native bf16) learns the copy task about as
    well as float32 from the same seed: the issue's "bf16 must not hurt learning" on the tiny task."""
    ends = {}
    for precision in ("float32", "bfloat16"):
        result = run(tmp_path / precision, "method=grpo", f"model.autocast={precision}")
        start, ends[precision] = reward_gain(result)
        assert ends[precision] >= start + MIN_GAIN, f"{precision}: train reward {start:.3f} -> {ends[precision]:.3f}"
        assert result.eval_after["eval/accuracy"] > result.eval_before["eval/accuracy"] + 0.2, precision
    # seeds 0-3 on an AVX512-BF16 CPU: float32 ends at 0.64 / 0.52 / 0.42 / 0.44, bf16 at 0.52 / 0.47 / 0.48 / 0.46
    assert ends["bfloat16"] >= ends["float32"] - 0.2, ends
