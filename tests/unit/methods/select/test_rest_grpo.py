"""ReST-GRPO (arXiv:2508.19576 stage 1): reward-std filter and prefix-prompt assembly."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.select.rest_grpo import ReSTGRPO, prefix_probs
from factories import from_config, make_batch, random_batch


def with_meta(batch, completions, rows):
    meta = [{"prompt": r["prompt"], "completion": c, "row": r} for c, r in zip(completions, rows)]
    return batch.replace(meta=meta)


# --------------------------------------------------------------------------- hand cases (the card's)
def test_hand_filter():
    # group 0: [1,1,1,1,1] -> std 0 < 0.05 -> dropped; group 1: [1,0,1,0,1] -> mean 0.6, population var
    # (3 * 0.16 + 2 * 0.36) / 5 = 0.24 -> std 0.49 >= 0.05 -> kept.
    b = make_batch([1, 1, 1, 1, 1, 1, 0, 1, 0, 1], [0] * 5 + [1] * 5)
    assert ReSTGRPO()(b).tolist() == [False] * 5 + [True] * 5


def test_hand_threshold_edge():
    # rewards [0.1, 0.0]: population std = 0.05 exactly -> kept (>=); [0.09, 0.0] -> 0.045 -> dropped
    assert ReSTGRPO()(make_batch([0.1, 0.0, 0.09, 0.0], [0, 0, 1, 1])).tolist() == [True, True, False, False]


def test_hand_prefix_probabilities():
    # alpha = 0.95, L = 4: weights 1, 0.95, 0.9025, 0.857375 (sum 3.709875) -> the card's [0.2696, 0.2561, 0.2433, 0.2311]
    assert_close(prefix_probs(4, 0.95), torch.tensor([0.2696, 0.2561, 0.2433, 0.2311], dtype=torch.float64),
                 atol=5e-5, rtol=0)


def test_no_prefix_prompts_below_accept_reward():
    # best reward 0.8 < R_acc = 0.9: nothing is assembled, whatever the filter says
    rows = [{"prompt": "q", "answer": "a"}] * 2
    b = with_meta(make_batch([0.8, 0.0], [0, 0]), ["l1\nl2\n", "x"], rows)
    sel = ReSTGRPO()
    assert sel(b).tolist() == [True, True]
    assert sel.inject_prompts(10) == []


def test_prefix_prompts_from_best_solution():
    # best solution (reward 1) has L = 4 lines -> m = ceil(0.5 * 4) = 2 prefixes, each a line prefix of it, carrying
    # the original row's columns unchanged.
    rows = [{"prompt": "q", "answer": "a"}] * 3
    b = with_meta(make_batch([0.0, 1.0, 0.5], [7, 7, 7]), ["bad\n", "l1\nl2\nl3\nl4", "so-so\n"], rows)
    sel = ReSTGRPO(seed=3)
    sel(b)
    out = sel.inject_prompts(10)
    assert len(out) == 2
    prefixes = {"l1\n", "l1\nl2\n", "l1\nl2\nl3\n", "l1\nl2\nl3\nl4"}
    for r in out:
        assert r["prompt"] == "q" and r["answer"] == "a" and r["response_prefix"] in prefixes
    assert sel.inject_prompts(10) == []  # served once
    # prompts that already carry a prefix are not split again
    b2 = with_meta(make_batch([1.0, 0.0], [0, 0]), ["x\ny", "z"], [out[0], out[0]])
    sel(b2)
    assert sel.inject_prompts(10) == []


def test_queue_survives_resume_and_is_capped():
    rows = [{"prompt": f"q{i}", "answer": "a"} for i in range(4)]
    b = with_meta(make_batch([1.0, 0.0, 1.0, 0.0], [0, 0, 1, 1]), ["a\nb\nc\nd", "", "e\nf\ng\nh", ""],
                  [rows[0], rows[0], rows[1], rows[1]])
    sel = ReSTGRPO(max_queue=3)
    sel(b)
    fresh = ReSTGRPO(max_queue=3)
    fresh.load_state_dict(sel.state_dict())
    assert len(fresh.inject_prompts(10)) == 3  # 2 + 2 assembled, the oldest dropped
    assert fresh.state_dict()["draws"] == sel.state_dict()["draws"] == 2


def test_config_errors():
    for kw, key in (({"min_std": -1}, "min_std"), ({"sample_ratio": 0}, "sample_ratio"), ({"alpha": 1.5}, "alpha"),
                    ({"max_queue": -1}, "max_queue")):
        with pytest.raises(ConfigError, match=key):
            from_config(ReSTGRPO, **kw)


# --------------------------------------------------------------------------- slow references
@pytest.mark.parametrize("seed", range(5))
def test_filter_matches_loop_reference(seed):
    b = random_batch(seed, discrete_rewards=seed % 2 == 0)
    keep = ReSTGRPO(min_std=0.3)(b)
    for i in range(b.batch_size):
        vals = [float(b.rewards[j]) for j in range(b.batch_size) if b.group_ids[j] == b.group_ids[i]]
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
        assert bool(keep[i]) == (std >= 0.3 - 1e-12)


def test_prefix_sampler_frequencies_match_law():
    # 4000 draws of m = 5 prefixes (L = 10, rho = 0.5): empirical P(k) within 0.01 of alpha^(k-1)/Z
    sel = ReSTGRPO(alpha=0.8)
    sol = "".join(f"l{i}\n" for i in range(10))
    counts = torch.zeros(10)
    for _ in range(4000):
        for p in sel.sample_prefixes(sol):
            counts[p.count("\n") - 1] += 1
    ref = [0.8 ** (k - 1) for k in range(1, 11)]
    ref = torch.tensor([r / sum(ref) for r in ref])
    assert (counts / counts.sum() - ref).abs().max() < 0.01


def test_gradient_reaches_only_kept_groups():
    # The selector's output is a mask: a GRPO-style loss sum_i keep_i * A_i * lp_i has gradient keep_i * A_i.
    b = make_batch([1, 1, 0, 1, 0.5, 0.5], [0, 0, 1, 1, 2, 2])
    keep = ReSTGRPO()(b).double()
    adv = torch.tensor([0.0, 0.0, -1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    lp = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    (keep * adv * lp).sum().backward()
    assert lp.grad.tolist() == [0.0, 0.0, -1.0, 1.0, 0.0, 0.0]
    assert keep.tolist() == [0, 0, 1, 1, 0, 0]
