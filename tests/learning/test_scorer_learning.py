"""Learning with learned scorers: a tiny reward model and PRM learn their built-in data and are then used by path;
RL on the copy task learns against the RM-ensemble's worst case (Coste et al., arXiv:2310.02743) of a right and a
hackable proxy."""

from __future__ import annotations

import pytest

from lmpo.config import load_config
from lmpo.registry import REWARDS
from lmpo.rewards.cappy import cappy_rows
from lmpo.tasks.scorer_data import copy_pairs
from lmpo.train.loop import train
from lmpo.train.scorer_stage import train_scorer


def stage_cfg(tmp_path, base, *over):
    return load_config(base, [f"output.dir={tmp_path}", "output.progress=false", "output.plot=false", *over])


def test_tiny_reward_model_learns_and_is_used_by_path(tmp_path):
    res = train_scorer(stage_cfg(tmp_path, "configs/tiny-rm.yaml", "train.steps=60", "eval.every=60",
                                 "output.checkpoint_every=60", "scorer.data.num=300"))
    b, a = res.eval_before, res.eval_after
    assert b["eval/accuracy"] < 0.7 and a["eval/accuracy"] >= 0.9, (b, a)
    assert a["eval/calibration_mae"] < b["eval/calibration_mae"]
    rm = REWARDS.build("reward_model", where="rewards[0]", path=str(res.run_dir))
    rows = copy_pairs(40, seed=123)  # pairs of another seed
    chosen = rm([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = rm([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert sum(x > y for x, y in zip(chosen, rejected)) >= 36


@pytest.mark.slow
def test_tiny_prm_learns(tmp_path):
    res = train_scorer(stage_cfg(tmp_path, "configs/tiny-prm.yaml", "train.steps=150", "eval.every=150",
                                 "output.checkpoint_every=150"))
    b, a = res.eval_before, res.eval_after
    assert a["eval/loss"] < b["eval/loss"] - 0.05 and a["eval/accuracy"] > b["eval/accuracy"] + 0.05, (b, a)
    prm = REWARDS.build("process_reward_model", where="rewards[0]", path=str(res.run_dir), separator=" ")
    good, bad = prm(["47="], ["4 7 "])[0], prm(["47="], ["3 7 "])[0]
    assert 0 < bad < good < 1


def test_rm_ensemble_wco_learns_the_copy_task(tmp_path):
    members = "[{name: prefix_match}, {name: 'learning.proxies:long_or_right'}]"
    cfg = load_config("configs/tiny.yaml", [
        f"output.dir={tmp_path}", "train.steps=40", "eval.every=0", "output.checkpoint_every=0",
        "output.progress=false", "output.plot=false", "kl.beta=0.01",
        f"rewards=[{{name: rm_ensemble, combine: wco, members: {members}}}, {{name: prefix_match, weight: 0}}]"])
    res = train(cfg)
    gold = [r["reward/prefix_match"] for r in res.history if "reward/prefix_match" in r]
    start, end = sum(gold[:3]) / 3, sum(gold[-5:]) / 5
    assert end >= start + 0.25, (start, end)
    assert any(r.get("reward/rm_ensemble/variance", 0) > 0 for r in res.history)  # the members disagreed


@pytest.mark.slow
def test_polar_discriminator_learns_to_tell_policies_apart(tmp_path):
    """POLAR pre-training on the toy policy pool; as a reward, on triples of a new seed, it prefers a second sample
    of the reference's policy to another policy's. (RL on the copy task against this tiny discriminator did not
    learn in 40 steps, measured: gold 0.04 -> 0.10; it prefers other shifts for some digits. docs/reward-models.md)"""
    from lmpo.rewards.polar import polar_pairs

    res = train_scorer(stage_cfg(tmp_path, "configs/tiny-polar.yaml"))
    assert res.eval_after["eval/accuracy"] >= res.eval_before["eval/accuracy"] + 0.2, (res.eval_before, res.eval_after)
    polar = REWARDS.build("polar", where="rewards[0]", path=str(res.run_dir), separator=" ")
    rows = polar_pairs(200, seed=7)
    refs = [r["prompt"].split("=")[1].strip() for r in rows]
    prompts = [r["prompt"].split("=")[0] + "=" for r in rows]
    pos = polar(prompts, [r["chosen"] for r in rows], answer=refs)
    neg = polar(prompts, [r["rejected"] for r in rows], answer=refs)
    assert sum(a > b for a, b in zip(pos, neg)) / 200 >= 0.7


def test_cappy_scorer_learns_to_rank_the_gold_reply_first(tmp_path):
    res = train_scorer(stage_cfg(tmp_path, "configs/tiny-cappy.yaml", "train.steps=80", "eval.every=80",
                                 "output.checkpoint_every=80"))
    assert res.eval_after["eval/loss"] < res.eval_before["eval/loss"] - 0.1, (res.eval_before, res.eval_after)
    cappy = REWARDS.build("cappy", where="rewards[0]", path=str(res.run_dir))
    rows = cappy_rows(30, seed=99, length=2)  # new prompts: gold, mismatched and corrupted replies
    right = sum(cappy.rerank(g["prompt"], [o["completion"], n["completion"], g["completion"]]) == 2
                for g, o, n in zip(rows[0::3], rows[1::3], rows[2::3]))
    assert right >= 15, right  # best-of-3 picks the gold reply far above chance (10 of 30)


@pytest.mark.slow
def test_crm_beats_plain_bradley_terry_under_label_noise(tmp_path):
    """30% flipped pairs, clean held-out pairs: the peer-reviewed RM ranks more of them right (measured: 0.81 vs
    0.67 at seed 0) and is used by path like any RM (model A)."""
    crm = train_scorer(stage_cfg(tmp_path / "crm", "configs/tiny-crm.yaml"))
    bt = train_scorer(stage_cfg(tmp_path / "bt", "configs/tiny-crm.yaml", "scorer.objective=bradley_terry"))
    assert crm.eval_after["eval/accuracy"] >= bt.eval_after["eval/accuracy"] + 0.05, (crm.eval_after, bt.eval_after)
    assert any("crm/kept_frac" in r for r in crm.history)
    rm = REWARDS.build("reward_model", where="rewards[0]", path=str(crm.run_dir))
    rows = copy_pairs(100, seed=1, length=2)
    c, r = rm([x["prompt"] for x in rows], [x["chosen"] for x in rows]), rm([x["prompt"] for x in rows], [x["rejected"] for x in rows])
    assert sum(a > b for a, b in zip(c, r)) / 100 == pytest.approx(crm.eval_after["eval/accuracy"], abs=1e-6)


def test_cgpo_crpg_learns_with_a_judge_gating_a_hackable_rm(tmp_path):
    """CGPO (arXiv:2409.20370): the RM is hackable (long replies score 1), the rule judge (prefix_match) vetoes
    wrong replies; CRPG on the judged calibrated reward learns the copy task."""
    cfg = load_config("configs/tiny.yaml", [
        f"output.dir={tmp_path}", "method=cgpo_crpg", "train.steps=40", "eval.every=0", "output.checkpoint_every=0",
        "output.progress=false", "output.plot=false",
        "rewards=[{name: cgpo_reward, rm: 'learning.proxies:long_or_right', judges: [prefix_match]}, "
        "{name: prefix_match, weight: 0}]"])
    res = train(cfg)
    gold = [r["reward/prefix_match"] for r in res.history if "reward/prefix_match" in r]
    assert sum(gold[-5:]) / 5 >= sum(gold[:3]) / 3 + 0.25, gold
    assert any(r.get("reward/cgpo_reward/violations", 0) > 0 for r in res.history)


@pytest.mark.parametrize("method", ["cgpo_crraft", "cgpo_codpo"])
def test_cgpo_crraft_and_codpo_learn_with_a_judge_gating_a_hackable_rm(tmp_path, method):
    """CGPO's other two optimizers (arXiv:2409.20370) on the same judged, hackable RM as CRPG: CRRAFT imitates each
    prompt's best feasible rollout, CODPO prefers it over a violating one; both learn the copy task."""
    cfg = load_config("configs/tiny.yaml", [
        f"output.dir={tmp_path}", f"method={method}", "train.steps=40", "eval.every=0", "output.checkpoint_every=0",
        "output.progress=false", "output.plot=false",
        "rewards=[{name: cgpo_reward, rm: 'learning.proxies:long_or_right', judges: [prefix_match]}, "
        "{name: prefix_match, weight: 0}]"])
    res = train(cfg)
    gold = [r["reward/prefix_match"] for r in res.history if "reward/prefix_match" in r]
    assert sum(gold[-5:]) / 5 >= sum(gold[:3]) / 3 + 0.25, gold


def test_caprl_qa_reward_teaches_the_copy_task(tmp_path):
    """CapRL (arXiv:2509.22647): the reply is rewarded by how many questions a second reader answers from it alone;
    here one question per row ("which digit comes first?") and a rule reader, so answering well means copying."""
    import json
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(256):
        d = rng.choice("0123456789")
        rows.append({"prompt": d + "=", "answer": d,
                     "questions": [{"question": "first digit?", "options": list("0123456789"), "answer": d}]})
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config("configs/tiny.yaml", [
        f"output.dir={tmp_path}", "train.steps=40", "eval.every=0", "output.checkpoint_every=0",
        "output.progress=false", "output.plot=false", f"task={{name: local, params: {{path: '{data}'}}}}",
        "rewards=[{name: caprl, backend: 'unit.scoring.stubs:reads_first_digit'}, {name: prefix_match, weight: 0}]"])
    gold = [r["reward/prefix_match"] for r in train(cfg).history if "reward/prefix_match" in r]
    assert sum(gold[-5:]) / 5 >= sum(gold[:3]) / 3 + 0.25, gold
