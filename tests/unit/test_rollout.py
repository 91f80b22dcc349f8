"""HFGenerator: shapes, EOS/truncation, greedy vs naive decoding, sampler log-probs vs the trainer's, seeding."""

from __future__ import annotations

import contextlib

import pytest
import torch

from lmpo.errors import ConfigError
from lmpo.models import build_tiny_model, build_tiny_tokenizer, position_ids_from_mask, response_logprobs
from lmpo.engine.kernels import rowdot
from lmpo.rollout import Generator, HFGenerator, SamplingParams, filter_logits

PROMPTS = ["1+1=", "12+34=", "7", "99+1="]
EOS = 1


@pytest.fixture()
def model():
    return build_tiny_model(seed=0)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def full_logits(model, out):
    """Naive, cache-free logits (N, T, V) predicting each response token."""
    ids = torch.cat([out.prompt_ids, out.response_ids], 1)
    mask = torch.cat([out.prompt_mask, out.response_attn], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids_from_mask(mask)).logits
    P = out.prompt_ids.shape[1]
    return logits[:, P - 1 : -1].float()


def force_eos(model, steps: list[int | None]):
    """Make row i emit EOS with certainty at decoding step steps[i] (None = never) via a hook on the LM head."""
    calls = {"n": 0}

    def hook(module, args, logits):
        step, bias = calls["n"], torch.zeros_like(logits)
        calls["n"] += 1
        for row, at in enumerate(steps):
            if at is not None:
                bias[row, EOS] = 100.0 if step == at else -100.0
        return logits + bias

    return model.lm_head.register_forward_hook(hook)


def test_shapes_and_dtypes(model, tok):
    out = HFGenerator(model, tok).generate(PROMPTS, SamplingParams(max_new_tokens=5))
    N, P = out.prompt_ids.shape
    assert N == 4 and P == 6
    assert out.prompt_mask.dtype == torch.bool and out.response_attn.dtype == torch.bool
    assert out.response_ids.dtype == torch.long and out.sampler_logprobs.dtype == torch.float32
    assert out.response_ids.shape == out.response_attn.shape == out.sampler_logprobs.shape
    assert out.response_ids.shape[1] <= 5 and out.truncated.shape == (4,)
    assert out.prompt_mask.sum(1).tolist() == [4, 6, 1, 5]  # left padding
    assert not out.prompt_mask[2, :-1].any() and out.prompt_ids[2, -1].item() == tok.convert_tokens_to_ids("7")
    assert out.num_generated_tokens == int(out.response_attn.sum()) and len(out.completions) == 4
    assert isinstance(HFGenerator(model, tok), Generator)


def test_eos_and_truncation(model, tok):
    torch.manual_seed(0)  # row 2 samples freely: unseeded, it drew EOS by chance now and then
    handle = force_eos(model, [1, 3, None, 0])
    try:
        out = HFGenerator(model, tok).generate(PROMPTS, SamplingParams(max_new_tokens=6))
    finally:
        handle.remove()
    assert out.response_ids.shape[1] == 6
    assert out.response_attn.sum(1).tolist() == [2, 4, 6, 1]  # up to and including EOS
    assert out.response_ids[0, 1] == EOS and out.response_ids[1, 3] == EOS and out.response_ids[3, 0] == EOS
    assert (out.response_ids[~out.response_attn] == tok.pad_token_id).all()
    assert (out.sampler_logprobs[~out.response_attn] == 0).all()
    assert out.truncated.tolist() == [False, False, True, False]
    assert EOS not in out.response_ids[2].tolist()
    assert out.sampler_logprobs[0, 1].item() == pytest.approx(0.0, abs=1e-6)  # EOS was certain
    decoded = tok.decode(out.response_ids[1, :3].tolist(), skip_special_tokens=True)
    assert out.completions[1] == decoded and "<eos>" not in out.completions[1]


