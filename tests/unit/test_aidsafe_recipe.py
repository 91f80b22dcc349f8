"""AIDSAFE's deliberation recipe (benchmarks/aidsafe_recipe.py): the data-pipeline plumbing with scripted agents."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import aidsafe_recipe as rec  # noqa: E402


def scripted(replies):
    """A generate function answering from a list, recording the prompts it saw."""
    seen, it = [], iter(replies)

    def gen(prompts):
        seen.extend(prompts)
        return [next(it) for _ in prompts]

    return gen, seen


def test_refiner_drops_empty_and_repeated_thoughts_in_order():
    assert rec.refine(["a", " ", "b", "a", "c ", "b"]) == ["a", "b", "c"]


def test_deliberation_stops_when_an_agent_agrees_and_extends_otherwise():
    gen, seen = scripted(["t1\nt2", "t3", "AGREE", "never used"])
    thoughts = rec.deliberate(gen, "q", "P", "i", agents=2, rounds=3)
    assert thoughts == ["t1", "t2", "t3"] and len(seen) == 3
    assert "Reasoning so far:\nt1\nt2\nt3" in seen[2] and "Agent 2" in seen[2]
    gen, seen = scripted(["t1", "t2", "t3", "t4", "t5"])
    assert rec.deliberate(gen, "q", "P", "i", agents=2, rounds=2) == ["t1", "t2", "t3", "t4", "t5"]


def test_pairs_are_trl_format_with_distinct_sides_and_identical_ones_are_skipped_and_counted():
    # per query: intents, first thoughts, 1 agent AGREE, answer, belief-augmented thoughts, its answer
    good = ["intent", "think", "AGREE", "ans", "bad", "ans2"]
    rows, skipped = rec.make_pairs(scripted(good)[0], queries=["q1"], agents=1, rounds=1)
    assert skipped == 0 and rows == [{"prompt": "q1", "chosen": "think\nAnswer: ans", "rejected": "bad\nAnswer: ans2"}]
    same = ["intent", "x", "AGREE", "y", "x", "y"]  # the whisper changed nothing: identical sides
    rows, skipped = rec.make_pairs(scripted(same)[0], queries=["q1"], agents=1, rounds=1)
    assert rows == [] and skipped == 1
