"""Bad input, as a user meets it: every case gives a clear lmpo error (exit code != 0, no traceback, the key, file,
line or name at fault and the way out) or a documented safe behaviour, and a run folder it touches keeps its data.

Most cases drive the real CLI in a subprocess. Pure config checks run ``lmpo.cli.main`` in this process (the same
code, without paying Python's start-up per case). One short trained run is shared by the module; tests that damage
it work on a copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmpo.cli import main

from factories import write_small_gguf

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
QUICK = ["eval.num_prompts=4", "eval.every=0"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]),
       "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def lmpo(*args, cwd=None, timeout=300, entry: Path | None = None) -> subprocess.CompletedProcess:
    """``lmpo ARGS`` in a subprocess (``python -m lmpo.cli``, or the script ``entry`` like the console script)."""
    head = [str(entry)] if entry else ["-m", "lmpo.cli"]
    return subprocess.run([sys.executable, *head, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=ENV)


def fails(proc: subprocess.CompletedProcess, *phrases: str) -> str:
    """Exit code != 0, no traceback, and an lmpo error holding every phrase; returns the error (libraries' own
    log lines before it are left out)."""
    err = proc.stderr
    assert proc.returncode != 0, proc.stdout + err
    assert "Traceback" not in err, err
    assert "lmpo: error:" in err, err
    msg = err[err.index("lmpo: error:"):]
    for p in phrases:
        assert p in msg, (p, msg)
    return msg


def fails_in_process(capsys, *args: str) -> str:
    """``lmpo ARGS`` run by ``lmpo.cli.main`` in this process (an uncaught exception fails the test): exit code
    != 0 and an lmpo error, which is returned."""
    code = main([*map(str, args)])
    err = capsys.readouterr().err
    assert code != 0 and "lmpo: error:" in err, err
    return err[err.index("lmpo: error:"):]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file of a run folder and its hash (the lock file, which names the last holder, aside)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def assert_unchanged(folder: Path, before: dict[str, str]) -> None:
    assert snapshot(folder) == before


def metric_steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished two-step run keeping both checkpoints (step_000001, step_000002)."""
    out = tmp_path_factory.mktemp("trained")
    proc = lmpo("train", TINY, "train.steps=2", *QUICK, "output.checkpoint_every=1", "output.keep_checkpoints=2",
                f"output.dir={out}", "output.run_name=base")
    assert proc.returncode == 0, proc.stderr
    return out / "base"


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    shutil.copytree(trained, tmp_path / "base")
    return tmp_path / "base"


# --------------------------------------------------------------------------- config: names, types, origins
def test_unknown_method_names_nearest_and_the_override(capsys):
    err = fails_in_process(capsys, "train", TINY, "method=grop")
    assert 'Did you mean "grpo"' in err and 'override "method=grop"' in err and "tiny.yaml" not in err


def test_unknown_key_names_nearest(capsys):
    err = fails_in_process(capsys, "train", TINY, "train.learnin_rate=0.1")
    assert "train.learnin_rate" in err and 'Did you mean "learning_rate"' in err


def test_wrong_yaml_type_names_key_and_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  steps: many\n")
    err = fails_in_process(capsys, "train", cfg)
    assert "train.steps" in err and f"(in {cfg})" in err and "integer" in err


def test_override_error_names_the_override_not_the_file():
    err = fails(lmpo("train", TINY, "train.steps=many"), "train.steps",
                '(from the command-line override "train.steps=many")', "integer")
    assert "tiny.yaml" not in err


def test_list_rejects_unknown_kind_with_nearest(capsys):
    err = fails_in_process(capsys, "list", "--kind", "lossess")
    assert "lossess" in err and 'Did you mean "loss"' in err and "Valid kinds:" in err
    assert 'Did you mean "advantage"' in fails_in_process(capsys, "list", "--kind", "advantages")


# --------------------------------------------------------------------------- config: ranges
def test_negative_max_grad_norm_is_refused():
    fails(lmpo("train", TINY, "train.max_grad_norm=-1"), "train.max_grad_norm must be > 0 or null, got -1.0",
          "reverses every update")


def test_one_generation_with_a_group_relative_method_says_what_to_do(capsys):
    err = fails_in_process(capsys, "train", TINY, "rollout.num_generations=1")
    for phrase in ("rollout.num_generations=1", '"grpo"', "training would change nothing",
                   "Set rollout.num_generations to 2 or more", "method=spo"):
        assert phrase in err, (phrase, err)


@pytest.mark.parametrize("override, valid", [
    ("eval.every=-1", ">= 0"), ("output.checkpoint_every=-1", ">= 0"), ("output.keep_checkpoints=0", ">= 1"),
    ("train.warmup_steps=-1", ">= 0"), ("train.weight_decay=-0.01", ">= 0"), ("train.adam_beta1=1.5", "in [0, 1)"),
    ("train.adam_beta2=1", "in [0, 1)"), ("rollout.top_k=-1", ">= 0"), ("rollout.refill_rounds=-1", ">= 0"),
    ("eval.num_prompts=-1", ">= 0"), ("eval.pass_k=-1", ">= 0"), ("train.max_grad_norm=0", "> 0 or null"),
])
def test_out_of_range_setting_names_key_value_and_range(capsys, override, valid):
    key, value = override.split("=")
    err = fails_in_process(capsys, "train", TINY, override)
    assert f"{key} must be {valid}, got " in err and f'override "{override}"' in err, err
    assert float(err.split(", got ")[1].split()[0]) == float(value)


