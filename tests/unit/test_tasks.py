"""Task builders: arithmetic, copy, reasoning_gym and local files, with their error paths."""

from __future__ import annotations

import json

import pytest

from lmpo.errors import ConfigError, DataError
from lmpo.registry import TASKS
from lmpo.rewards import RewardSet, RewardSpec
from lmpo.tasks import Task, build_task, columns_of


def score(task: Task, rows: list[dict], completions: list[str]) -> list[float]:
    total, _ = RewardSet.from_specs(task.rewards)([r["prompt"] for r in rows], completions, columns_of(rows))
    return total.tolist()


def test_all_builders_registered():
    assert {"arithmetic", "copy", "reasoning_gym", "local"} <= set(TASKS.names())


def test_arithmetic_is_deterministic_and_disjoint():
    a = build_task("arithmetic", num_train=300, num_eval=50, ops="+-*", seed=3)
    b = build_task("arithmetic", num_train=300, num_eval=50, ops="+-*", seed=3)
    c = build_task("arithmetic", num_train=300, num_eval=50, ops="+-*", seed=4)
    assert a.train == b.train and a.eval == b.eval
    assert a.train != c.train
    key = lambda r: (r["a"], r["op"], r["b"])
    train_keys = {key(r) for r in a.train}
    assert len(train_keys) == 300 and len(a.eval) == 50
    assert not train_keys & {key(r) for r in a.eval}
    assert {r["op"] for r in a.train} == {"+", "-", "*"}
    for r in a.train:
        assert 10 <= r["a"] <= 99 and 10 <= r["b"] <= 99
        assert r["answer"] == str(eval(f"{r['a']} {r['op']} {r['b']}"))  # trusted test data
    assert a.rewards == [RewardSpec("final_number")]


def test_arithmetic_rows_template_and_reward():
    task = build_task(
        "arithmetic", num_train=4, num_eval=0, min_value=2, max_value=3, template="{a}+{b}=", system_prompt="Be brief."
    )
    assert task.system_prompt == "Be brief." and task.eval == []
    row = task.train[0]
    assert row["prompt"] == f"{row['a']}+{row['b']}=" and row["answer"] == str(row["a"] + row["b"])
    # all 4 problems of a 2x2 grid are used exactly once
    assert sorted((r["a"], r["b"]) for r in task.train) == [(2, 2), (2, 3), (3, 2), (3, 3)]
    assert score(task, task.train[:2], [f"It is {task.train[0]['answer']}.", "It is 1000"]) == [1.0, 0.0]


@pytest.mark.parametrize(
    "params, match",
    [
        ({"ops": "/"}, "ops"),
        ({"min_value": 50, "max_value": 10}, "min_value"),
        ({"template": "What is {x}?"}, "template"),
        ({"num_train": 100, "num_eval": 1, "min_value": 1, "max_value": 10}, "only 100 distinct"),
        ({"num_trian": 5}, "num_train"),
    ],
)
def test_arithmetic_config_errors(params, match):
    with pytest.raises(ConfigError, match=match):
        build_task("arithmetic", **params)


def test_empty_train_set_is_a_data_error():
    with pytest.raises(DataError, match='Task "arithmetic" has an empty train set'):
        build_task("arithmetic", num_train=0)


def test_copy_task_uses_tiny_vocabulary():
    task = build_task("copy", num_train=20, num_eval=5, length=3)
    assert len(task.train) == 20 and len(task.eval) == 5
    assert task.train == build_task("copy", num_train=20, num_eval=5, length=3).train
    for r in task.train + task.eval:
        assert set(r["prompt"]) <= set("0123456789+= ")
        assert r["prompt"] == r["answer"] + "=" and len(r["answer"]) == 3
    assert task.rewards == [RewardSpec("prefix_match")]
    rows = [{"prompt": "123=", "answer": "123"}] * 3
    assert score(task, rows, ["123", "12x", "9"]) == pytest.approx([1.0, 2 / 3, 0.0])


def test_reasoning_gym_task_and_verifier():
    task = build_task("reasoning_gym", dataset="leg_counting", size=6, num_eval=3, seed=1)
    assert len(task.train) == 6 and len(task.eval) == 3
    assert {r["rg_index"] for r in task.train} == set(range(6))
    assert min(r["rg_index"] for r in task.eval) >= 6  # eval comes from a later index range
    assert not {r["prompt"] for r in task.train} & {r["prompt"] for r in task.eval}
    json.dumps(task.train + task.eval)  # rows stay plain data
    assert "<answer>" in task.system_prompt
    rows = task.eval[:2]
    right, wrong = f"<answer>{rows[0]['answer']}</answer>", f"<answer>{int(rows[1]['answer']) + 1}</answer>"
    assert score(task, rows, [right, wrong]) == [1.0, 0.0]