def test_stops_early_when_all_rows_finish(model, tok):
    handle = force_eos(model, [2, 2, 2, 2])
    try:
        out = HFGenerator(model, tok).generate(PROMPTS, SamplingParams(max_new_tokens=50))
    finally:
        handle.remove()
    assert out.response_ids.shape[1] == 3 and not out.truncated.any()


def test_greedy_matches_naive_argmax(model, tok):
    params = SamplingParams(max_new_tokens=8, greedy=True)
    out = HFGenerator(model, tok).generate(PROMPTS, params)
    ids, mask = out.prompt_ids, out.prompt_mask
    for _ in range(8):  # re-run the whole sequence every step, no KV cache
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids_from_mask(mask)).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones(len(PROMPTS), 1, dtype=torch.bool)], 1)
    naive = ids[:, out.prompt_ids.shape[1] :]
    attn = out.response_attn
    assert torch.equal(out.response_ids[attn], naive[:, : attn.shape[1]][attn])
    assert torch.equal(HFGenerator(model, tok, batch_size=3).generate(PROMPTS, params).response_ids, out.response_ids)
    # Greedy log-probs are the tempered full-softmax ones.
    hot = HFGenerator(model, tok).generate(PROMPTS, SamplingParams(max_new_tokens=8, greedy=True, temperature=0.5))
    ref = torch.log_softmax(full_logits(model, hot) / 0.5, -1).gather(-1, hot.response_ids[..., None])[..., 0]
    torch.testing.assert_close(hot.sampler_logprobs, torch.where(hot.response_attn, ref, 0.0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_match_trainer(model, tok, temperature):
    torch.manual_seed(0)
    gen = HFGenerator(model, tok, batch_size=3)
    out = gen.generate(PROMPTS * 2, SamplingParams(max_new_tokens=10, temperature=temperature))
    with torch.no_grad():
        lp, _ = response_logprobs(
            model, out.prompt_ids, out.prompt_mask, out.response_ids, out.response_attn, temperature=temperature
        )
    torch.testing.assert_close(out.sampler_logprobs, lp, atol=1e-5, rtol=1e-5)


def test_top_k_logprobs_are_renormalised(model, tok):
    torch.manual_seed(0)
    out = HFGenerator(model, tok).generate(PROMPTS, SamplingParams(max_new_tokens=10, top_k=3))
    logits = full_logits(model, out)
    kth = logits.topk(3, -1).values[..., -1:]
    assert (logits.gather(-1, out.response_ids[..., None])[..., 0] >= kth[..., 0])[out.response_attn].all()
    restricted = torch.log_softmax(logits.masked_fill(logits < kth, float("-inf")), -1)
    ref = restricted.gather(-1, out.response_ids[..., None])[..., 0]
    torch.testing.assert_close(out.sampler_logprobs, torch.where(out.response_attn, ref, 0.0), atol=1e-5, rtol=1e-5)


def test_filter_logits_top_p_and_top_k():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda **kw: torch.isfinite(filter_logits(logits, **kw))[0].tolist()  # noqa: E731
    assert kept(top_p=0.45) == [True, False, False, False]
    assert kept(top_p=0.7) == [True, True, False, False]
    assert kept(top_p=0.9) == [True, True, True, False]
    assert kept(top_p=1.0) == [True] * 4
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_k=3, top_p=0.7) == [True, True, False, False]


def test_seeded_sampling_is_reproducible(model, tok):
    gen, params = HFGenerator(model, tok), SamplingParams(max_new_tokens=12, top_p=0.9)
    torch.manual_seed(123)
    a = gen.generate(PROMPTS, params)
    torch.manual_seed(123)
    b = gen.generate(PROMPTS, params)
    torch.manual_seed(124)
    c = gen.generate(PROMPTS, params)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.sampler_logprobs, b.sampler_logprobs)
    assert not torch.equal(a.response_ids, c.response_ids)


def test_restores_training_mode(model, tok):
    model.train()
    HFGenerator(model, tok).generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))
    assert model.training
    model.eval()
    HFGenerator(model, tok).generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))
    assert not model.training


