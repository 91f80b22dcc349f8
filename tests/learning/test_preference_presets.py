"""Learning tests of the preference presets: the tiny random model, trained on the shipped copy-task pairs
(configs/dpo-tiny.yaml: prompt "3=", chosen "3", rejected another number), comes to prefer the chosen responses of
held-out pairs; DPO also raises the copy task's greedy accuracy. Seconds per preset."""

from __future__ import annotations

import pytest

from lmpo.config import load_config
from lmpo.methods.presets import PRESETS
from lmpo.train.loop import train

PREFERENCE_PRESETS = sorted(m for m in PRESETS if "preference" in PRESETS[m])
STEPS = 20
TWEAKS: dict[str, list[str]] = {}  # presets whose defaults need another setting on this task (with the reason)


def run(tmp_path, method, *over):
    cfg = load_config("configs/dpo-tiny.yaml", [f"output.dir={tmp_path}", f"method={method}", f"train.steps={STEPS}",
                                                 "eval.every=0", "eval.num_prompts=0", "output.checkpoint_every=0",
                                                 "output.progress=false", "output.plot=false",
                                                 *TWEAKS.get(method, []), *over])
    return train(cfg)


@pytest.mark.parametrize("method", PREFERENCE_PRESETS)
def test_preset_learns_to_prefer_held_out_chosen_responses(tmp_path, method):
    result = run(tmp_path, method)
    before, after = result.eval_before, result.eval_after
    assert after["eval/logp_accuracy"] >= max(0.9, before["eval/logp_accuracy"] + 0.3), (method, before, after)
    assert after["eval/reward_margin"] > before["eval/reward_margin"] + 1.0, (method, before, after)


def test_dpo_raises_the_task_accuracy(tmp_path):
    result = run(tmp_path, "dpo", "train.steps=30", "eval.num_prompts=32")
    assert result.eval_after["eval/accuracy"] >= result.eval_before["eval/accuracy"] + 0.3, result.eval_after


def test_swapped_pairs_control_learns_the_opposite(tmp_path):
    """The control: with chosen and rejected swapped, DPO learns to prefer the wrong answers (the bars above are
    met by learning the labels, not by any drift of the model)."""
    import json

    from lmpo.tasks.pairs import shipped

    rows = [json.loads(line) for line in open(shipped("lmpo:tasks/data/pairs_copy.jsonl"))]
    path = tmp_path / "swapped.jsonl"
    path.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n" for r in rows))
    result = run(tmp_path, "dpo", f"preference.data.path={path}", "eval.num_prompts=32")
    # held-out "chosen" are now the wrong answers: the model prefers them, and never copies the digit
    assert result.eval_after["eval/logp_accuracy"] >= 0.9 and result.eval_after["eval/accuracy"] <= 0.1