def test_reasoning_gym_errors():
    with pytest.raises(ConfigError, match='Did you mean "leg_counting"'):
        build_task("reasoning_gym", dataset="leg_countin")
    with pytest.raises(ConfigError, match='Unknown config key "min_animal".*min_animals'):
        build_task("reasoning_gym", dataset="leg_counting", size=2, config={"min_animal": 2})
    with pytest.raises(ConfigError, match="own seed/size"):
        build_task("reasoning_gym", dataset="leg_counting", config={"seed": 2})


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ROWS = [{"question": f"What is {i} + 1?", "solution": str(i + 1), "level": i % 3} for i in range(20)]


def test_local_jsonl_renames_and_splits(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", ROWS)
    params = {"path": path, "prompt_column": "question", "answer_column": "solution", "eval_fraction": 0.25, "seed": 1}
    task = build_task("local", **params)
    assert len(task.train) == 15 and len(task.eval) == 5
    assert set(task.train[0]) == {"prompt", "answer", "level"}
    assert {r["prompt"] for r in task.train}.isdisjoint({r["prompt"] for r in task.eval})
    assert task.eval == build_task("local", **params).eval
    assert task.rewards == [RewardSpec("math_verify")]
    assert score(task, task.eval[:2], [task.eval[0]["answer"], "no idea"]) == [1.0, 0.0]


def test_local_parquet_with_eval_file_and_max_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.Table.from_pylist([{"prompt": r["question"], "answer": r["solution"]} for r in ROWS]),
        tmp_path / "train.parquet",
    )
    ev = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "What is 1 + 1?", "answer": "2"}])
    task = build_task(
        "local",
        path=str(tmp_path / "train.parquet"),
        eval_path=ev,
        max_rows=7,
        rewards=["exact_match", {"name": "final_number", "weight": 0.5}],
    )
    assert len(task.train) == 7 and task.eval == [{"prompt": "What is 1 + 1?", "answer": "2"}]
    assert [s.name for s in task.rewards] == ["exact_match", "final_number"] and task.rewards[1].weight == 0.5


def test_local_json_array_and_chat_prompts(tmp_path):
    chat = [{"role": "user", "content": "hi"}]
    (tmp_path / "d.json").write_text(json.dumps([{"prompt": chat, "answer": "1"}, {"prompt": chat, "answer": "2"}]))
    task = build_task("local", path=str(tmp_path / "d.json"), eval_fraction=0.0)
    assert task.train[0]["prompt"] == chat and task.eval == []


def test_local_errors(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", ROWS[:3])
    with pytest.raises(DataError, match="missing.jsonl.*does not exist"):
        build_task("local", path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match='unsupported extension ".csv"'):
        build_task("local", path=str(tmp_path / "data.csv"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl.*contains no rows"):
        build_task("local", path=str(tmp_path / "empty.jsonl"))
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="empty.json.*contains no rows"):
        build_task("local", path=str(tmp_path / "empty.json"))
    with pytest.raises(DataError, match='no column "prompt".*Available columns: question, solution, level'):
        build_task("local", path=good)
    with pytest.raises(DataError, match='no column "questoin".*Did you mean "question"'):
        build_task("local", path=good, prompt_column="questoin", answer_column="solution")
    with pytest.raises(DataError, match='no column "answr" \\(task.answer_column\\)'):
        build_task("local", path=good, prompt_column="question", answer_column="answr")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "answer": "1"}, {"prompt": "  ", "answer": "2"}])
    with pytest.raises(DataError, match="bad.jsonl.*row 1 \\(0-based\\).*empty string"):
        build_task("local", path=bad)
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a"\n')
    with pytest.raises(DataError, match="broken.jsonl.* line 1 is not valid JSON"):
        build_task("local", path=str(tmp_path / "broken.jsonl"))
    with pytest.raises(ConfigError, match="answer_column is null"):
        build_task("local", path=good, prompt_column="question", answer_column=None)
    with pytest.raises(ConfigError, match='Did you mean "exact_match"'):
        build_task("local", path=good, rewards=["exact_mach"])
    with pytest.raises(ConfigError, match="eval_fraction"):
        build_task("local", path=good, eval_fraction=1.0)