def test_one_sample_per_prompt_method_still_trains(tmp_path):
    proc = lmpo("train", TINY, "method=spo", "rollout.num_generations=1", "train.steps=1", *QUICK,
                f"output.dir={tmp_path}", "output.run_name=spo")
    assert proc.returncode == 0, proc.stderr
    assert metric_steps(tmp_path / "spo") == [0, 1]


# --------------------------------------------------------------------------- output folders
def test_output_dir_that_is_a_file_is_a_config_error(tmp_path):
    (tmp_path / "afile").write_text("keep me")
    fails(lmpo("train", TINY, f"output.dir={tmp_path / 'afile' / 'runs'}"), f"output.dir={tmp_path / 'afile'}",
          "is a file, not a folder", "cannot be created")
    assert (tmp_path / "afile").read_text() == "keep me" and sorted(os.listdir(tmp_path)) == ["afile"]


def test_run_folder_that_is_a_file_is_a_config_error(tmp_path, capsys):
    (tmp_path / "afile").write_text("keep me")
    err = fails_in_process(capsys, "train", TINY, f"output.dir={tmp_path}", "output.run_name=afile")
    assert "output.run_name=afile" in err and "is a file, not a folder" in err
    assert (tmp_path / "afile").read_text() == "keep me" and sorted(os.listdir(tmp_path)) == ["afile"]


@pytest.mark.skipif(not os.path.isdir("/sys"), reason="needs a folder no one may write in (/sys)")
def test_unwritable_output_dir_is_a_config_error(capsys):
    err = fails_in_process(capsys, "train", TINY, "output.dir=/sys/lmpo-runs")
    assert "output.dir=/sys/lmpo-runs" in err and "cannot write in '/sys'" in err and "you can write to" in err


def test_compare_out_that_is_a_file_is_refused_before_any_run(tmp_path, capsys):
    (tmp_path / "out").write_text("keep me")
    err = fails_in_process(capsys, "compare", TINY, "--methods", "grpo", "--out", tmp_path / "out", "train.steps=1")
    assert "--out=" in err and "is a file, not a folder" in err
    assert "[compare]" not in capsys.readouterr().out and (tmp_path / "out").read_text() == "keep me"


# --------------------------------------------------------------------------- models and data
def test_missing_model_file(tmp_path, capsys):
    assert "nope.gguf" in fails_in_process(capsys, "train", TINY, f"model.name={tmp_path}/nope.gguf",
                                           f"output.dir={tmp_path}")


def test_truncated_gguf_says_truncated(tmp_path):
    pytest.importorskip("gguf")
    path = tmp_path / "model.gguf"
    write_small_gguf(path)
    path.write_bytes(path.read_bytes()[:-1000])
    err = fails(lmpo("train", TINY, f"model.name={path}", f"output.dir={tmp_path / 'runs'}"),
                str(path), "is truncated", "again")
    assert "reshape" not in err


def test_dataset_without_named_column(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "1=", "answer": "1"}\n' * 4)
    err = fails_in_process(capsys, "train", TINY, "task.name=local", f"task.params={{path: {data}}}",
                           f"output.dir={tmp_path}")
    assert 'no column "prompt"' in err and "question" in err


