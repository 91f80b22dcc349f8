"""process_reward_model: step cuts, step scores checked against the LM run on each step's prefix, aggregation,
replies without separators, spans for process credit."""

from __future__ import annotations

import math

import pytest
import torch

from lmpo.errors import ConfigError
from lmpo.registry import REWARDS
from lmpo.rewards.prm import aggregate, encode_steps, split_steps


def build(**kw):
    return REWARDS.build("process_reward_model", where="rewards[0]", **{"path": "tiny", "separator": " ", **kw})


@pytest.mark.parametrize("text, spans", [
    ("a\nb\n", [(0, 2), (2, 4)]),       # each step keeps its separator; no empty trailing step
    ("a\nb", [(0, 2), (2, 3)]),
    ("ab", [(0, 2)]),                   # no separator: one step
    ("", [(0, 0)]),                     # an empty reply is one empty step
    ("a\n\nb", [(0, 2), (2, 3), (3, 4)]),  # an empty line is a step of its own
])
def test_split_steps_by_hand(text, spans):
    assert split_steps(text, "\n") == spans
    assert "".join(text[a:b] for a, b in spans) == text


def test_aggregates_by_hand():
    s = [0.9, 0.2, 0.6]
    assert aggregate(s, "min") == 0.2 and aggregate(s, "last") == 0.6
    assert aggregate(s, "mean") == pytest.approx(1.7 / 3) and aggregate(s, "prod") == pytest.approx(0.108)


def test_step_scores_equal_the_head_on_each_steps_prefix():
    prm = build(batch_size=2)
    prompts, replies = ["12=", "7=", "3="], ["1 2 ", "7 77", "5"]
    got = prm.step_scores(prompts, replies)
    tok, lm, head = prm.tokenizer, prm.model.lm, prm.model.head
    for p, c, g in zip(prompts, replies, got):
        assert "".join(c[a:b] for a, b in g.spans) == c
        for (a, b), score in zip(g.spans, g.scores):  # reference: the LM on prompt + reply[:b] alone
            ids = torch.tensor([tok(p + c[:b], add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                h = lm(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
            assert score == pytest.approx(1 / (1 + math.exp(-float(h @ head.weight[0] + head.bias[0]))), abs=1e-5)
    assert [len(g.scores) for g in got] == [2, 2, 1]


def test_reward_aggregates_and_counts_replies_without_separator():
    prompts, replies = ["1=", "1=", "2="], ["1 1 ", "11", "2 3"]
    steps = build().step_scores(prompts, replies)
    for how in ("min", "last", "mean"):
        prm = build(aggregate=how)
        assert prm(prompts, replies) == pytest.approx([aggregate(s.scores, how) for s in steps])
        assert prm.pop_metrics() == {"no_separator": 1.0}


def test_steps_past_max_length_are_dropped_and_counted():
    tok = build().tokenizer
    ids, ends = encode_steps(tok, "123=", ["1 ", "2 ", "3 "], max_length=7)
    # 6 step tokens leave room for 1 prompt token: the prompt is cut from the left to "="
    assert tok.decode(ids) == "=1 2 3 " and ends == [2, 4, 6]
    prm = build(max_length=4)
    out = prm.step_scores(["12="], ["1 2 3 "])
    assert len(out[0].scores) == 2 and prm.pop_metrics()["truncated_steps"] == 1.0


def test_empty_separator_is_a_config_error():
    with pytest.raises(ConfigError, match="separator"):
        build(separator="")


def test_step_scorer_adapter_scores_given_steps_like_step_scores():
    from lmpo.rewards.prm import prm_step_scorer

    scorer = prm_step_scorer("tiny", separator=" ")
    whole = build().step_scores(["12="], ["1 2 "])[0].scores
    assert scorer("12=", "1 2 ", ["1", "2"], answer="12") == pytest.approx(whole, abs=1e-6)
    assert scorer("12=", "", []) == []
    short = REWARDS.build("process_reward_model", where="x", path="tiny", separator=" ", max_length=3)
    got = short.score_steps("12=", "1 2 ", ["1", "2"])
    assert math.isfinite(got[0]) and math.isnan(got[1]) and short.pop_metrics() == {"truncated_steps": 1.0}


def test_prm_drives_the_process_credit_planner_in_a_run(tmp_path):
    """The PRM as the credit stage's step scorer (lmpo.methods.plan.process_credit), under PURE's min-form credit."""
    from lmpo.config import load_config
    from lmpo.train.loop import train

    cfg = load_config("configs/tiny.yaml", [
        f"output.dir={tmp_path}", "method=pure", "train.steps=2", "eval.every=0", "output.checkpoint_every=0",
        "output.progress=false", "output.plot=false", "rollout.prompts_per_step=2", "rollout.num_generations=4",
        "planners=[{name: process_credit, scorer: 'unit.scoring.stubs:tiny_prm', separator: ' '}]"])
    from unit.scoring import stubs

    stubs._PRM.clear()
    res = train(cfg)
    assert [r["step"] for r in res.history if "reward/mean" in r] == [1, 2]
    assert "fn" in stubs._PRM  # the PRM scored the steps
