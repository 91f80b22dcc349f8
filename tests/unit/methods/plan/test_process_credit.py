"""The process_credit planner (after_score): step scores on step-end tokens, step ids, failures, counters."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lmpo.batch import RolloutBatch
from lmpo.config import load_config
from lmpo.errors import ConfigError, DataError
from lmpo.methods.plan.process_credit import ProcessCredit, cutpoint_ends
from lmpo.models.tiny import build_tiny_tokenizer
from lmpo.pipeline import Pipeline

from factories import from_config

TOK = build_tiny_tokenizer()


def text_batch(completions, prompts=None, answers=None, logprobs=None, eos=True):
    """Rows of tiny-tokenizer replies (+ EOS), right-padded, with the meta the collection stage writes."""
    rows = [TOK(c, add_special_tokens=False)["input_ids"] + ([TOK.eos_token_id] if eos else []) for c in completions]
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    attn = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)], attn[i, :len(r)] = torch.tensor(r), True
    B = len(rows)
    prompts = prompts or ["1="] * B
    answers = answers or [None] * B
    meta = [{"prompt": p, "completion": c, "prompt_key": p, "row": {"prompt": p, **({"answer": a} if a else {})}}
            for p, c, a in zip(prompts, completions, answers)]
    lp = logprobs if logprobs is not None else torch.zeros(B, T)
    return RolloutBatch(prompt_ids=torch.ones(B, 1, dtype=torch.long), response_ids=ids, response_mask=attn.clone(),
                        response_attn=attn, group_ids=torch.zeros(B, dtype=torch.long), rewards=torch.zeros(B),
                        sampler_logprobs=lp * attn, meta=meta)


CTX = SimpleNamespace(tokenizer=TOK)


def test_equation_steps_hand_case():
    # "1+1=2 2+2=5 7" cut at " ": steps "1+1=2" (chars 0-4, tokens 0-4) +1, "2+2=5" (tokens 6-10) -1, "7" (token 12)
    # neutral 0; EOS is token 13. Rewards on tokens 4, 10, 12; step ids 0 x5, 1 x6 (separator 5 joins step 1), 2 x3.
    pc = ProcessCredit(separator=" ", horizon=8)
    out = pc.after_score(CTX, text_batch(["1+1=2 2+2=5 7"]))
    exp = torch.zeros(14)
    exp[4], exp[10] = 1.0, -1.0
    assert out.token_rewards[0].tolist() == exp.tolist()
    assert out.turn_ids[0].tolist() == [0] * 5 + [1] * 6 + [2] * 3
    assert out.extras["num_steps"].tolist() == [3]
    assert out.extras["step_rewards"][0, :4].tolist() == [1.0, -1.0, 0.0, 0.0]
    assert out.extras["step_ends"][0, :4].tolist() == [4, 10, 12, -1]
    assert pc.state == {"rows": 1, "failed": 0, "one_step": 0, "empty": 0, "merged": 0}


def test_no_separator_is_one_step_and_empty_reply_has_none():
    pc = ProcessCredit(scorer="copy_steps", separator="\n\n", weight=0.5, horizon=4)
    out = pc.after_score(CTX, text_batch(["33 4", ""], prompts=["3=", "3="]))
    # row 0: one step "33 4" (copy target "3": correct) -> 0.5 on its last character (token 3); row 1: nothing
    assert out.token_rewards.tolist() == [[0, 0, 0, 0.5, 0], [0, 0, 0, 0, 0]]
    assert out.extras["num_steps"].tolist() == [1, 0] and out.turn_ids.abs().sum() == 0
    assert pc.state["one_step"] == 1 and pc.state["empty"] == 1


def test_padding_and_existing_token_rewards():
    b = text_batch(["1+1=2", "2+2=4 5"])
    b = b.replace(token_rewards=torch.full(b.response_ids.shape, 0.125) * b.response_mask)
    out = ProcessCredit(separator=" ", horizon=4).after_score(CTX, b)
    assert out.token_rewards[0].tolist() == [0.125] * 4 + [1.125, 0.125, 0, 0]  # padding stays 0
    assert out.token_rewards[1, 4].item() == 1.125 and out.turn_ids[0, 6:].tolist() == [0, 0]


class Broken:
    def __init__(self, scores):
        self.scores = scores

    def __call__(self, prompt, completion, steps, **_):
        if self.scores == "raise":
            raise RuntimeError("judge timed out")
        return self.scores


@pytest.mark.parametrize("scores,why", [([math.nan], "not finite"), ([1.0, 2.0], "expected 1 scores"),
                                        ("raise", "judge timed out"), (None, "numbers")])
def test_bad_scores_raise_naming_the_row_or_are_masked_and_counted(monkeypatch, scores, why):
    pc = ProcessCredit(horizon=4)
    pc.__dict__["_scorer_fn"] = Broken(scores)
    b = text_batch(["12", "3"])
    with pytest.raises(DataError, match=f"row 0.*{why}.*on_error=mask"):
        pc.after_score(CTX, b)
    pm = ProcessCredit(horizon=4, on_error="mask")
    pm.__dict__["_scorer_fn"] = Broken(scores)
    out = pm.after_score(CTX, b)
    assert not out.response_mask.any() and out.extras["step_failed"].tolist() == [1.0, 1.0]
    assert pm.state["failed"] == 2 and out.token_rewards.abs().sum() == 0


def test_episode_batches_and_missing_text_are_refused():
    b = text_batch(["12"])
    with pytest.raises(DataError, match="episodes"):
        ProcessCredit().after_score(CTX, b.replace(turn_ids=torch.zeros_like(b.response_ids)))
    with pytest.raises(DataError, match="completion"):
        ProcessCredit().after_score(CTX, b.replace(meta=[]))


def test_cutpoints_segmentation():
    # probabilities 0.9 0.2 0.9 0.1 0.3 0.9: cutpoints (p < 0.5) at 1, 3, 4; every 2nd -> a cut after token 3
    lp = torch.tensor([0.9, 0.2, 0.9, 0.1, 0.3, 0.9]).log()
    assert cutpoint_ends(lp, 6, 0.5, 2) == [3, 5]
    assert cutpoint_ends(lp, 6, 0.5, 1) == [1, 3, 4, 5]
    b = text_batch(["1+1=22"], logprobs=torch.cat([lp, torch.zeros(1)])[None], eos=True)
    out = ProcessCredit(segment="cutpoints", cut_prob=0.5, cut_every=2, horizon=4).after_score(CTX, b)
    # segments "1+1=" (neutral) and "22" (neutral): ends 3 and 5
    assert out.extras["step_ends"][0, :3].tolist() == [3, 5, -1] and out.turn_ids[0].tolist() == [0] * 4 + [1] * 3


def test_bad_hyper_parameters_and_pipeline_point():
    with pytest.raises(Exception, match="on_error"):
        from_config(ProcessCredit, on_error="skip")
    with pytest.raises(ConfigError, match="equation_steps"):
        load_config("configs/tiny.yaml", ["method=pure", "planners=[{name: process_credit, scorer: equation_step}]"])
    with pytest.raises(ConfigError, match="regular expression"):
        from_config(ProcessCredit, pattern="(")
    p = Pipeline.assemble(planners=[ProcessCredit()])
    assert len(p.calls("after_score")) == 1


def test_smollm2_replies_rewards_land_on_each_steps_last_token():
    from factories import smollm2_tokenizer

    tok = smollm2_tokenizer()
    text = "First, 3+4=7.\n\nThen 7*2=15 😀\n\nSo the answer is 15."
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    T = len(ids)
    m = torch.ones(1, T, dtype=torch.bool)
    b = RolloutBatch(prompt_ids=torch.ones(1, 1, dtype=torch.long), response_ids=torch.tensor([ids]), response_mask=m,
                     response_attn=m.clone(), group_ids=torch.zeros(1, dtype=torch.long), rewards=torch.zeros(1),
                     sampler_logprobs=torch.zeros(1, T), meta=[{"prompt": "q", "completion": text, "row": {}}])
    out = ProcessCredit(horizon=T).after_score(SimpleNamespace(tokenizer=tok), b)
    ends = out.extras["step_ends"][0, :3].tolist()
    assert out.extras["step_rewards"][0, :3].tolist() == [1.0, -1.0, 0.0]
    for e, step_text in zip(ends, ["First, 3+4=7.", "Then 7*2=15 😀", "So the answer is 15."]):
        upto = tok.decode(ids[:e + 1], skip_special_tokens=True)
        assert upto.endswith(step_text) and not tok.decode(ids[:e], skip_special_tokens=True).endswith(step_text)
    assert out.token_rewards[0, ends[0]].item() == 1.0 and out.token_rewards[0, ends[1]].item() == -1.0
    assert out.turn_ids[0, -1].item() == 2 and out.turn_ids[0].tolist() == sorted(out.turn_ids[0].tolist())
