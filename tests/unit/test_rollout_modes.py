"""rollout.mode: config validation and the reference-answer generator (one-token rollouts)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lmpo.config import load_config
from lmpo.errors import ConfigError
from lmpo.models import build_tiny_model, response_logprobs
from lmpo.models.tiny import build_tiny_tokenizer
from lmpo.rollout.base import SamplingParams
from lmpo.rollout.modes import build_train_generator


def test_config_names_bad_mode_and_key():
    with pytest.raises(ConfigError, match="rollout.mode must be one of"):
        load_config(None, ["rollout.mode=soft_thinkin"])
    with pytest.raises(ConfigError, match="rollout.mode_params.num_candidate"):
        load_config(None, ["rollout.mode=reference", "rollout.mode_params={num_candidate: 4}"])
    with pytest.raises(ConfigError, match="num_candidates must be >= 1"):
        load_config(None, ["rollout.mode=reference", "rollout.mode_params={num_candidates: 0}"])
    assert build_train_generator("sample", {}, None, None) is None


def test_reference_generator_teacher_forces_answers_and_samples_candidates():
    model, tok = build_tiny_model(seed=0), build_tiny_tokenizer()
    gen = build_train_generator("reference", {"num_candidates": 4000, "temperature": 2.0}, model, tok)
    rows = [{"prompt": "12=", "answer": "12"}, {"prompt": "7=", "answer": "7"}]
    torch.manual_seed(0)
    out = gen.generate(["12=", "7="], SamplingParams(max_new_tokens=8), rows=rows)
    ids = [[tok.convert_tokens_to_ids(c) for c in s] for s in ("12", "7")]
    assert out.response_ids[0].tolist() == ids[0] + [1] and out.response_ids[1].tolist() == ids[1] + [1, 0]
    assert out.response_attn.tolist() == [[True] * 3, [True, True, False]]
    assert out.completions == ["12", "7"] and not out.truncated.any()
    cand = out.extras["candidate_ids"]
    assert cand.shape == (2, 3, 4000)
    # sampler_logprobs = log softmax(z / 2)[y*]; the empirical frequency of y* among the samples matches it.
    ref, _ = response_logprobs(model, out.prompt_ids, out.prompt_mask, out.response_ids, out.response_attn,
                               temperature=2.0)
    assert_close(out.sampler_logprobs, ref, atol=1e-5, rtol=1e-5)
    freq = (cand == out.response_ids[..., None]).float().mean(-1)
    assert_close(freq[out.response_attn], ref.exp()[out.response_attn], atol=0.03, rtol=0)


def test_soft_thinking_rollout_is_reproduced_by_the_trainer_pass():
    # The trainer's pass with the recorded soft inputs must recompute the sampler's Gumbel log-likelihood of the
    # stored z at soft steps and the sampled tokens' log-probs elsewhere.
    from lmpo.methods.loss.soft_grpo import soft_step_loglik
    from lmpo.models.token_stats import response_stats

    model, tok = build_tiny_model(seed=0, init_std=0.1), build_tiny_tokenizer()
    gen = build_train_generator("soft_thinking", {"think_end": None, "think_tokens": 2, "top_k": 4}, model, tok)
    torch.manual_seed(1)
    out = gen.generate(["12=", "3=", "45="], SamplingParams(max_new_tokens=5))
    ex = out.extras
    soft = ex["soft_mask"]
    assert soft[:, :2].all() and not soft[:, 2:].any()
    assert_close(ex["soft_weights"][soft].sum(-1), torch.ones(int(soft.sum())))
    lp, _, st = response_stats(model, out.prompt_ids, out.prompt_mask, out.response_ids, out.response_attn, ex,
                               stats=frozenset({"candidate_logprobs"}))
    ell = soft_step_loglik(st["candidate_logprobs"], ex["soft_logits"], ex["soft_valid"], -1.5, 3.0)
    want = torch.where(soft, ell, lp) * out.response_attn
    assert_close(out.sampler_logprobs, want, atol=1e-4, rtol=1e-4)
    # completions hold only the discrete (answer) tokens
    assert all(len(c) <= 3 for c in out.completions)
