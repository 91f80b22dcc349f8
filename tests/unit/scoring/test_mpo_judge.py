"""MPO's evolving-rubric judge (arXiv:2504.20157): the three meta stages by hand, the card's properties (an MRM that
returns the rubric unchanged is a fixed judge; a batch is scored by the rubric in force when it was generated), the
bound on the rubric, unparsable meta outputs, the checkpoint round trip and --resume."""

from __future__ import annotations

import pytest
import torch

import lmpo.rewards  # noqa: F401
from lmpo.errors import ConfigError, RewardError
from lmpo.registry import REWARDS
from lmpo.rewards.mpo import TEMPLATE, join_under_word_limit, parse_items, render_rubric
from unit.scoring import mpo_stubs

STUBS = "unit.scoring.mpo_stubs:"
PROMPTS, REPLIES = ["3=", "5=", "7=", "2="], ["3", "0", "9", "0 1"]


def mpo(meta="scripted", **kw):
    kw = {"rubric": ["ZERO: right or a leading 0"], "judge": {"backend": STUBS + "rule_judge"},
          "meta_backend": STUBS + meta, "interval": 2, "num_samples": 4, **kw}
    return REWARDS.build("mpo_judge", where="rewards[0]", **kw)


def test_hand_case_analysis_refinement_merge(monkeypatch):
    # merge output: a duplicate, an empty item and an echoed "<item>...</item>" dropped, 3 items left; max_items=2
    # keeps the first two; the second (24 characters) is cut at max_item_chars=10.
    monkeypatch.setattr(mpo_stubs, "MERGED", "<item>RIGHT a</item><item>RIGHT a</item><item> </item><item>...</item>"
                                             "<item>ZERO b and more words</item><item>third</item>")
    mpo_stubs.CALLS.clear()
    j = mpo(max_items=2, max_item_chars=10)
    # rubric v0 = [ZERO]: "3" right -> 1, "0" leading 0 -> 1, "9" -> 0, "0 1" -> 1
    s1 = j(PROMPTS, REPLIES)
    assert s1 == [1.0, 1.0, 0.0, 1.0]
    j.after_step(PROMPTS[:2], REPLIES[:2], s1[:2])  # step 1 of interval 2: buffered, no meta step
    assert mpo_stubs.CALLS == [] and j.state["version"] == 0 and len(j.state["buffer"]) == 2
    j.after_step(PROMPTS[2:], REPLIES[2:], s1[2:])  # step 2: the meta step on the 4 buffered samples
    analyze, refine, merge = mpo_stubs.CALLS
    assert len(analyze) == len(refine) == 4 and len(merge) == 1
    assert "Reply: 0 1\n" in analyze[3] and "Judge's score: 1\n" in analyze[3]
    assert "ZERO: right or a leading 0" in analyze[3]
    assert refine[0].startswith(analyze[0]) and "\nanalysis\n" in refine[0]  # refinement in the analysis' context
    assert merge[0].count("Rubric #") == 4 and "<item>\nZERO b\n</item>" in merge[0]
    assert j.state["rubric"] == ["RIGHT a", "ZERO b and"] and j.state["version"] == 1
    assert j.state["buffer"] == [] and j.state["seen"] == 0  # the phase's samples are discarded
    m = j.pop_metrics()
    assert m["truncated_items"] == 2.0 and m["rubric_items"] == 2.0 and m["refinements"] == 1.0
    assert m["rubric_version"] == 0.0 and m["rubric_version_next"] == 1.0
    # rubric v1 = [RIGHT, ZERO]: scored item by item and summed: 3 -> 1 + 1, 0 -> 0 + 1, 9 -> 0, "0 1" -> 0 + 1
    mpo_stubs.JUDGED.clear()
    assert j(PROMPTS, REPLIES) == [2.0, 1.0, 0.0, 1.0]
    assert {t.split("Criterion:\n")[1].split("\n")[0] for t in mpo_stubs.JUDGED} == {"RIGHT a", "ZERO b and"}
    assert j.pop_metrics()["rubric_version"] == 1.0


