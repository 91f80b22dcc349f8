"""Pair data (lmpo.tasks.pairs): TRL's preference format, column mapping, implicit prompts, bad input."""

import json
from collections import Counter

import pytest

from lmpo.errors import ConfigError, DataError
from lmpo.models.tiny import build_tiny_tokenizer
from lmpo.tasks.pairs import PairData, collate_pairs, load_pairs, pairs_from_task, tokenize_pairs


def write(tmp_path, rows, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_plain_text_pairs_and_column_mapping(tmp_path):
    path = write(tmp_path, [{"q": "1=", "good": "1", "bad": "2", "id": 7}])
    rows = load_pairs(path, prompt_column="q", chosen_column="good", rejected_column="bad")
    assert rows == [{"id": 7, "prompt": "1=", "chosen": "1", "rejected": "2", "row": 0}]


def test_implicit_prompt_is_the_common_prefix_of_the_conversations(tmp_path):
    user = {"role": "user", "content": "2+2?"}
    path = write(tmp_path, [{"chosen": [user, {"role": "assistant", "content": "4"}],
                             "rejected": [user, {"role": "assistant", "content": "5"}]}])
    (row,) = load_pairs(path, prompt_column=None)
    assert row["prompt"] == [user]
    assert row["chosen"] == [{"role": "assistant", "content": "4"}]
    assert row["rejected"] == [{"role": "assistant", "content": "5"}]


def test_missing_column_names_column_nearest_file_and_row(tmp_path):
    path = write(tmp_path, [{"prompt": "1=", "chosen": "1", "rejected": "2"},
                            {"prompt": "1=", "chosen": "1", "rejectd": "2"}])
    with pytest.raises(DataError) as e:
        load_pairs(path)
    msg = str(e.value)
    assert '"rejected"' in msg and 'Did you mean "rejectd"' in msg and "row 1" in msg and path in msg


def test_empty_and_identical_sides_are_counted_skips(tmp_path):
    path = write(tmp_path, [{"prompt": "1=", "chosen": "1", "rejected": "2"},
                            {"prompt": "1=", "chosen": "", "rejected": "2"},
                            {"prompt": "1=", "chosen": "3", "rejected": "3"}])
    skipped = Counter()
    rows = load_pairs(path, skipped=skipped)
    assert len(rows) == 1 and skipped == Counter({"empty_side": 1, "identical": 1})


def test_tokenize_renders_prompt_appends_eos_and_skips_long_prompts():
    tok = build_tiny_tokenizer()
    rows = [{"prompt": "12=", "chosen": "12", "rejected": "3"}, {"prompt": "1234=", "chosen": "1", "rejected": "2"}]
    skipped = Counter()
    pairs = tokenize_pairs(rows, tok, max_prompt_length=3, max_completion_length=2, skipped=skipped)
    assert skipped == Counter({"prompt_too_long": 1})
    (p,) = pairs
    ids = tok.convert_tokens_to_ids
    assert p["prompt_ids"] == ids(["1", "2", "="])
    assert p["chosen_ids"] == ids(["1", "2"]) and p["chosen_truncated"]  # "12" + EOS cut to 2 tokens
    assert p["rejected_ids"] == [ids("3"), tok.eos_token_id] and not p["rejected_truncated"]
    batch = collate_pairs(pairs + [dict(p, prompt_ids=ids(["5", "="]))], pad_id=0)
    assert batch.prompt_mask.tolist() == [[True] * 3, [False, True, True]]
    assert batch.prompt_ids[1].tolist() == [0, *ids(["5", "="])]
    assert batch.rejected_mask.tolist() == [[True, True]] * 2


def test_pair_data_splits_and_refuses_files_without_usable_pairs(tmp_path):
    tok = build_tiny_tokenizer()
    rows = pairs_from_task([{"prompt": f"{d}=", "answer": str(d)} for d in range(10)], seed=0)
    assert all(r["chosen"] != r["rejected"] and int(r["rejected"]) >= 0 for r in rows)
    train, held, skipped = PairData(path=write(tmp_path, rows), eval_fraction=0.2).build(tok)
    assert (len(train), len(held), skipped) == (8, 2, {})
    one = PairData(path=write(tmp_path, rows[:1], "one.jsonl")).build(tok)  # a one-pair file trains, holds none out
    assert (len(one[0]), len(one[1])) == (1, 0)
    bad = write(tmp_path, [{"prompt": "1=", "chosen": "1", "rejected": "1"}], "bad.jsonl")
    with pytest.raises(DataError, match="no usable pair .*identical"):
        PairData(path=bad).build(tok)
    with pytest.raises(ConfigError, match="eval_fraction"):
        PairData(path=bad, eval_fraction=1.0)


def test_shipped_pair_files_match_their_generator():
    from lmpo.tasks.make_pairs import DATA, FILES, rows_of

    for name in FILES:
        stored = [json.loads(line) for line in (DATA / name).read_text().splitlines()]
        assert stored == rows_of(name), name
        assert all(r["chosen"] != r["rejected"] for r in stored)


def test_mpo_split_by_gap_card_example_and_the_data_filter(tmp_path):
    from lmpo.tasks.pairs import split_by_gap

    # card #72: gaps [3.0, 0.2, -0.1, 1.5] with delta 1 -> easy {1, 4}, hard {2, 3} (1-based)
    assert split_by_gap([3.0, 0.2, -0.1, 1.5], 1.0) == ([0, 3], [1, 2])
    rows = [{"prompt": f"{d}=", "chosen": str(d), "rejected": str(d + 1), "gap": g}
            for d, g in zip(range(4), [3.0, 0.2, -0.1, 1.5])]
    train, held, skipped = PairData(path=write(tmp_path, rows), eval_fraction=0.0, gap_column="gap",
                                    min_gap=1.0).build(build_tiny_tokenizer())
    assert [p["row"] for p in train] == [0, 3] and skipped == {"small_gap": 2}
    with pytest.raises(DataError, match='column "gp".*Did you mean "gap"'):
        PairData(path=write(tmp_path, rows), gap_column="gp", min_gap=1.0).build(build_tiny_tokenizer())
    with pytest.raises(ConfigError, match="go together"):
        PairData(path="x.jsonl", gap_column="gap")
