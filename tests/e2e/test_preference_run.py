"""The offline preference stage end to end on the tiny model: a run, its exact resume, bad pair data."""

import json

import pytest

from lmpo.config import load_config
from lmpo.errors import ConfigError, DataError
from lmpo.train.loop import train

BASE = ["output.progress=false", "output.plot=false", "eval.every=0", "eval.num_prompts=8",
        "preference.pairs_per_step=8"]


def cfg(tmp_path, *over):
    return load_config("configs/dpo-tiny.yaml", [f"output.dir={tmp_path}", *BASE, *over])


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resumed_run_matches_the_uninterrupted_one(tmp_path):
    whole = train(cfg(tmp_path / "a", "train.steps=6", "output.checkpoint_every=3"))
    train(cfg(tmp_path / "b", "train.steps=3", "output.checkpoint_every=3"))
    resumed = train(cfg(tmp_path / "b", "train.steps=6", "output.checkpoint_every=3"), resume=True)
    a, b = rows(whole.run_dir), rows(resumed.run_dir)
    assert [r["step"] for r in b] == list(range(7))
    for ra, rb in zip(a[1:], b[1:]):
        for key in ("loss/total", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-6), (ra["step"], key)
    assert a[0]["data/train_pairs"] == 224 and a[0]["data/eval_pairs"] == 32
    assert whole.eval_after["eval/reward_accuracy"] > whole.eval_before["eval/reward_accuracy"]


def test_bad_pair_data_is_a_clear_error_before_the_run_folder(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1=", "chosen": "1", "rejectd": "2"}) + "\n")
    with pytest.raises(DataError, match='no column "rejected".*Did you mean "rejectd"'):
        train(cfg(tmp_path, f"preference.data.path={bad}", "train.steps=1"))
    assert not (tmp_path / "dpo-copy-seed0").exists()
    with pytest.raises(ConfigError, match='Unknown hyper-parameter "preference.loss.bta".*"beta"'):
        cfg(tmp_path, "preference.loss.bta=0.1")
    with pytest.raises(ConfigError, match='Unknown config key "preference.data.chosen_col".*"chosen_column"'):
        cfg(tmp_path, "preference.data.chosen_col=x")
    with pytest.raises(ConfigError, match="preference.data.path is not set"):
        train(load_config(overrides=["method=dpo", f"output.dir={tmp_path}"]))
    assert not (tmp_path / "dpo-arithmetic-seed0").exists()


def test_one_pair_file_trains_without_nan(tmp_path):
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"prompt": "1=", "chosen": "1", "rejected": "2"}) + "\n")
    result = train(cfg(tmp_path, f"preference.data.path={one}", "train.steps=2", "eval.num_prompts=0"))
    assert all(r["loss/total"] == r["loss/total"] for r in result.history if "loss/total" in r)  # no NaN
    assert result.history[0]["data/eval_pairs"] == 0


def test_unpaired_examples_train_kto_and_are_refused_by_a_paired_loss(tmp_path):
    path = tmp_path / "unpaired.jsonl"
    rows = [{"prompt": f"{d}=", "completion": str(d if good else (d + 3) % 10), "label": good}
            for d in range(10) for good in (True, False)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    over = [f"preference.data.path={path}", "train.steps=3", "eval.num_prompts=0", "preference.data.eval_fraction=0.2"]
    with pytest.raises(DataError, match='unpaired.*"dpo" needs a chosen and a rejected.*kto'):
        train(cfg(tmp_path, *over))
    result = train(cfg(tmp_path, *over, "method=kto", "preference.loss={name: kto}"))
    losses = [r["loss/total"] for r in result.history if "loss/total" in r]
    assert len(losses) == 3 and all(x == x for x in losses)
    assert result.eval_after["eval/pref_loss"] == result.eval_after["eval/pref_loss"]
    assert all(r["loss/kl"] >= 0 for r in result.history if "loss/kl" in r)  # the mismatched pairs' KL, clamped


def test_kto_resumes_exactly_and_needs_two_examples_for_its_kl_estimate(tmp_path):
    kto = ["method=kto", "train.steps=4", "output.checkpoint_every=2", "eval.num_prompts=0"]
    whole = train(cfg(tmp_path / "a", *kto))
    train(cfg(tmp_path / "b", *kto[:1], "train.steps=2", *kto[2:]))
    resumed = train(cfg(tmp_path / "b", *kto), resume=True)
    for ra, rb in zip(rows(whole.run_dir)[1:], rows(resumed.run_dir)[1:]):
        for key in ("loss/total", "loss/kl", "rewards/chosen"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-6), (ra["step"], key)
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"prompt": "1=", "chosen": "1", "rejected": "2"}) + "\n")
    over = [f"preference.data.path={one}", "train.steps=1", "eval.num_prompts=0", "method=kto"]
    with pytest.raises(DataError, match="1 usable example.*reference_point=batch"):
        train(cfg(tmp_path / "c", *over))
    assert not (tmp_path / "c" / "kto-copy-seed0").exists()
    result = train(cfg(tmp_path / "c", *over, "preference.loss.reference_point=batch"))
    assert all(r["loss/total"] == r["loss/total"] for r in result.history if "loss/total" in r)


@pytest.mark.slow  # two `lmpo train` subprocesses: about a minute on a loaded 2-core machine
def test_compare_runs_preference_presets(tmp_path):
    from lmpo.compare import run_compare

    table = run_compare("configs/dpo-tiny.yaml", ["dpo", "simpo"], [0], [*BASE, "train.steps=3"], tmp_path / "cmp",
                        quiet=True)
    assert set(table) == {"dpo", "simpo"}
    for m in table.values():
        assert 0.0 <= m["heldout_pair_accuracy"]["mean"] <= 1.0 and m["heldout_accuracy"]["mean"] is not None


@pytest.mark.slow  # two CLI subprocesses
def test_cli_trains_resumes_and_evaluates_a_preference_run(tmp_path):
    import subprocess
    import sys

    def lmpo(*args):
        return subprocess.run([sys.executable, "-m", "lmpo.cli", *args], capture_output=True, text=True, check=True)

    over = [f"output.dir={tmp_path}", *BASE, "output.run_name=r", "output.checkpoint_every=1"]
    lmpo("train", "configs/dpo-tiny.yaml", "train.steps=1", *over)
    lmpo("train", "configs/dpo-tiny.yaml", "train.steps=2", *over, "--resume")
    out = json.loads(lmpo("eval", str(tmp_path / "r"), "eval.num_prompts=4").stdout)
    assert out["checkpoint"].endswith("step_000002") and 0.0 <= out["eval/accuracy"] <= 1.0


def test_resolved_config_round_trips(tmp_path):
    import dataclasses

    from lmpo.config import save_config

    c = cfg(tmp_path, "method=simpo", "preference.loss.gamma=0.5")
    assert c.preference.loss == {"name": "simpo", "beta": 2.0, "gamma": 0.5}
    save_config(c, tmp_path / "resolved.yaml")
    assert dataclasses.asdict(load_config(tmp_path / "resolved.yaml")) == dataclasses.asdict(c)
    # a new loss name drops the old loss's hyper-parameters (as the other component sections)
    assert cfg(tmp_path, "preference.loss.name=ipo").preference.loss == {"name": "ipo"}