def test_unchanged_rubric_is_a_fixed_judge():
    """Card test (a): with an MRM that returns the rubric it was shown, MPO scores as the plain judge."""
    j = mpo("keeps_rubric", interval=1)
    fixed = REWARDS.build("judge", where="rewards[1]", backend=STUBS + "rule_judge", parse="number",
                          template=TEMPLATE.replace("{rubric_item}", "ZERO: right or a leading 0"))
    for step in range(3):
        s = j(PROMPTS, REPLIES)
        assert s == fixed(PROMPTS, REPLIES)
        j.after_step(PROMPTS, REPLIES, s)
    assert j.state["version"] == 0 and j.state["meta_steps"] == 3 and j.state["refinements"] == 0


def test_a_batch_is_scored_by_the_rubric_in_force_when_generated():
    """Card test (b): no look-ahead. The meta step that the batch's own scores trigger changes neither those scores
    nor what the MRM was shown (the old rubric, the old scores); the next batch is scored by the new rubric."""
    j = mpo("closes_zero_hack", interval=1)
    s1 = j(PROMPTS, REPLIES)
    assert j.scored_version == 0 and s1 == [1.0, 1.0, 0.0, 1.0]
    j.after_step(PROMPTS, REPLIES, s1)
    assert j.state["version"] == 1 and all("ZERO" in t and "RIGHT" not in t.split("Judge's rubric:")[1].split(
        "Judge's score")[0] for t in j.last_meta["analyze"])
    assert j.pop_metrics()["rubric_version"] == 0.0  # the step's batch was scored by version 0
    assert j(PROMPTS, REPLIES) == [1.0, 0.0, 0.0, 0.0]  # the hack (a leading 0) no longer pays
    assert j.scored_version == 1


def test_unparsable_meta_output_is_counted_or_an_error():
    j = mpo("rambles", interval=1)
    s = j(PROMPTS, REPLIES)
    j.after_step(PROMPTS, REPLIES, s)
    assert j.state["rubric"] == ["ZERO: right or a leading 0"] and j.state["version"] == 0
    m = j.pop_metrics()
    assert m["meta_failures"] == 1.0 and m["meta_unparsable"] == 4.0
    j = mpo("rambles", interval=1, on_meta_failure="error")
    with pytest.raises(RewardError, match=r"<item>.*on_meta_failure: keep"):
        j.after_step(PROMPTS, REPLIES, s)


def test_rubric_bound_reservoir_and_word_limit():
    assert parse_items("x <item> a </item><item>b</item><item>a</item><item></item>") == ["a", "b"]
    assert render_rubric(["a"]) == "<rubric>\n<item>\na\n</item>\n</rubric>"
    assert join_under_word_limit(["a b", "c", "d e f"], 3) == "a b\n===\nc"  # the third would make 6 words
    j = mpo("keeps_rubric", interval=3, num_samples=2)
    for _ in range(2):
        j.after_step(PROMPTS, REPLIES, [0.0] * 4)
    assert len(j.state["buffer"]) == 2 and j.state["seen"] == 8  # a uniform sample of the phase, at most 2
    with pytest.raises(ConfigError, match="max_items"):
        mpo(rubric=["a", "b", "c"], max_items=2)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"\{rubric_item\}"):
        mpo(judge={"backend": STUBS + "rule_judge", "template": "{prompt}{completion}"})
    with pytest.raises(ConfigError, match="rubric must be"):
        mpo(rubric=[])
    with pytest.raises(ConfigError, match="max_score"):  # the judge's own options, with did-you-mean
        mpo(judge={"backend": STUBS + "rule_judge", "max_scor": 2})
    with pytest.raises(ConfigError, match="interval"):
        mpo(interval=0)
    with pytest.raises(ConfigError, match=r"merge_template cannot be filled \(KeyError: 'rubric_list'\)"):
        mpo(merge_template="{rubric_list}")


def test_state_round_trip():
    j = mpo("closes_zero_hack", interval=1)
    j.after_step(PROMPTS, REPLIES, j(PROMPTS, REPLIES))
    j.after_step(PROMPTS[:1], REPLIES[:1], [2.0])  # a partly filled phase travels too
    saved = j.state_dict()
    k = mpo("closes_zero_hack", interval=1)
    k.load_state_dict(saved)
    assert k.state == j.state and k(PROMPTS, REPLIES) == j(PROMPTS, REPLIES)
    saved["version"] = 99  # a deep copy: the saved state is not the live one
    assert j.state["version"] == 1


