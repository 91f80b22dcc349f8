"""ProRAG's PRM step scores (arXiv:2601.21912): sigmoid(logit(yes) - logit(no)) of a second model after each turn."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError, DataError
from lmpo.methods.advantage.prorag import ProRAGAdvantage
from lmpo.methods.shape.prorag_prm import ProRAGPRM, turn_prefixes
from lmpo.models.load import load_model
from factories import from_config, tool_episode_batch


def batch_with_ids(seed=0):
    # row 0: turn 0 = 2 policy + 1 observation token, turn 1 = 1 policy token; row 1: one turn of 2 tokens
    b = tool_episode_batch([[(2, 1), (1, 0)], [(2, 0)]], rewards=[1.0, 0.0], turn_rewards=[[0.0, 1.0], [0.0]])
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 16, b.response_ids.shape, generator=g) * b.response_attn
    return b.replace(response_ids=ids, prompt_ids=torch.tensor([[5], [7]]))


def test_prefixes_end_after_each_turns_observation():
    b = batch_with_ids()
    r = b.response_ids
    got = {(i, t): ids for i, t, ids in turn_prefixes(b)}
    assert got == {(0, 0): [5] + r[0, :3].tolist(), (0, 1): [5] + r[0, :4].tolist(), (1, 0): [7] + r[1, :2].tolist()}


def test_scores_match_a_forward_per_prefix_and_feed_prorag():
    b = batch_with_ids()
    prm = ProRAGPRM(model="tiny:3", batch_size=2)
    out = prm(b)
    model, tok = load_model("tiny:3")
    yes, no = tok.convert_tokens_to_ids("+"), tok.convert_tokens_to_ids("=")
    want = torch.zeros(2, 2)
    with torch.no_grad():
        for i, t, ids in turn_prefixes(b):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            want[i, t] = torch.sigmoid(logits[yes] - logits[no])
    assert_close(out.extras["turn_scores"], want, atol=1e-5, rtol=1e-5)
    assert out.extras["turn_scores"][1, 1] == 0  # row 1 played one turn
    # ProRAG reads the PRM's scores before the environment's turn rewards
    with_prm = ProRAGAdvantage(beta=1.0)(out)
    manual = ProRAGAdvantage(beta=1.0)(b.replace(extras={**b.extras, "turn_rewards": want}))
    assert_close(with_prm, manual)
    assert not torch.allclose(with_prm, ProRAGAdvantage(beta=1.0)(b))


def test_passthrough_and_errors():
    plain = batch_with_ids().replace(turn_ids=None)
    assert ProRAGPRM()(plain) is plain
    with pytest.raises(ConfigError, match="no_token"):
        ProRAGPRM(no_token="-")(batch_with_ids())
    big = batch_with_ids()
    big = big.replace(response_ids=big.response_ids + 40 * big.response_attn)
    with pytest.raises(DataError, match="vocabulary"):
        ProRAGPRM()(big)
    with pytest.raises(ConfigError, match="batch_size"):
        from_config(ProRAGPRM, batch_size=0)


def test_epo_judge_marks_turns_above_the_threshold_and_feeds_epo_strategic():
    from lmpo.methods.advantage.epo_strategic import EPOStrategicAdvantage
    from lmpo.methods.shape.epo_judge import EPOJudge

    b = batch_with_ids()
    p = ProRAGPRM(model="tiny:3")(b).extras["turn_scores"]
    thr = float(p[0, 0] + p[0, 1]) / 2  # between row 0's two scores: exactly one of them is critical
    out = EPOJudge(model="tiny:3", threshold=thr)(b)
    crit = out.extras["critical_turns"]
    assert crit.tolist() == (p > thr).float().tolist() and crit[0].sum() == 1 and crit[1, 1] == 0
    want = EPOStrategicAdvantage(segment_mean=False)(b.replace(extras={**b.extras, "critical_turns": crit}))
    assert torch.equal(EPOStrategicAdvantage(segment_mean=False)(out), want)
    with pytest.raises(ConfigError, match="threshold"):
        from_config(EPOJudge, threshold=1.0)
