"""lmpo.engine.threads: the thread count (affinity, cgroup quota, probe, explicit settings) and OpenMP's spin-wait
set at ``import lmpo``. No timed assertions: the probe's timings are injected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmpo
from lmpo.config import load_config
from lmpo.engine import apply_perf, setup_process
from lmpo.engine import threads as th
from lmpo.errors import ConfigError

SRC = str(Path(lmpo.__file__).resolve().parents[1])


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- available cores
def test_cores_follow_the_affinity_not_the_machine():
    assert th.available_cores(affinity={0}, quota=None) == 1
    assert th.available_cores(affinity={0, 3, 5}, quota=None) == 3
    assert th.available_cores(affinity=set(), quota=None) == 1  # never zero


def test_a_cgroup_quota_caps_the_cores_at_its_whole_cores():
    assert th.available_cores(affinity=range(8), quota=2.0) == 2
    assert th.available_cores(affinity=range(8), quota=1.5) == 1  # a second thread would be throttled
    assert th.available_cores(affinity=range(8), quota=0.2) == 1
    assert th.available_cores(affinity=range(2), quota=16.0) == 2  # the quota never adds cores


def test_this_process_cores_are_its_affinity():
    assert 1 <= th.available_cores() <= len(os.sched_getaffinity(0))


def test_cgroup_cpu_max_is_read_from_the_process_cgroup_then_the_root(tmp_path):
    root, own = tmp_path / "cg", tmp_path / "cg" / "user.slice" / "job"
    own.mkdir(parents=True)
    self_cgroup = tmp_path / "self_cgroup"
    self_cgroup.write_text("0::/user.slice/job\n")
    (root / "cpu.max").write_text("max 100000\n")
    (own / "cpu.max").write_text("150000 100000\n")
    assert th.cgroup_cpu_limit(str(root), str(self_cgroup)) == 1.5
    (own / "cpu.max").unlink()
    assert th.cgroup_cpu_limit(str(root), str(self_cgroup)) is None  # the root: unlimited
    (root / "cpu.max").write_text("200000 100000\n")
    assert th.cgroup_cpu_limit(str(root), str(tmp_path / "missing")) == 2.0
    (root / "cpu.max").write_text("garbage\n")
    assert th.cgroup_cpu_limit(str(root), str(self_cgroup)) is None
    assert th.cgroup_cpu_limit(str(tmp_path / "none"), str(self_cgroup)) is None


def test_cgroup_v1_quota_is_read_too(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert th.cgroup_cpu_limit(str(tmp_path), str(tmp_path / "missing")) is None  # unlimited
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    assert th.cgroup_cpu_limit(str(tmp_path), str(tmp_path / "missing")) == 3.0


# --------------------------------------------------------------------------- the probe
def fake_timer(seconds_by_threads, calls=None):
    def timer(threads):
        if calls is not None:
            calls.append(threads)
        return seconds_by_threads[threads]
    return timer


def test_probe_picks_one_thread_when_n_threads_are_slower():
    best, median = th.probe(2, fake_timer({2: 7.8e-3, 1: 3.8e-4}))
    assert best == 1 and median == {2: 7.8e-3, 1: 3.8e-4}


def test_probe_keeps_n_threads_when_faster_or_tied():
    assert th.probe(4, fake_timer({4: 1.1e-4, 1: 2.0e-4}))[0] == 4
    assert th.probe(2, fake_timer({2: 2.0e-4, 1: 2.0e-4}))[0] == 2


def test_probe_alternates_and_takes_medians():
    calls, seq = [], iter([5.0, 1.0, 1.0, 5.0, 5.0, 1.0, 1.0, 5.0, 5.0, 1.0])  # n, 1 | 1, n | n, 1 | 1, n | n, 1
    best, median = th.probe(2, lambda t: calls.append(t) or next(seq))
    assert calls == [2, 1, 1, 2, 2, 1, 1, 2, 2, 1]
    assert median == {2: 5.0, 1: 1.0} and best == 1
    noisy = iter([1.0, 2.0, 9.0, 2.0, 1.0, 2.0, 2.0, 1.0, 2.0, 1.0])  # one outlier of the 2-thread timings
    assert th.probe(2, lambda t: next(noisy)) == (2, {2: 1.0, 1: 2.0})


def test_probe_stops_at_its_budget_after_one_round():
    clock = iter(range(100))  # every look at the clock is one "second" later
    calls = []
    th.probe(2, fake_timer({2: 1.0, 1: 2.0}, calls), rounds=5, budget_s=0.5, clock=lambda: next(clock))
    assert calls == [2, 1]


def test_the_real_probe_measures_both_counts_and_restores_torch():
    torch.set_num_threads(1)
    choice = th.choose_threads("auto", cores=2)
    assert choice.threads in (1, 2) and choice.source == "auto: probe"
    assert set(choice.probe_us) == {"2", "1"} and all(v > 0 for v in choice.probe_us.values())
    assert torch.get_num_threads() == 1  # choose_threads only measures


# --------------------------------------------------------------------------- the choice
def test_explicit_threads_win_and_are_not_probed():
    def boom(_):
        raise AssertionError("an explicit count must not be probed")
    choice = th.choose_threads(3, timer=boom, cores=2)
    assert (choice.threads, choice.source) == (3, "config")
    assert th.choose_threads(None, timer=boom, cores=2).threads is None  # torch's default, left alone


def test_auto_on_one_core_does_not_probe():
    def boom(_):
        raise AssertionError("one core: nothing to compare")
    assert th.choose_threads("auto", timer=boom, cores=1).as_dict()["threads"] == 1


def test_auto_takes_the_probe_result():
    slow_n = th.choose_threads("auto", timer=fake_timer({2: 7.8e-3, 1: 3.76e-4}), cores=2)
    assert (slow_n.threads, slow_n.source, slow_n.available_cores) == (1, "auto: probe", 2)
    assert slow_n.probe_us == {"2": 7800.0, "1": 376.0}
    assert th.choose_threads("auto", timer=fake_timer({2: 1.11e-4, 1: 2.01e-4}), cores=2).threads == 2


def test_setup_process_applies_the_choice_and_records_it(monkeypatch):
    monkeypatch.setattr(th, "decode_matmul_seconds", lambda t: {2: 5e-3, 1: 1e-3}[t])
    monkeypatch.setattr(th, "available_cores", lambda: 2)
    cfg = load_config(None, ["model.name=tiny"])
    assert cfg.train.threads == "auto"  # the default
    info = setup_process(cfg).summary()
    assert cfg.train.threads == 1 and torch.get_num_threads() == 1
    assert info["threads"] == 1 and info["source"] == "auto: probe" and "openmp" in info
    json.dumps(info)  # goes into summary.json
    cfg = load_config(None, ["model.name=tiny", "train.threads=2"])
    assert setup_process(cfg).summary()["source"] == "config" and torch.get_num_threads() == 2


# --------------------------------------------------------------------------- over a run
def test_tuner_reprobes_auto_only_after_long_steps():
    timings = {2: 1e-4, 1: 2e-4}
    calls: list[int] = []
    tuner = th.ThreadTuner("auto", timer=fake_timer(timings, calls), cores=2)
    assert tuner.threads == 2 and len(calls) > 0
    calls.clear()
    assert tuner.before_step() == 2 and calls == []  # first step: the start's probe is fresh
    tuner.after_step(th.REPROBE_MIN_STEP_S / 10)
    assert tuner.before_step() == 2 and calls == []  # a short step: not worth a probe
    tuner.after_step(th.REPROBE_MIN_STEP_S)
    timings.update({2: 8e-3, 1: 4e-4})  # a competing process started
    assert tuner.before_step() == 1 and torch.get_num_threads() == 1 and calls
    tuner.after_step(60.0)
    timings.update({2: 1e-4, 1: 2e-4})  # and stopped
    assert tuner.before_step() == 2 and torch.get_num_threads() == 2
    tuner.after_step(10.0)
    summary = tuner.summary()
    assert summary["threads"] == 2 and summary["source"] == "auto: probe"  # the choice at start
    assert summary["steps_by_threads"] == {"2": 3, "1": 1} and summary["reprobes"] == 2


@pytest.mark.parametrize("value", [2, None])
def test_tuner_never_reprobes_an_explicit_setting(value):
    def boom(_):
        raise AssertionError("explicit settings are not probed")
    tuner = th.ThreadTuner(value, timer=boom, cores=2)
    for _ in range(3):
        assert tuner.before_step() == value
        tuner.after_step(100.0)
    assert tuner.summary()["reprobes"] == 0


def test_thread_count_does_not_change_a_tiny_run(tmp_path):
    """The tuner may move the count between steps: results must not depend on it (weights compared bit for bit)."""
    from lmpo.train.loop import train

    weights = []
    for n in (1, 2):
        cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"),
                          ["train.steps=3", "eval.every=0", "eval.at_start=false", "eval.num_prompts=0",
                           f"train.threads={n}", f"output.dir={tmp_path}", f"output.run_name=t{n}",
                           "output.progress=false", "output.plot=false"])
        result = train(cfg)
        assert json.loads((result.run_dir / "summary.json").read_text())["threads"]["threads"] == n
        assert all(r.get("perf/threads") == n for r in result.history if "perf/step_s" in r)
        weights.append(torch.load(next(result.run_dir.glob("checkpoints/step_*/model.pt")), weights_only=True))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_config_accepts_auto_integers_and_null_and_rejects_the_rest():
    assert load_config(None, ["train.threads=auto"]).train.threads == "auto"
    assert load_config(None, ["train.threads=3"]).train.threads == 3
    assert load_config(None, ["train.threads=null"]).train.threads is None
    assert load_config(None, ["train.threads=0"]).train.threads == 0  # torch's default, as null
    assert th.choose_threads(0, cores=2).threads is None
    for bad in ("-2", "many", "1.5"):
        with pytest.raises(ConfigError, match="train.threads"):
            load_config(None, [f"train.threads={bad}"])


def test_perf_reference_leaves_torch_default_threads():
    cfg = load_config(None, ["perf=reference"])
    apply_perf(cfg)
    assert cfg.train.threads is None
    cfg = load_config(None, ["perf=reference", "train.threads=2"])
    apply_perf(cfg)
    assert cfg.train.threads == 2  # explicit wins under reference too


def test_the_default_config_asks_for_auto():
    cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs" / "default.yaml"))
    assert cfg.train.threads == "auto"


# --------------------------------------------------------------------------- OpenMP's spin-wait
def test_configure_sets_the_spin_count_when_nobody_did():
    env: dict[str, str] = {}
    state = th.configure_openmp(env, loaded=False)
    assert env["GOMP_SPINCOUNT"] == str(th.SPIN_COUNT) and state["set_by"] == "lmpo"


@pytest.mark.parametrize("user", [{"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "300000"},
                                  {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "5"}])
def test_the_users_setting_wins(user):
    env = dict(user)
    state = th.configure_openmp(env, loaded=False)
    assert env == user and state == {**user, "set_by": "user"}


def test_too_late_once_the_runtime_is_loaded():
    env: dict[str, str] = {}
    state = th.configure_openmp(env, loaded=True)
    assert env == {} and state["set_by"].startswith("nobody")


def test_a_child_process_reports_the_inherited_setting_as_lmpos():
    env: dict[str, str] = {}
    th.configure_openmp(env, loaded=False)
    assert th.configure_openmp(dict(env), loaded=True)["set_by"].startswith("lmpo (inherited")
    env["GOMP_SPINCOUNT"] = "7"  # changed by the user after: theirs
    assert th.configure_openmp(env, loaded=False)["set_by"] == "user"


def test_openmp_runtime_is_seen_in_this_process():
    assert th.openmp_runtime_loaded()  # torch is imported here
    assert not th.openmp_runtime_loaded(maps_path=os.devnull)


def _python(code: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in (*th.WAIT_VARIABLES, th.MARKER)}
    env.update(PYTHONPATH=SRC, OMP_DISPLAY_ENV="VERBOSE", **env_extra)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def _spin_seen_by_libgomp(stderr: str) -> str | None:
    for line in stderr.splitlines():  # libgomp prints its settings when it loads (OMP_DISPLAY_ENV)
        if line.strip().startswith("GOMP_SPINCOUNT"):
            return line.split("=", 1)[1].strip().strip("'")
    return None


def test_import_lmpo_before_torch_reaches_libgomp():
    p = _python("import lmpo, torch, json; from lmpo.engine import threads; print(json.dumps(threads.OPENMP))")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {"GOMP_SPINCOUNT": str(th.SPIN_COUNT), "set_by": "lmpo"}
    if "GOMP_SPINCOUNT" in p.stderr:  # the runtime is libgomp (torch's CPU wheel): it read lmpo's value
        assert _spin_seen_by_libgomp(p.stderr) == str(th.SPIN_COUNT)


def test_the_users_variable_reaches_libgomp_untouched():
    p = _python("import lmpo, torch, json; from lmpo.engine import threads; print(json.dumps(threads.OPENMP))",
                GOMP_SPINCOUNT="300000")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["set_by"] == "user"
    if "GOMP_SPINCOUNT" in p.stderr:
        assert _spin_seen_by_libgomp(p.stderr) == "300000"


def test_torch_first_is_reported_as_too_late():
    p = _python("import torch, lmpo, json, os; from lmpo.engine import threads; "
                "print(json.dumps([threads.OPENMP, os.environ.get('GOMP_SPINCOUNT')]))")
    assert p.returncode == 0, p.stderr
    state, env_value = json.loads(p.stdout.strip().splitlines()[-1])
    assert state["set_by"].startswith("nobody") and env_value is None