def test_rubric_travels_in_checkpoints_and_resume(tmp_path):
    from lmpo.config import load_config
    from lmpo.train.loop import train

    reward = ("rewards=[{name: mpo_judge, rubric: ['ZERO: right or a leading 0'], interval: 1, num_samples: 8, "
              f"judge: {{backend: '{STUBS}rule_judge'}}, meta_backend: '{STUBS}closes_zero_hack'}}]")
    over = [f"output.dir={tmp_path}", "eval.every=0", "output.checkpoint_every=2", "output.progress=false",
            "output.plot=false", "rollout.prompts_per_step=4", "rollout.num_generations=4", reward]
    first = train(load_config("configs/tiny.yaml", over + ["train.steps=2"]))
    state = torch.load(first.run_dir / "checkpoints" / "step_000002" / "state.pt", weights_only=False)
    saved = state["components"]["reward:mpo_judge"]
    assert saved["steps"] == 2 and saved["meta_steps"] == 2 and saved["version"] == 1, saved  # a 0-led wrong reply seen
    resumed = train(load_config("configs/tiny.yaml", over + ["train.steps=3"]), resume=True)
    row = [r for r in resumed.history if r.get("step") == 3 and "reward/mpo_judge/rubric_version" in r][-1]
    assert row["reward/mpo_judge/rubric_version"] == saved["version"]  # scored by the restored rubric
    assert row["reward/mpo_judge/meta_steps"] == 3.0


def test_eval_restores_the_rubric_and_a_foreign_checkpoint_is_refused(tmp_path, monkeypatch):
    from lmpo.config import load_config
    from lmpo.errors import LmpoError
    from lmpo.rewards.mpo import MPOJudge
    from lmpo.train.loop import evaluate_run, train

    reward = ("rewards=[{name: mpo_judge, rubric: ['ZERO: right or a leading 0'], interval: 1, "
              f"judge: {{backend: '{STUBS}rule_judge'}}, meta_backend: '{STUBS}closes_zero_hack'}}]")
    over = [f"output.dir={tmp_path}", "eval.every=0", "output.checkpoint_every=2", "output.progress=false",
            "output.plot=false", "rollout.prompts_per_step=4", "rollout.num_generations=4", "train.steps=2"]
    cfg = load_config("configs/tiny.yaml", over + [reward])
    res = train(cfg)
    loaded = []
    monkeypatch.setattr(MPOJudge, "load_state_dict", lambda self, st: loaded.append(st["version"]))
    evaluate_run(cfg, res.run_dir)
    assert loaded == [1]  # `lmpo eval` scores with the rubric the run had reached
    plain = train(load_config("configs/tiny.yaml", [*over, "output.run_name=plain"]))
    with pytest.raises(LmpoError, match="no state for 'reward:mpo_judge'"):
        train(load_config("configs/tiny.yaml", [*over, "output.run_name=plain", "train.steps=3", reward]), resume=True)
    assert plain.run_dir.exists()


def test_preset_row_names_the_paper():
    from lmpo.cli import preset_rows

    row = next(r for r in preset_rows() if r["preset"] == "mpo_judge")
    assert "arXiv:2504.20157" in row["papers"] and row["fidelity"] == "reconstructed" and "mpo_judge" in row["components"]


def test_language_models_as_judge_and_meta_model():
    """The LM path end to end with the tiny random model: its verdicts and meta outputs are noise, so the judge's
    unparsable verdicts are masked and counted, and the meta step fails (no <item> block), counted; nothing crashes."""
    j = REWARDS.build("mpo_judge", where="rewards[0]", rubric=["a", "b"], meta_model="tiny", interval=1, num_samples=2,
                      meta_max_new_tokens=6, judge={"model": "tiny", "max_new_tokens": 3, "max_score": 1000})
    s = j(PROMPTS, REPLIES)
    assert len(s) == 4 and all(v == v for v in s)
    j.after_step(PROMPTS, REPLIES, s)
    m = j.pop_metrics()
    assert m["meta_steps"] == 1.0 and m["meta_failures"] == 1.0 and j.state["rubric"] == ["a", "b"]
    assert len(j.last_meta["analyze"]) == 2 and all(isinstance(x, str) for x in j.last_meta["analyses"])


def test_meta_model_timeout_is_a_counted_failure():
    j = mpo(interval=1, meta_timeout_s=0.05, meta_backend="unit.scoring.stubs:sleeps")
    j.after_step(PROMPTS, REPLIES, [1.0] * 4)
    m = j.pop_metrics()
    assert m["meta_failures"] == 1.0 and m["meta_timeouts"] >= 1.0 and j.state["version"] == 0
