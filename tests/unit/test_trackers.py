"""``output.report_to``: names, missing packages, the fan-out, and each tracker's data read back with its own reader.

The round trips need the optional packages (``make test-trackers`` installs them); without one, its tests skip and
say which extra to install. Each writes offline inside a temporary run folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmpo.config import load_config
from lmpo.errors import ConfigError
from lmpo.train import trackers as tr

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
for _k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "TRACKIO_DIR", "TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL",
           "WANDB_PROJECT", "WANDB_MODE", "WANDB_DIR"):
    ENV.pop(_k, None)

ROWS = [{"step": 0, "eval/accuracy": 0.25, "eval/pass@4": 0.5},
        {"step": 1, "reward/mean": 0.125, "loss/total": -0.5, "perf/step_s": 1.5, "note": "text", "skipped": None},
        {"step": 2, "reward/mean": 0.375, "loss/total": -0.25, "perf/step_s": 1.25, "flag": True},
        {"step": 3, "reward/mean": 0.75, "eval/accuracy": 0.5, "eval/pass@4": 1.0}]
CONFIG = {"method": "grpo", "train": {"learning_rate": 0.01, "steps": 3}, "output": {"report_to": ["x"]}}


def need(name: str):
    """Skip (saying which extra installs it) when a tracker's package is absent."""
    module, extra = tr.TRACKERS[name]
    return pytest.importorskip(module, reason=f"{module} is not installed (pip install 'lmpo[{extra}]', or "
                                              "`make test-trackers`)")


def expected(key: str) -> dict[int, float]:
    return {r["step"]: float(r[key]) for r in ROWS if r.get(key) is not None}


def log_rows(names: list[str], run_dir: Path, name: str = "myrun") -> None:
    t = tr.open_trackers(names, run_dir, name, CONFIG)
    for row in ROWS:
        t.log(row["step"], row)
    t.close()


# ---------------------------------------------------------------------------------------------- readers
def read_tensorboard(run_dir: Path) -> tuple[dict[str, dict[int, float]], dict[str, str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    texts = {tag.split("/")[0]: acc.Tensors(tag)[0].tensor_proto.string_val[0].decode()
             for tag in acc.Tags()["tensors"]}
    return scalars, texts


def read_mlflow(run_dir: Path):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("lmpo")
    runs = client.search_runs([exp.experiment_id])
    return client, runs


def read_wandb(run_dir: Path) -> list[dict]:
    """Every record of every offline run folder, through ``wandb leet inspect --json`` (W&B's own log reader)."""
    records = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(folder)],
                              capture_output=True, text=True, timeout=120, env=ENV)
        assert proc.returncode == 0, proc.stderr
        records += [json.loads(ln) for ln in proc.stdout.splitlines() if ln.strip().startswith("{")]
    return records


TRACKIO_READER = """
import json, os, sys
os.environ["TRACKIO_DIR"] = sys.argv[1]
from trackio.sqlite_storage import SQLiteStorage
run = sys.argv[2]
print(json.dumps({"runs": SQLiteStorage.get_runs("lmpo"), "logs": SQLiteStorage.get_logs("lmpo", run),
                  "config": SQLiteStorage.get_run_config("lmpo", run)}, default=str))
"""


def read_trackio(folder: Path, run: str) -> dict:
    # trackio fixes its folder when first imported: read it in a fresh interpreter pointed at the run's folder
    proc = subprocess.run([sys.executable, "-c", TRACKIO_READER, str(folder), run], capture_output=True, text=True,
                          timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- configuration
def test_report_to_accepts_trls_forms():
    assert tr.normalize_report_to(None) == [] == tr.normalize_report_to("none") == tr.normalize_report_to([])
    assert tr.normalize_report_to("TensorBoard") == ["tensorboard"]
    assert tr.normalize_report_to(["mlflow", "wandb", "mlflow"]) == ["mlflow", "wandb"]
    assert load_config(TINY).output.report_to == []
    assert load_config(TINY, ["output.report_to=tensorboard"]).output.report_to == ["tensorboard"]
    assert load_config(TINY, ["output.report_to=[wandb, trackio]"]).output.report_to == ["wandb", "trackio"]


def test_report_to_all_is_every_installed_tracker(monkeypatch):
    monkeypatch.setattr(tr, "installed", lambda name: name in ("mlflow", "wandb"))
    assert tr.normalize_report_to("all") == ["mlflow", "wandb"]


def test_unknown_tracker_names_the_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r'Unknown tracker "tensorbord".*Did you mean "tensorboard"'):
        load_config(TINY, ["output.report_to=[tensorbord]"])
    with pytest.raises(ConfigError, match="none together with trackers"):
        tr.normalize_report_to(["none", "mlflow"])
    with pytest.raises(ConfigError, match="tracker names"):
        tr.normalize_report_to([3])


