"""The scorer stages of `lmpo train`: the Bradley-Terry and PRM losses by hand (and their gradients), calibration,
batch order, data errors, a tiny RM and PRM learning, exact resume, and a trained RM used by path."""

from __future__ import annotations

import math

import pytest
import torch

from lmpo.config import load_config
from lmpo.errors import ConfigError, DataError
from lmpo.models.tiny import build_tiny_tokenizer
from lmpo.tasks.scorer_data import copy_pairs, copy_steps, load_pairs, load_steps
from lmpo.train.scorer_stage import ScorerStageConfig, batch_indices, calibration, rm_loss, train_scorer


def cfg(tmp_path, stage="reward_model", *over):
    base = "configs/tiny-rm.yaml" if stage == "reward_model" else "configs/tiny-prm.yaml"
    return load_config(base, [f"output.dir={tmp_path}", "output.progress=false", "output.plot=false", *over])


def test_bradley_terry_loss_and_gradient_by_hand():
    rc, rr = torch.tensor([1.0, 0.0], requires_grad=True), torch.tensor([0.0, 0.5], requires_grad=True)
    margin = torch.tensor([0.0, 1.0])
    # pair 1: -log sigmoid(1) = log(1 + e^-1); pair 2: -log sigmoid(0 - 0.5 - 1) = log(1 + e^1.5)
    want = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1.5))) / 2
    loss = rm_loss(rc, rr, margin, None)
    assert loss.item() == pytest.approx(want, abs=1e-6)
    loss.backward()  # d/d rc_i = -sigmoid(-(d_i)) / 2 with d = rc - rr - margin
    assert rc.grad.tolist() == pytest.approx([-1 / (1 + math.e) / 2, -1 / (1 + math.exp(-1.5)) / 2], abs=1e-6)
    assert (rr.grad + rc.grad).abs().max() < 1e-7
    # TRL's centring term: coef * mean((rc + rr)^2) = 0.1 * (1 + 0.25) / 2
    assert rm_loss(rc, rr, margin, 0.1).item() == pytest.approx(want + 0.0625, abs=1e-6)


def test_calibration_by_hand():
    # p 0.9 (label 1) and 0.1 (label 0) fall in bins 9 and 1: each off by 0.1 -> ECE 0.1, mean |p - y| 0.1
    assert calibration(torch.tensor([0.9, 0.1]), torch.tensor([1.0, 0.0])) == pytest.approx((0.1, 0.1))
    # one bin holding p 0.6 and 0.6 with labels 1, 0: |0.6 - 0.5| = 0.1; mean |p - y| = (0.4 + 0.6) / 2
    assert calibration(torch.tensor([0.6, 0.6]), torch.tensor([1.0, 0.0])) == pytest.approx((0.1, 0.5))


def test_batches_cover_each_epoch_once_and_depend_only_on_seed_and_step():
    n, bs = 10, 4
    seen = sum((batch_indices(n, bs, 3, s) for s in range(1, 6)), [])  # 20 rows = 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert batch_indices(n, bs, 3, 4) == batch_indices(n, bs, 3, 4) != batch_indices(n, bs, 4, 4)


def test_builtin_data_is_deterministic_and_well_formed():
    assert copy_pairs(5, seed=1) == copy_pairs(5, seed=1)
    for r in copy_pairs(50, length=2):
        assert r["chosen"] == r["prompt"][:-1] != r["rejected"] and len(r["rejected"]) == 2
    for r in copy_steps(50, length=3):
        ok = [a == b for a, b in zip(r["completions"], r["prompt"][:-1])]
        first_bad = ok.index(False) if False in ok else 3
        assert r["labels"] == [i < first_bad for i in range(3)]  # after the first error every step is wrong


def test_pair_and_step_data_errors(tmp_path):
    tok = build_tiny_tokenizer()
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "1=", "chosen": "1", "rejected": "2"}\n{"prompt": "1=", "chosen": "1"}\n')
    with pytest.raises(DataError, match='row 1 .*has no column "rejected"'):
        load_pairs(str(bad), tok)
    dup = tmp_path / "d.jsonl"
    dup.write_text('{"prompt": "1=", "chosen": "1", "rejected": "1"}\n{"prompt": "1=", "chosen": "1", "rejected": "2", '
                   '"margin": 0.5}\n{"prompt": "1=", "chosen": "", "rejected": "2"}\n')
    rows, skipped = load_pairs(str(dup), tok)
    assert rows == [{"prompt": "1=", "chosen": "1", "rejected": "2", "margin": 0.5}]
    assert skipped == {"identical": 1, "empty_side": 1}
    unpaired = tmp_path / "u.jsonl"
    unpaired.write_text('{"prompt": "1=", "completion": "1", "label": true}\n')
    with pytest.raises(DataError, match="objective: pointwise"):
        load_pairs(str(unpaired), tok)
    rows, _ = load_pairs({"builtin": "copy_pairs", "num": 200, "varied": 1.0}, tok)
    assert any(r["rejected"] == "" for r in rows)  # a built-in may reject an empty reply
    steps = tmp_path / "s.jsonl"
    steps.write_text('{"prompt": "1=", "completions": ["1", "2"], "labels": [true]}\n')
    with pytest.raises(DataError, match="row 0: completions and labels must be lists of the same length"):
        load_steps(str(steps), tok)
    with pytest.raises(ConfigError, match="copy_pairs"):
        load_pairs({"builtin": "copy_pair"}, tok)
    with pytest.raises(ConfigError, match="Unknown key.*scorer"):
        ScorerStageConfig.parse({"data": "x.jsonl", "batchsize": 3})


def test_resume_is_exact(tmp_path):
    small = ["scorer.data.num=60", "scorer.batch_size=8", "output.checkpoint_every=3", "eval.every=3"]
    straight = train_scorer(cfg(tmp_path / "a", "reward_model", "train.steps=6", *small))
    train_scorer(cfg(tmp_path / "b", "reward_model", "train.steps=3", *small))
    resumed = train_scorer(cfg(tmp_path / "b", "reward_model", "train.steps=6", *small), resume=True)
    drop = {"lr"}
    rows = lambda r: [{k: v for k, v in x.items() if k not in drop} for x in r.history]  # noqa: E731
    assert rows(straight) == rows(resumed)
    wa = torch.load(straight.run_dir / "checkpoints/step_000006/model.pt")
    wb = torch.load(resumed.run_dir / "checkpoints/step_000006/model.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(Exception, match="already holds checkpoints"):
        train_scorer(cfg(tmp_path / "b", "reward_model", "train.steps=6"))


def test_bad_stage_is_a_config_error():
    with pytest.raises(ConfigError, match='stage must be "rl".*reward_model'):
        load_config("configs/tiny-rm.yaml", ["stage=reward"])
    with pytest.raises(ConfigError, match="scorer.data"):
        train_scorer(load_config("configs/tiny-rm.yaml", ["scorer.data=null"]))