def test_empty_dataset(tmp_path, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    err = fails_in_process(capsys, "train", TINY, "task.name=local", f"task.params={{path: {data}}}",
                           f"output.dir={tmp_path}")
    assert "empty.jsonl" in err and "no rows" in err


def test_local_task_on_tiny_config_gets_its_own_params_and_jsonl_line_numbers(tmp_path, capsys):
    """``task.name=local`` over the copy task must not inherit ``task.length``; a broken line is named by number."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1=", "answer": "1"}\n{"prompt": "2=", "answer": "2"}\n{"prompt": "3=", "answer"\n')
    err = fails_in_process(capsys, "train", TINY, f"task.params={{path: {data}}}", "task.name=local",
                           f"output.dir={tmp_path}")
    assert "d.jsonl" in err and "line 3 is not valid JSON" in err
    assert "length" not in err and "position" not in err


# --------------------------------------------------------------------------- rewards
def test_reward_function_raising(tmp_path):
    err = fails(lmpo("train", TINY, "rewards=[{name: 'e2e.bad_rewards:raises'}]", *QUICK, f"output.dir={tmp_path}"),
                "e2e.bad_rewards:raises")
    assert "sample" in err.lower()


def test_reward_function_wrong_length(tmp_path):
    fails(lmpo("train", TINY, "rewards=[{name: 'e2e.bad_rewards:wrong_length'}]", *QUICK, f"output.dir={tmp_path}"),
          "wrong_length", "1 values")


@pytest.fixture
def console_script(tmp_path) -> tuple[Path, Path]:
    """A script like the ``lmpo`` console script (its own folder first on sys.path, not the current folder), and a
    work folder holding a reward package ``myrewards/score.py``."""
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    (bin_dir / "lmpo_script.py").write_text("import sys\nfrom lmpo.cli import main\nsys.exit(main())\n")
    (work / "myrewards").mkdir(parents=True)
    (work / "myrewards" / "score.py").write_text(
        "def matches(prompts, completions, answer, **_):\n"
        "    return [float(c.strip() == str(a)) for c, a in zip(completions, answer)]\n")
    return bin_dir / "lmpo_script.py", work


def test_reward_module_in_current_folder_loads_for_train_as_for_compare(console_script, tmp_path):
    script, work = console_script
    proc = lmpo("train", TINY, "rewards=[{name: 'myrewards.score:matches'}]", "train.steps=1", *QUICK,
                f"output.dir={tmp_path / 'runs'}", "output.run_name=r", cwd=work, entry=script)
    assert proc.returncode == 0, proc.stderr
    assert "reward/myrewards.score:matches" in (tmp_path / "runs" / "r" / "metrics.jsonl").read_text()


def test_missing_reward_module_says_where_it_was_looked_for(console_script, tmp_path):
    script, work = console_script
    fails(lmpo("train", TINY, "rewards=[{name: 'myrewardz.score:matches'}]", f"output.dir={tmp_path / 'runs'}",
               cwd=work, entry=script), 'module "myrewardz.score" could not be imported', f"current folder ({work})")


# --------------------------------------------------------------------------- training and run folders
def test_nan_loss_stops_and_keeps_checkpoint(tmp_path):
    fails(lmpo("train", TINY, "train.learning_rate=1e30", "train.max_grad_norm=null", "train.steps=6", *QUICK,
               "output.checkpoint_every=1", f"output.dir={tmp_path}", "output.run_name=nan"), "last good checkpoint")
    ckpts = sorted((tmp_path / "nan" / "checkpoints").glob("step_*"))
    assert ckpts and (ckpts[-1] / "model.pt").exists()


def test_existing_run_is_not_overwritten(trained, capsys):
    before = snapshot(trained)
    err = fails_in_process(capsys, "train", TINY, "train.steps=2", f"output.dir={trained.parent}",
                           "output.run_name=base")
    assert "--resume" in err
    assert_unchanged(trained, before)


def test_resume_with_a_bad_override_changes_nothing(trained, capsys):
    before = snapshot(trained)
    err = fails_in_process(capsys, "train", "--resume", trained, "train.max_grad_norm=-1")
    assert "train.max_grad_norm must be > 0" in err and 'override "train.max_grad_norm=-1"' in err
    assert 'Did you mean "steps"' in fails_in_process(capsys, "train", "--resume", trained, "train.stpes=3")
    assert_unchanged(trained, before)


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert "no config.yaml" in fails_in_process(capsys, "train", "--resume", tmp_path)


@pytest.mark.parametrize("name, damage", [
    ("model.pt", lambda b: b""), ("optimizer.pt", lambda b: b[: len(b) // 2]), ("state.pt", lambda b: b"garbage" * 9),
])
def test_damaged_checkpoint_names_file_and_the_older_checkpoint(run_copy, name, damage):
    latest = run_copy / "checkpoints" / "step_000002"
    (latest / name).write_bytes(damage((latest / name).read_bytes()))
    before = snapshot(run_copy)
    fails(lmpo("train", "--resume", run_copy, "train.steps=3"), str(latest / name), "cannot be read",
          "resume from the one before (step_000001)")
    assert_unchanged(run_copy, before)


def test_damaged_only_checkpoint_says_start_over(run_copy, tmp_path):
    shutil.rmtree(run_copy / "checkpoints" / "step_000001")
    latest = run_copy / "checkpoints" / "step_000002"
    (latest / "model.pt").write_bytes(b"")
    before = snapshot(run_copy)
    err = fails(lmpo("train", "--resume", run_copy, "train.steps=3"), str(latest / "model.pt"), "only checkpoint",
                "--overwrite")
    assert "one before" not in err
    assert_unchanged(run_copy, before)
    fails(lmpo("eval", run_copy, "eval.num_prompts=2"), str(latest / "model.pt"))


def test_torn_metrics_line_is_dropped_with_a_warning_on_resume(run_copy):
    """A kill while writing a metrics row tears the last line; the checkpoint is the truth, the run goes on."""
    with (run_copy / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "reward/mean": 0.1')  # no newline: cut mid-write
    proc = lmpo("train", "--resume", run_copy, "train.steps=3")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "dropped 1 unreadable line(s) (line 4" in proc.stderr, proc.stderr
    assert metric_steps(run_copy) == [0, 1, 2, 3]