def test_a_missing_package_names_the_extra_before_anything_is_written(monkeypatch, tmp_path, capsys):
    from lmpo.cli import main

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    with pytest.raises(tr.TrackerMissing, match=r"pip install 'lmpo\[wandb\]'"):
        tr.check_available(["wandb"])
    rc = main(["train", TINY, f"output.dir={tmp_path}", "output.run_name=r", "output.report_to=wandb"])
    err = capsys.readouterr().err
    assert rc == 2 and "lmpo[wandb]" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


class Recorder:
    def __init__(self):
        self.rows, self.closed = [], False

    def log(self, step, metrics):
        self.rows.append((step, metrics))

    def close(self):
        self.closed = True


class Broken(Recorder):
    def log(self, step, metrics):
        raise RuntimeError("disk full")


def test_fan_out_sends_numbers_and_drops_a_failing_tracker(capsys):
    good, bad = Recorder(), Broken()
    assert isinstance(good, tr.Tracker)
    t = tr.Trackers({"bad": bad, "good": good})
    for row in ROWS[1:3]:
        t.log(row["step"], row)
    t.close()
    assert good.rows == [(1, {"reward/mean": 0.125, "loss/total": -0.5, "perf/step_s": 1.5}),
                         (2, {"reward/mean": 0.375, "loss/total": -0.25, "perf/step_s": 1.25, "flag": 1.0})]
    assert good.closed and bad.closed
    err = capsys.readouterr().err
    assert err.count("tracker bad failed at step 1") == 1 and "disk full" in err


def test_mlflow_names_are_made_valid():
    assert tr.mlflow_key("eval/pass@4") == "eval/pass_at_4"
    assert tr.mlflow_key("reward/my-fn.v2") == "reward/my-fn.v2"
    assert tr.mlflow_key("loss/ratio(max)") == "loss/ratio_max_"


# ---------------------------------------------------------------------------------------------- round trips
def test_tensorboard_round_trip(tmp_path):
    need("tensorboard")
    log_rows(["tensorboard"], tmp_path)
    scalars, texts = read_tensorboard(tmp_path)
    for key in ("reward/mean", "loss/total", "eval/accuracy", "eval/pass@4"):
        assert scalars[key] == pytest.approx(expected(key)), key
    assert scalars["flag"] == {2: 1.0} and "note" not in scalars and "skipped" not in scalars
    assert texts["run_name"] == "myrun"
    assert "learning_rate: 0.01" in texts["config"] and "method: grpo" in texts["config"]


