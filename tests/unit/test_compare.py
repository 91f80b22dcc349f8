"""``lmpo compare``'s statistics, steps to target, tables, figure and its decisions about existing run folders,
on hand-written metrics (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmpo.compare import (default_target, existing_run, markdown_table, plot_compare, stat, steps_to_target,
                          summarise)
from lmpo.config import load_config, save_config

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")

ROWS = [{"step": 0, "eval/accuracy": 0.1}, {"step": 1, "reward/mean": 0.1}, {"step": 2, "reward/mean": 0.6},
        {"step": 3, "reward/mean": 0.4}, {"step": 4, "reward/mean": 0.9, "eval/accuracy": 0.8}]


def test_steps_to_target_is_the_first_step_reaching_it():
    assert steps_to_target(ROWS, 0.5) == 2
    assert steps_to_target(ROWS, 0.6) == 2  # reaching counts (>=)
    assert steps_to_target(ROWS, 0.7) == 4  # a later dip (step 3) does not matter, only the first crossing
    assert steps_to_target(ROWS, 0.05) == 1  # step 0 has no training reward
    assert steps_to_target(ROWS, 0.95) is None
    assert steps_to_target(ROWS, None) is None


def test_default_target_is_halfway_from_mean_start_to_best():
    runs = {"a": [{"rows": ROWS}], "b": [{"rows": [{"step": 1, "reward/mean": 0.3}, {"step": 2, "reward/mean": 0.5}]}]}
    assert default_target(runs) == pytest.approx(0.2 + 0.5 * (0.9 - 0.2))  # starts 0.1 and 0.3, best 0.9
    assert default_target({"a": [{"rows": [{"step": 0, "eval/accuracy": 0.5}]}]}) is None


def test_stat_is_labelled_with_every_seed():
    assert stat({0: 1.0, 1: 3.0}) == {"mean": 2.0, "std": pytest.approx(2 ** 0.5), "per_seed": {"0": 1.0, "1": 3.0}}
    assert stat({5: 0.5}) == {"mean": 0.5, "std": None, "per_seed": {"5": 0.5}}  # no std from one seed
    assert stat({0: None, 1: 4.0, 2: float("nan")})["mean"] == 4.0
    assert stat({0: None}) == {"mean": None, "std": None, "per_seed": {"0": None}}


def run(seed, final, start_acc, rows, wall=10.0):
    return {"seed": seed, "wall_s": wall, "rows": rows, "peak_rss_gb": 0.3,
            "eval_before": {"eval/accuracy": start_acc}, "eval_after": {"eval/accuracy": final, "eval/reward": final}}


def results():
    late = [{"step": 0, "eval/accuracy": 0.0}, {"step": 1, "reward/mean": 0.0}, {"step": 2, "reward/mean": 0.2},
            {"step": 3, "reward/mean": 0.55}, {"step": 4, "reward/mean": 0.7, "eval/accuracy": 0.6}]
    never = [{"step": 0, "eval/accuracy": 0.0}, {"step": 1, "reward/mean": 0.0}, {"step": 2, "reward/mean": 0.1},
             {"step": 3, "reward/mean": 0.2}, {"step": 4, "reward/mean": 0.3, "eval/accuracy": 0.2}]
    return {"grpo": [run(0, 0.8, 0.1, ROWS, 10.0), run(1, 0.6, 0.0, late, 14.0)], "rloo": [run(0, 0.2, 0.0, never)]}


def test_summarise_schema_and_values():
    table = summarise(results(), 0.5)
    g, r = table["grpo"], table["rloo"]
    assert g["seeds"] == [0, 1]
    for key in ("heldout_reward", "heldout_accuracy", "heldout_accuracy_start", "wall_s", "peak_rss_gb"):
        assert set(g[key]) == {"mean", "std", "per_seed"}, key
    assert g["heldout_accuracy"]["per_seed"] == {"0": 0.8, "1": 0.6}
    assert g["heldout_accuracy"]["mean"] == pytest.approx(0.7)
    assert g["heldout_accuracy"]["std"] == pytest.approx(0.02 ** 0.5)  # sample std (n - 1)
    assert g["steps_to_target"] == {"mean": 2.5, "std": pytest.approx(0.5 ** 0.5), "per_seed": {"0": 2, "1": 3},
                                    "reached": 2, "runs": 2}
    assert r["steps_to_target"] == {"mean": None, "std": None, "per_seed": {"0": None}, "reached": 0, "runs": 1}
    assert g["wall_s"]["per_seed"] == {"0": 10.0, "1": 14.0}
    json.dumps(table)  # results.json must serialise


def test_markdown_has_both_tables_with_labels():
    table = summarise(results(), 0.5)
    md = markdown_table(table, "lmpo compare x", 0.5, "--target", {"soft_grpo-seed0": "lmpo: error: a|b"})
    assert "steps to train reward >= 0.500" in md
    assert "| grpo | 0.700 ± 0.141 | 0.050 -> 0.700 ± 0.141 | 2.5 ± 0.7 (2/2 seeds) | 12 | 0.30 |" in md
    assert "| rloo | 0.200 | 0.000 -> 0.200 | - (0/1 seeds) | 10 | 0.30 |" in md
    assert "| grpo | 1 | 0.600 | 0.000 -> 0.600 | 3 | 14 |" in md  # per seed
    assert "| rloo | 0 | 0.200 | 0.000 -> 0.200 | - | 10 |" in md
    assert "| soft_grpo-seed0 | failed: lmpo: error: a/b |" in md


def test_plot_writes_one_png(tmp_path):
    out = tmp_path / "curves.png"
    plot_compare(results(), out, 0.5)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


# --------------------------------------------------------------------------- existing run folders
def finished_folder(tmp_path, *overrides, steps=2) -> tuple[Path, dict]:
    cfg = load_config(TINY, [f"train.steps={steps}", *overrides])
    run = tmp_path / "r"
    (run / "checkpoints" / f"step_{steps:06d}").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text(f"step_{steps:06d}")
    save_config(cfg, run / "config.yaml")
    (run / "summary.json").write_text(json.dumps({"steps": steps}))
    return run, cfg.to_dict()


def test_existing_run_decisions(tmp_path):
    assert existing_run(tmp_path / "none", {}, 2)[0] == "train"
    run, wanted = finished_folder(tmp_path)
    assert existing_run(run, wanted, 2) == ("done", "finished earlier (step 2), read back")
    assert existing_run(run, wanted, 3) == ("resume", "resuming from step 2 of 3")
    action, why = existing_run(run, wanted, 1)
    assert action == "refuse" and "past train.steps=1" in why
    other = load_config(TINY, ["train.steps=2", "train.learning_rate=0.02", "output.dir=elsewhere"]).to_dict()
    action, why = existing_run(run, other, 2)  # output.* does not count, the learning rate does
    assert action == "refuse" and why == "was trained with another config: train.learning_rate: 0.01 there, 0.02 now"
    (run / "summary.json").unlink()  # finished but its summary missing: train --resume rebuilds it
    assert existing_run(run, wanted, 2)[0] == "resume"
    cfg = (run / "config.yaml").read_text()
    assert "\n  threads: auto" in cfg
    (run / "config.yaml").write_text("\n".join(ln for ln in cfg.splitlines() if not ln.startswith("  threads:")))
    assert existing_run(run, wanted, 3)[0] == "resume"  # a setting missing from an older config reads as its default
    (run / "config.yaml").write_text(cfg.replace("  learning_rate:", "  learnin_rate:"))
    action, why = existing_run(run, wanted, 3)
    assert action == "refuse" and "does not load" in why and "learnin_rate" in why


def test_existing_run_with_metrics_but_no_checkpoint_is_refused(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    assert existing_run(run, {}, 2)[0] == "train"  # only the evaluation before training: nothing lost
    (run / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1, "reward/mean": 0.1}\n')
    action, why = existing_run(run, {}, 2)
    assert action == "refuse" and "1 training steps but no checkpoint" in why
