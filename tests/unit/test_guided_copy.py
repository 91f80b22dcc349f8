"""The ``guided_copy`` task: exact-match copying with the columns the guidance methods read."""

from __future__ import annotations

import pytest

from lmpo.errors import ConfigError
from lmpo.rewards import RewardSet
from lmpo.tasks import build_task, columns_of


def test_rows_carry_guidance_columns_and_the_reward_is_an_exact_match():
    t = build_task("guided_copy", num_train=5, num_eval=3, length=2, wrong_teachers=2, seed=1)
    row = t.train[0]
    d = row["answer"]
    assert row["prompt"] == d + "=" and row["solution"] == d and len(d) == 2
    assert row["teacher_solutions"][0] == d and len(row["teacher_solutions"]) == 3
    assert d not in row["teacher_solutions"][1:]
    assert row["hints"] == [d[0], d]
    assert not {r["prompt"] for r in t.train} & {r["prompt"] for r in t.eval}
    rows = [row, row]
    total, _ = RewardSet.from_specs(t.rewards)([r["prompt"] for r in rows], [d, d + "1"], columns_of(rows))
    assert total.tolist() == [1.0, 0.0]  # the whole reply, not a prefix
    with pytest.raises(ConfigError, match="exceeds"):
        build_task("guided_copy", num_train=90, num_eval=20, length=2)