def test_mlflow_round_trip(tmp_path, monkeypatch):
    need("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    log_rows(["mlflow"], tmp_path)
    client, runs = read_mlflow(tmp_path)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "myrun" and run.info.status == "FINISHED"
    assert run.data.params["train.learning_rate"] == "0.01" and run.data.params["method"] == "grpo"
    for key in ("reward/mean", "eval/accuracy"):
        hist = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert hist == pytest.approx(expected(key)), key
    hist = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/pass_at_4")}
    assert hist == pytest.approx(expected("eval/pass@4"))
    assert "config.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]


def test_wandb_round_trip_is_offline(tmp_path, monkeypatch):
    need("wandb")
    monkeypatch.setenv("WANDB_MODE", "online")  # lmpo's tracker is offline whatever the environment says
    log_rows(["wandb"], tmp_path)
    folders = list((tmp_path / "wandb").glob("offline-run-*"))
    run_id = (tmp_path / "wandb" / tr.WANDB_ID_FILE).read_text().strip()
    assert len(folders) == 1 and folders[0].name.endswith(run_id)
    records = read_wandb(tmp_path)
    run = next(r["run"] for r in records if r["type"] == "run")
    assert run["display_name"] == "myrun" and run["project"] == "lmpo"
    assert run["config"]["update"]["train"] == {"learning_rate": 0.01, "steps": 3}
    assert run["run_id"] == run_id
    history = [r["history"] for r in records if r["type"] == "history"]
    got = {int(h["step"].get("num", 0)): h["item"] for h in history}
    for key in ("reward/mean", "eval/accuracy", "eval/pass@4"):
        assert {s: it[key] for s, it in got.items() if key in it} == pytest.approx(expected(key)), key


TRACKIO_WRITER = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from test_trackers import log_rows
log_rows(["trackio"], Path(sys.argv[1]))
"""


def test_trackio_round_trip(tmp_path):
    need("trackio")
    # in a fresh interpreter, so that lmpo (not an earlier import) chooses trackio's folder: <run>/trackio
    proc = subprocess.run([sys.executable, "-c", TRACKIO_WRITER, str(tmp_path), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "trackio" / "lmpo.db").is_file()
    data = read_trackio(tmp_path / "trackio", "myrun")
    assert data["runs"] == ["myrun"]
    for key in ("reward/mean", "eval/accuracy", "eval/pass@4"):
        assert {r["step"]: r[key] for r in data["logs"] if key in r} == pytest.approx(expected(key)), key
    assert data["config"]["train"] == {"learning_rate": 0.01, "steps": 3}


# ---------------------------------------------------------------------------------------------- a real run
def test_tiny_run_and_its_resume_reach_every_installed_tracker(tmp_path):
    names = [n for n in tr.TRACKERS if tr.installed(n)]
    if not names:
        pytest.skip("no tracker package is installed (pip install 'lmpo[trackers]', or `make test-trackers`)")

    def lmpo(*args):
        proc = subprocess.run([sys.executable, "-m", "lmpo.cli", *args], capture_output=True, text=True,
                              timeout=600, env=ENV)
        assert proc.returncode == 0, proc.stderr
        return proc

    common = [f"output.dir={tmp_path}", "output.run_name=r", "eval.every=2", "eval.num_prompts=8",
              "output.checkpoint_every=2", f"output.report_to=[{','.join(names)}]"]
    first = lmpo("train", TINY, "train.steps=2", *common)
    assert "Trackio" not in first.stdout  # trackers' own notices stay off lmpo's result output
    lmpo("train", "--resume", str(tmp_path / "r"), "train.steps=3")  # extends the run: steps 3
    run = tmp_path / "r"
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    want = {r["step"]: r["reward/mean"] for r in rows if "reward/mean" in r}
    want_eval = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}
    assert sorted(want) == [1, 2, 3] and sorted(want_eval) == [0, 2, 3]
    if "tensorboard" in names:
        scalars, texts = read_tensorboard(run)
        assert scalars["reward/mean"] == pytest.approx(want) and scalars["eval/accuracy"] == pytest.approx(want_eval)
        assert texts["run_name"] == "r" and "name: tiny" in texts["config"]
    if "mlflow" in names:
        client, runs = read_mlflow(run)
        assert len(runs) == 1, "the resumed run continues the MLflow run"
        hist = {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, "reward/mean")}
        assert hist == pytest.approx(want) and runs[0].data.params["model.name"] == "tiny"
    if "wandb" in names:
        records = read_wandb(run)
        got = {int(r["history"]["step"].get("num", 0)): r["history"]["item"]["reward/mean"]
               for r in records if r["type"] == "history" and "reward/mean" in r["history"]["item"]}
        assert got == pytest.approx(want)
        run_ids = {r["run"]["run_id"] for r in records if r["type"] == "run"}
        assert run_ids == {(run / "wandb" / tr.WANDB_ID_FILE).read_text().strip()}, "the resume continues one run"
        assert len(list((run / "wandb").glob("offline-run-*"))) == 2
    if "trackio" in names:
        data = read_trackio(run / "trackio", "r")
        assert data["runs"] == ["r"]
        assert {x["step"]: x["reward/mean"] for x in data["logs"] if "reward/mean" in x} == pytest.approx(want)