def test_sampling_params_validation():
    for bad in ({"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -1}, {"max_new_tokens": 0}):
        with pytest.raises(ConfigError):
            SamplingParams(**bad)
    assert SamplingParams(temperature=0.0).is_greedy


def assert_same_samples_as_plain_path(model, tok, prompts, seed, **option):
    """Generate with ``option`` off then on from the same seed: the same tokens, log-probs equal up to rounding, and
    both equal to the cache-free logits of those tokens (temperature 0.8)."""
    params = SamplingParams(max_new_tokens=10, temperature=0.8)
    (name, value), outs = next(iter(option.items())), []
    for v in (not value, value):
        torch.manual_seed(seed)
        outs.append(HFGenerator(model, tok, **{name: v}).generate(prompts, params))
    a, b = outs
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_attn, b.response_attn)
    torch.testing.assert_close(b.sampler_logprobs, a.sampler_logprobs, rtol=1e-5, atol=1e-5)
    ref = torch.log_softmax(full_logits(model, b) / 0.8, -1).gather(-1, b.response_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(b.sampler_logprobs, torch.where(b.response_attn, ref, 0.0), rtol=1e-5, atol=1e-5)


def test_shared_prompt_prefill_samples_the_same(model, tok):
    # groups of repeated prompts (interleaved, ragged lengths): prefilling each distinct prompt once draws the same
    # tokens with the same log-probs as prefilling every row
    assert_same_samples_as_plain_path(model, tok, ["12+34=", "7", "12+34=", "99+1=", "7", "12+34="], 5,
                                      share_prompt=True)


needs_onednn = pytest.mark.skipif(not __import__("lmpo.engine.prepack", fromlist=["x"]).prepack_available(),
                                  reason="this torch build has no oneDNN packed-linear operators")


@needs_onednn
def test_prepacked_decode_samples_the_same_up_to_rounding(model, tok, monkeypatch):
    import lmpo.engine.decode as decode
    packs = []
    monkeypatch.setitem(decode.LINEARS, "prepack", lambda m, rows, real=decode.LINEARS["prepack"]: (
        packs.append(rows), real(m, rows))[1])
    assert_same_samples_as_plain_path(model, tok, ["12+34=", "7", "12+34=", "99+1="], 3, prepack=True)
    assert packs == [4]  # packed once, for the 4 rows, by the prepack=True generator only
    assert not any("forward" in m.__dict__ for m in model.modules())  # every module restored


@needs_onednn
def test_prepacked_linears_compute_the_linear_and_restore_on_error(model):
    from lmpo.engine.prepack import prepacked_linears
    lin = model.lm_head
    x = torch.randn(3, 1, lin.in_features)
    ref = lin(x)
    with pytest.raises(RuntimeError, match="inside"):
        with prepacked_linears(model, 3):
            assert "forward" in lin.__dict__
            torch.testing.assert_close(lin(x), ref, rtol=1e-5, atol=1e-5)
            raise RuntimeError("inside")
    assert "forward" not in lin.__dict__ and torch.equal(lin(x), ref)


def test_prepack_auto_only_for_large_float32_cpu_models(model, monkeypatch):
    from lmpo.engine.kernels import rowdot as prepack_threshold
    from lmpo.engine import prepack
    monkeypatch.setattr(prepack, "prepack_available", lambda: True)
    assert not prepack.should_prepack(model, "auto", None)  # a tiny model: nothing to stream
    assert prepack.should_prepack(model, True, None)
    assert not prepack.should_prepack(model, False, None)
    assert not prepack.should_prepack(model, True, "bfloat16")  # autocast products are not float32
    monkeypatch.setattr(prepack_threshold, "MIN_PARAMS", 1)
    assert prepack.should_prepack(model, "auto", None)
    assert not prepack.should_prepack(model.to(torch.float64), "auto", None)


needs_rowdot = pytest.mark.skipif(not __import__("lmpo.engine.kernels.rowdot", fromlist=["x"]).available(),
                                  reason="lmpo's rowdot kernel cannot be built here")


@needs_rowdot
def test_rowdot_decode_samples_the_same_up_to_rounding(model, tok, monkeypatch):
    from lmpo.engine.kernels import rowdot
    entered = []
    real = rowdot.rowdot_linears
    monkeypatch.setattr(rowdot, "rowdot_linears", lambda m, real=real: (entered.append(m), real(m))[1])
    assert_same_samples_as_plain_path(model, tok, ["12+34=", "7", "12+34=", "99+1="], 3, decode_kernel=True)
    assert entered == [model]  # decode steps of the decode_kernel=True generator only
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_decode_kernel_auto_is_off_for_tiny_models(model, tok, monkeypatch):
    from lmpo.engine.kernels import rowdot
    monkeypatch.setattr(rowdot, "rowdot_linears", lambda m: pytest.fail("tiny models keep the BLAS"))
    HFGenerator(model, tok).generate(PROMPTS, SamplingParams(max_new_tokens=3))


@pytest.mark.parametrize("native", [True, False], ids=["attention-kernel", "torch-attention"])
def test_lean_decode_samples_the_same_up_to_rounding(model, tok, monkeypatch, native):
    # ragged left-padded prompts, a group that shares its prompt prefill, GQA (4 query / 2 key-value heads)
    import lmpo.engine.lean as lean
    if native and not lean.rowdot.available():
        pytest.skip("the attention kernel cannot be built here")
    monkeypatch.setattr(lean.rowdot, "available", lambda: native)
    steps = []
    real = lean.LeanDecoder.step
    monkeypatch.setattr(lean.LeanDecoder, "step", lambda self, *a: (steps.append(1), real(self, *a))[1])
    assert_same_samples_as_plain_path(model, tok, ["12+34=", "7", "12+34=", "99+1=", "7"], 11, lean=True)
    assert len(steps) == 9  # every decode step after the prefill went through the lean path
    for share in (True, False):  # and row-by-row prefill
        torch.manual_seed(2)
        a = HFGenerator(model, tok, share_prompt=share, lean=False).generate(PROMPTS, SamplingParams(max_new_tokens=7))
        torch.manual_seed(2)
        b = HFGenerator(model, tok, share_prompt=share, lean=True).generate(PROMPTS, SamplingParams(max_new_tokens=7))
        assert torch.equal(a.response_ids, b.response_ids)
        torch.testing.assert_close(a.sampler_logprobs, b.sampler_logprobs, rtol=1e-5, atol=1e-5)


def test_lean_decode_under_bf16_autocast_matches_the_plain_step(model, tok, monkeypatch):
    # the projections and MLP are the same bf16 products; attention runs in float32 where Hugging Face's runs in
    # bf16, so log-probs agree to bf16 rounding and both agree with the cache-free forward under autocast
    import lmpo.engine.lean as lean
    steps = []
    real = lean.LeanDecoder.step
    monkeypatch.setattr(lean.LeanDecoder, "step", lambda self, *a: (steps.append(1), real(self, *a))[1])
    params = SamplingParams(max_new_tokens=8, temperature=0.8)
    outs = []
    for use_lean in (False, True):
        torch.manual_seed(6)
        outs.append(HFGenerator(model, tok, autocast="bfloat16", lean=use_lean).generate(PROMPTS, params))
    a, b = outs
    assert len(steps) == 7  # every decode step after the prefill went through the lean path
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.log_softmax(full_logits(model, b) / 0.8, -1).gather(-1, b.response_ids[..., None]).squeeze(-1)
    # bf16 rounding (on the default model Hugging Face's own bf16 decode step differs from its cache-free bf16
    # forward by 0.16 at most, 0.03 on average; the lean step by 0.17 and 0.028)
    err = (b.sampler_logprobs - ref)[b.response_attn].abs()
    assert err.max() < 0.15 and err.mean() < 0.03, (err.max(), err.mean())
    same = (a.response_ids == b.response_ids).all(1)  # rows agree until a bf16 rounding difference flips a draw
    assert same.sum() >= 2
    torch.testing.assert_close(b.sampler_logprobs[same], a.sampler_logprobs[same], rtol=0, atol=0.15)
    fp32 = torch.log_softmax(full_logits(model, b) / 0.8, -1).gather(-1, b.response_ids[..., None]).squeeze(-1)
    assert (b.sampler_logprobs - torch.where(b.response_attn, fp32, 0.0)).abs().max() > 0  # autocast was on


def test_lean_decode_with_eos_and_per_row_limits(model, tok):
    outs = []
    for lean in (False, True):
        torch.manual_seed(4)
        handle = force_eos(model, [1, None, 3, None])
        try:
            outs.append(HFGenerator(model, tok, lean=lean).generate(PROMPTS, SamplingParams(max_new_tokens=6),
                                                                     max_new_tokens=[6, 2, 6, 5]))
        finally:
            handle.remove()
    a, b = outs
    assert b.response_attn.sum(1).tolist() == [2, 2, 4, 5]
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.truncated, b.truncated)
    torch.testing.assert_close(a.sampler_logprobs, b.sampler_logprobs, rtol=1e-5, atol=1e-5)


def test_lean_decode_refuses_what_it_does_not_cover(model, tok):
    from lmpo.engine.lean import lean_unsupported
    body = model.model
    assert lean_unsupported(body, 100) == ""
    model.config.model_type = "gpt_neox"
    try:
        assert "architecture 'gpt_neox'" in lean_unsupported(body, 100)
        with pytest.raises(ConfigError, match="lean_decode is true .* architecture 'gpt_neox' .* auto or false"):
            HFGenerator(model, tok, lean=True).generate(PROMPTS, SamplingParams(max_new_tokens=3))
        out = HFGenerator(model, tok, lean="auto").generate(PROMPTS, SamplingParams(max_new_tokens=3))
        assert out.response_ids.shape[0] == 4  # auto keeps the Hugging Face step
    finally:
        model.config.model_type = "llama"
    model.config.sliding_window = 8
    try:
        assert "sliding window of 8" in lean_unsupported(body, 9) and lean_unsupported(body, 8) == ""
    finally:
        model.config.sliding_window = None


def test_lean_decode_auto_is_off_for_tiny_models(model, tok, monkeypatch):
    import lmpo.engine.lean as lean
    monkeypatch.setattr(lean.LeanDecoder, "__init__", lambda *a: pytest.fail("tiny models keep the HF step"))
    HFGenerator(model, tok).generate(PROMPTS, SamplingParams(max_new_tokens=3))


def test_inverse_cdf_draws_by_hand(monkeypatch):
    from lmpo.rollout.hf import sample_inverse_cdf
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5], [0.2, 0.2, 0.2, 0.4], [0.0, 0.0, 0.0, 2.0]])
    # cdf rows: [0, .5, .5, 1], [.2, .4, .6, 1], [0, 0, 0, 2]; the draw is the first index with cdf > u * total
    for u, expect in (([0.0, 0.0, 0.0], [1, 0, 3]), ([0.5, 0.39, 0.5], [3, 1, 3]), ([0.9999, 0.6, 0.9999], [3, 3, 3]),
                      ([0.25, 0.59, 0.1], [1, 2, 3])):
        monkeypatch.setattr(torch, "rand", lambda *shape, u=u, **kw: torch.tensor(u)[:, None])
        assert sample_inverse_cdf(probs).tolist() == expect  # zero-probability entries (flat stretches) never drawn


