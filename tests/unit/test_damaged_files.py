"""Damaged or malformed files become lmpo errors that name the file (and line) and the way out: checkpoint files,
a torn metrics line, a truncated GGUF, a broken JSONL line, and reward modules in the current folder."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

from lmpo.errors import ConfigError, DataError, LmpoError, ModelError
from lmpo.models.load import gguf_shortfall, load_model
from lmpo.models.tiny import build_tiny_model

from factories import write_small_gguf
from lmpo.rewards.reward_set import resolve_reward
from lmpo.tasks.local import _load
from lmpo.train.checkpoint import CorruptCheckpoint, load_checkpoint, save_checkpoint
from lmpo.train.metrics import MetricsLog, read_metrics

DAMAGES = {
    "empty": lambda data: b"",
    "truncated": lambda data: data[: len(data) // 2],
    "garbage": lambda data: b"not a checkpoint " * 8,
}


def _parts():
    model = build_tiny_model(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 3, dtype=torch.long)).logits.sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    return model, opt, sched


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with two kept checkpoints (step 1 and step 2)."""
    run_dir = tmp_path_factory.mktemp("run")
    model, opt, sched = _parts()
    for step in (1, 2):
        save_checkpoint(run_dir, step, model, opt, sched, extra={"data": {}}, keep=2)
    return run_dir


def _copy(run: Path, dest: Path, keep_older: bool = True) -> Path:
    import shutil

    shutil.copytree(run, dest)
    if not keep_older:
        shutil.rmtree(dest / "checkpoints" / "step_000001")
    return dest / "checkpoints" / "step_000002"


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("name", ["model.pt", "optimizer.pt", "state.pt"])
def test_damaged_checkpoint_file_names_file_and_older_checkpoint(run, tmp_path, name, damage):
    ckpt = _copy(run, tmp_path / "r")
    (ckpt / name).write_bytes(DAMAGES[damage]((ckpt / name).read_bytes()))
    model, opt, sched = _parts()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(CorruptCheckpoint) as info:
        load_checkpoint(ckpt, model, opt, sched)
    msg = str(info.value)
    assert str(ckpt / name) in msg and "resume from the one before (step_000001)" in msg, msg
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # nothing restored


def test_damaged_only_checkpoint_does_not_promise_an_older_one(run, tmp_path):
    ckpt = _copy(run, tmp_path / "r", keep_older=False)
    (ckpt / "model.pt").write_bytes(b"")
    with pytest.raises(CorruptCheckpoint) as info:
        load_checkpoint(ckpt, _parts()[0])
    msg = str(info.value)
    assert "only checkpoint" in msg and "--overwrite" in msg and "one before" not in msg, msg


def test_missing_checkpoint_file_is_named(run, tmp_path):
    ckpt = _copy(run, tmp_path / "r")
    (ckpt / "optimizer.pt").unlink()
    model, opt, sched = _parts()
    with pytest.raises(LmpoError, match="optimizer.pt"):
        load_checkpoint(ckpt, model, opt, sched)


def test_foreign_pickle_in_state_is_named(run, tmp_path):
    ckpt = _copy(run, tmp_path / "r")
    torch.save({"something": 1}, ckpt / "state.pt")
    with pytest.raises(CorruptCheckpoint, match="state.pt.*lacks the step"):
        load_checkpoint(ckpt, _parts()[0])


def test_intact_checkpoint_loads(run):
    model, opt, sched = _parts()
    assert load_checkpoint(run / "checkpoints" / "step_000002", model, opt, sched)["step"] == 2


# --------------------------------------------------------------------------- metrics.jsonl
def test_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    good = ['{"step": 0, "eval/reward": 0.5}', '{"step": 1, "reward/mean": 0.25}', '{"step": 2, "reward/mean": 0.5}']
    path.write_text("\n".join(good) + '\n{"step": 3, "reward/me')
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2]  # readers skip it too
    with caplog.at_level(logging.WARNING):
        MetricsLog(path, resume_step=2)
    assert path.read_text() == "\n".join(good) + "\n"  # the readable lines are kept byte for byte
    assert "dropped 1 unreadable line(s) (line 4" in caplog.text and "step 2" in caplog.text


def test_metrics_after_the_checkpoint_are_dropped_silently(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    with caplog.at_level(logging.WARNING):
        MetricsLog(path, resume_step=1)
    assert path.read_text() == '{"step": 1}\n' and caplog.text == ""


# --------------------------------------------------------------------------- GGUF
@pytest.fixture
def gguf_file(tmp_path) -> Path:
    pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    write_small_gguf(path)
    return path


@pytest.mark.parametrize("keep", [0.5, 0.02, 0.0])
def test_truncated_gguf_says_truncated(gguf_file, keep, monkeypatch, tmp_path):
    monkeypatch.setenv("LMPO_CACHE", str(tmp_path / "cache"))
    assert gguf_shortfall(gguf_file) is None
    data = gguf_file.read_bytes()
    gguf_file.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelError) as info:
        load_model(str(gguf_file))
    msg = str(info.value)
    assert "is truncated" in msg and str(gguf_file) in msg and "again" in msg, msg


def test_non_gguf_file_is_not_called_truncated(tmp_path, monkeypatch):
    monkeypatch.setenv("LMPO_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"x" * 1000)
    with pytest.raises(ModelError) as info:
        load_model(str(bad))
    assert "truncated" not in str(info.value)


# --------------------------------------------------------------------------- JSONL
def test_broken_jsonl_line_is_reported_by_line_number(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": "c", \n{"prompt": "d"}\n')
    with pytest.raises(DataError, match=r'line 4 is not valid JSON \(.* at column 16\)'):
        _load(str(path), "Task file")
    path.write_text('{"prompt": "a"}\n["a", "list"]\n')
    with pytest.raises(DataError, match="line 2 is a JSON list, not an object"):
        _load(str(path), "Task file")


# --------------------------------------------------------------------------- reward modules in the current folder
@pytest.fixture
def cwd_not_on_path(tmp_path, monkeypatch):
    """As under the ``lmpo`` console script: the current folder is not on sys.path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    return tmp_path


def test_reward_module_in_current_folder_is_importable(cwd_not_on_path):
    (cwd_not_on_path / "cwdrewards_pkg").mkdir()
    (cwd_not_on_path / "cwdrewards_pkg" / "score.py").write_text(
        "def length(prompts, completions, **_):\n    return [float(len(c)) for c in completions]\n")
    fn = resolve_reward("cwdrewards_pkg.score:length")
    assert fn(prompts=["p"], completions=["abc"]) == [3.0]


def test_missing_reward_module_message_names_the_folder_searched(cwd_not_on_path):
    with pytest.raises(ConfigError) as info:
        resolve_reward("no_such_reward_module:fn")
    assert str(cwd_not_on_path) in str(info.value) and "PYTHONPATH" in str(info.value)


def test_reward_module_with_a_syntax_error_is_a_config_error(cwd_not_on_path):
    (cwd_not_on_path / "cwdrewards_broken.py").write_text("def f(:\n")
    with pytest.raises(ConfigError, match="SyntaxError.*cwdrewards_broken.py, line 1"):
        resolve_reward("cwdrewards_broken:f")