def test_inverse_cdf_frequencies_match_the_distribution():
    from lmpo.rollout.hf import sample_inverse_cdf
    torch.manual_seed(0)
    p = torch.tensor([0.05, 0.0, 0.15, 0.3, 0.5])
    n = 40_000
    draws = sample_inverse_cdf(p.expand(n, 5).contiguous())
    freq = torch.bincount(draws, minlength=5).double() / n
    assert freq[1] == 0
    assert ((freq - p.double()).abs() <= 4 * (p.double() * (1 - p.double()) / n).sqrt() + 1e-12).all()


def test_sampler_choice_and_logprobs(tok, monkeypatch):
    import lmpo.engine.decode as hf
    big = build_tiny_model(seed=0, vocab_size=hf.INVERSE_CDF_MIN_VOCAB)
    used = []
    real = hf.sample_inverse_cdf
    monkeypatch.setattr(hf, "sample_inverse_cdf", lambda p: (used.append(p.shape), real(p))[1])
    small = build_tiny_model(seed=0)
    HFGenerator(small, tok).generate(PROMPTS, SamplingParams(max_new_tokens=3))
    assert used == []  # auto: a 16-entry vocabulary keeps torch.multinomial
    torch.manual_seed(3)
    # decode_kernel=False: the torch draw (otherwise one native call draws, see test_native_draw_*)
    out = HFGenerator(big, tok, decode_kernel=False).generate(PROMPTS, SamplingParams(max_new_tokens=4, temperature=0.8))
    assert used and all(s == (4, hf.INVERSE_CDF_MIN_VOCAB) for s in used)
    ref = torch.log_softmax(full_logits(big, out) / 0.8, -1).gather(-1, out.response_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(out.sampler_logprobs, torch.where(out.response_attn, ref, 0.0), rtol=1e-5, atol=1e-5)
    used.clear()
    HFGenerator(small, tok, sampler="inverse_cdf", decode_kernel=False).generate(PROMPTS, SamplingParams(max_new_tokens=2))
    assert len(used) == 2
    with pytest.raises(ConfigError, match="rollout.sampler must be one of auto, multinomial, inverse_cdf"):
        HFGenerator(small, tok, sampler="gumbel")


@pytest.mark.skipif(not rowdot.available(), reason="native kernels unavailable")
@pytest.mark.parametrize("greedy", [False, True])
def test_native_draw_equals_the_torch_draw(tok, monkeypatch, greedy):
    import lmpo.rollout.hf as hf
    big = build_tiny_model(seed=0, vocab_size=hf.INVERSE_CDF_MIN_VOCAB)
    calls = []
    real = rowdot.sample_rows
    monkeypatch.setattr(rowdot, "sample_rows", lambda *a: (calls.append(a[0].shape), real(*a))[1])
    params = SamplingParams(max_new_tokens=6, temperature=0.8, greedy=greedy)
    outs = []
    for kernel in (False, "auto"):  # auto: the linears stay torch's (tiny model), only the draw changes
        torch.manual_seed(3)
        outs.append(HFGenerator(big, tok, decode_kernel=kernel).generate(PROMPTS * 4, params))
    assert len(calls) == 6 and calls[0] == (16, hf.INVERSE_CDF_MIN_VOCAB)  # the native draw ran on every step
    plain, native = outs
    assert torch.equal(plain.response_ids, native.response_ids)  # the same uniforms give the same tokens
    assert torch.equal(plain.response_attn, native.response_attn)
    torch.testing.assert_close(native.sampler_logprobs, plain.sampler_logprobs, rtol=1e-5, atol=1e-5)


def test_native_draw_is_skipped_for_filtered_sampling(tok, monkeypatch):
    import lmpo.rollout.hf as hf
    big = build_tiny_model(seed=0, vocab_size=hf.INVERSE_CDF_MIN_VOCAB)
    monkeypatch.setattr(rowdot, "sample_rows", lambda *a: pytest.fail("top-k / top-p keep the torch draw"))
    for params in (SamplingParams(max_new_tokens=2, top_k=5), SamplingParams(max_new_tokens=2, top_p=0.9)):
        HFGenerator(big, tok).generate(PROMPTS, params)
    HFGenerator(big, tok, sampler="multinomial").generate(PROMPTS, SamplingParams(max_new_tokens=2))


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_lean_decode_other_llama_family_architectures(tok, arch):
    # Qwen2 adds biases to the q/k/v projections; Mistral's sliding window is longer than these sequences
    import transformers
    cls = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM")}[arch]
    config = getattr(transformers, cls[0])(
        vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id, eos_token_id=EOS,
        bos_token_id=EOS, initializer_range=0.5, **({"sliding_window": 64} if arch == "mistral" else {}))
    torch.manual_seed(0)
    model = getattr(transformers, cls[1])(config).eval()
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
        with torch.no_grad():  # non-zero biases, so that they matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_()
    from lmpo.engine.lean import lean_unsupported
    assert lean_unsupported(model.model, 20) == ""
    assert_same_samples_as_plain_path(model, tok, ["12+34=", "7", "99+1="], 1, lean=True)


def test_frozen_weights_are_cast_once_per_generation_under_autocast(tok, monkeypatch):
    # a LoRA model's frozen base weights: autocast caches casts of trainable leaves only, so without help every
    # decode step would cast every base weight again; the generator lets autocast cache them for the generation
    import lmpo.rollout.hf as hf
    from lmpo.models.load import apply_lora
    model = apply_lora(build_tiny_model(seed=0), r=2, alpha=4, dropout=0.0)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen
    params = SamplingParams(max_new_tokens=6, temperature=0.8)

    def generate():
        torch.manual_seed(1)
        with torch.profiler.profile() as prof:
            out = HFGenerator(model, tok, autocast="bfloat16").generate(PROMPTS, params)
        casts = sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")
        return out, casts

    cached, cached_casts = generate()
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen  # restored
    monkeypatch.setattr(hf, "cached_frozen_casts", lambda model, active=True: contextlib.nullcontext())
    plain, plain_casts = generate()
    assert torch.equal(cached.response_ids, plain.response_ids)  # the same casts, so the same numbers
    assert torch.equal(cached.sampler_logprobs, plain.sampler_logprobs)
    # each frozen projection (and the LM head) was cast at each of the 6 steps, now once
    linears = sum(1 for n in frozen if "base_layer" in n or "lm_head" in n)
    assert plain_casts - cached_casts >= 4 * linears > 0, (plain_casts, cached_casts, linears)


def test_large_batches_under_autocast_keep_the_hugging_face_step(tok, monkeypatch):
    import lmpo.rollout.hf as hf
    import lmpo.engine.lean as lean
    from lmpo.models.load import apply_lora
    model = apply_lora(build_tiny_model(seed=0), r=2, alpha=4, dropout=0.0)
    monkeypatch.setattr(__import__("lmpo.engine.decode", fromlist=["x"]), "AUTOCAST_FEW_ROWS", 3)
    monkeypatch.setattr(lean.LeanDecoder, "__init__", lambda *a: pytest.fail("4 rows > 3: Hugging Face's step"))
    monkeypatch.setattr(hf, "cached_frozen_casts", lambda *a: pytest.fail("4 rows > 3: no kept casts"))
    HFGenerator(model, tok, autocast="bfloat16", lean=True).generate(PROMPTS, SamplingParams(max_new_tokens=3))


def test_frozen_flags_are_restored_when_generation_fails(tok, monkeypatch):
    from lmpo.models.load import apply_lora
    model = apply_lora(build_tiny_model(seed=0), r=2, alpha=4, dropout=0.0)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    seen = []

    def failing_head(*a):  # runs inside the batch, where the frozen weights are marked for autocast's cache
        seen.append(all(p.requires_grad for p in model.parameters()))
        raise ZeroDivisionError

    monkeypatch.setattr(__import__("lmpo.engine.decode", fromlist=["x"]), "head_logits", failing_head)
    with pytest.raises(ZeroDivisionError):
        HFGenerator(model, tok, autocast="bfloat16").generate(PROMPTS, SamplingParams(max_new_tokens=2))
    assert seen == [True]
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen
