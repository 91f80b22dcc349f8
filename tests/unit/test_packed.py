"""The packed prompt-once forward (lmpo.engine.packed) against Hugging Face's forward: values, gradients, what it
keeps for backward, and when it steps aside."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from lmpo.engine import packed
from lmpo.models.load import apply_lora
from lmpo.models.logprobs import response_logprobs, split_body_and_head
from lmpo.models.tiny import build_tiny_model
from lmpo.engine.tuning import trim_heap


def _batch(vocab: int, U=2, P=5, G=3, T=7, seed=0):
    """U prompts (the last left-padded) x G rows each, right-padded responses of different lengths."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(2, vocab, (U, P), generator=g)
    pm = torch.ones(U, P, dtype=torch.bool)
    pm[-1, :2] = False
    prompts[-1, :2] = 0
    resp = torch.randint(2, vocab, (U * G, T), generator=g)
    ra = torch.ones(U * G, T, dtype=torch.bool)
    ra[0, 4:] = False
    ra[-1, 6:] = False
    return prompts.repeat_interleave(G, 0), pm.repeat_interleave(G, 0), resp, ra


def _run(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    lp, ent = response_logprobs(model, *batch, with_entropy=True, **kw)
    (lp.sum() + 0.3 * (lp**2).sum() + 0.1 * ent.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return lp.detach(), ent.detach(), grads


def _assert_same(a, b, tol=2e-5):
    lp_a, ent_a, g_a = a
    lp_b, ent_b, g_b = b
    torch.testing.assert_close(lp_a, lp_b, atol=tol, rtol=0)
    torch.testing.assert_close(ent_a, ent_b, atol=tol, rtol=0)
    assert set(g_a) == set(g_b)
    for name in g_a:
        scale = g_a[name].abs().max().item() + 1e-12
        assert (g_a[name] - g_b[name]).abs().max().item() <= 1e-4 * scale, name


def _tiny_qwen2(seed=0) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(vocab_size=24, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("recompute", ["none", "attention", "layers"])
def test_matches_hugging_face_forward_values_and_gradients(tied, share, recompute):
    model = build_tiny_model(seed=1, vocab_size=24, tie_embeddings=tied, init_std=0.3)
    batch = _batch(24)
    assert packed.packed_unsupported(split_body_and_head(model)[0], 12) == ""
    plain = _run(model, batch, packed=False, share_prompt=share)
    fast = _run(model, batch, packed=True, share_prompt=share, recompute=recompute)
    _assert_same(plain, fast)


def _max_rel_grad_error(a, b) -> float:
    return max(((a[2][n] - b[2][n]).abs().max() / (b[2][n].abs().max() + 1e-12)).item() for n in b[2])


@pytest.mark.parametrize("arch", ["llama-tied", "llama", "qwen2"])
@pytest.mark.parametrize("recompute", ["none", "layers"])
def test_bf16_autocast_matches_hugging_face_autocast(arch, recompute, monkeypatch):
    # under CPU bf16 autocast the packed layers cast as autocast does (bf16 products, norms and rotary embedding
    # in float32): the forward equals Hugging Face's under autocast, and the gradients are as close to float32's
    # as Hugging Face's bf16 gradients are (they differ from them only in bf16 rounding of different partial sums)
    model = _tiny_qwen2() if arch == "qwen2" else build_tiny_model(seed=1, vocab_size=24, init_std=0.3,
                                                                    tie_embeddings=arch == "llama-tied")
    batch = _batch(24, seed=4)
    calls = []
    real = packed.packed_hidden
    monkeypatch.setattr("lmpo.models.logprobs.packed_hidden", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    fp32 = _run(model, batch, packed=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hf = _run(model, batch, packed=False)
        assert not calls
        fast = _run(model, batch, packed=True, recompute=recompute)
    assert calls  # the packed path ran under autocast
    torch.testing.assert_close(fast[0], hf[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(fast[1], hf[1], atol=1e-4, rtol=0)
    assert (fast[0] - fp32[0]).abs().max() > 1e-4  # bf16 products really ran
    assert set(fast[2]) == set(hf[2]) and all(g.dtype == torch.float32 for g in fast[2].values())
    assert _max_rel_grad_error(fast, fp32) <= 1.5 * _max_rel_grad_error(hf, fp32) + 1e-3
    assert _max_rel_grad_error(fast, hf) <= 0.05


def test_qwen2_with_projection_biases_matches():
    model = _tiny_qwen2()
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    batch = _batch(24, seed=3)
    _assert_same(_run(model, batch, packed=False), _run(model, batch, packed=True))


def test_no_grad_values_equal_and_single_prompt_rows():
    model = build_tiny_model(seed=2, vocab_size=24, init_std=0.3)
    prompt, pm, resp, ra = _batch(24, U=1, G=4, T=9)
    with torch.no_grad():
        a, _ = response_logprobs(model, prompt, pm, resp, ra, packed=False)
        b, _ = response_logprobs(model, prompt, pm, resp, ra, packed=True)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    assert torch.isfinite(b).all() and (b[~ra] == 0).all()


def _saved_bytes(model, batch, **kw) -> int:
    """Bytes of the distinct tensors autograd keeps for backward during the forward (views of one storage once)."""
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, _ = response_logprobs(model, *batch, **kw)
    lp.sum().backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params)


def test_keeps_about_half_the_activations_and_recompute_keeps_less():
    """The card's property for this lever: per position and layer the fused nodes keep ~10 hidden-sized tensors
    where Hugging Face's layer keeps ~20; recomputing attention or whole layers keeps less again."""
    model = build_tiny_model(seed=0, vocab_size=24, hidden_size=64, num_layers=3)
    batch = _batch(24, U=2, P=6, G=4, T=24)
    hf = _saved_bytes(model, batch, packed=False)
    none = _saved_bytes(model, batch, packed=True)
    attention = _saved_bytes(model, batch, packed=True, recompute="attention")
    layers = _saved_bytes(model, batch, packed=True, recompute="layers")
    assert none <= 0.65 * hf, (none, hf)
    assert layers < attention < none


def _uses(loss: torch.Tensor) -> dict[int, int]:
    """How many graph edges lead into each weight's gradient accumulator (one per use of the weight)."""
    counts: dict[int, int] = {}
    seen, stack = set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        for nxt, _ in fn.next_functions:
            if nxt is not None and type(nxt).__name__ == "AccumulateGrad":
                counts[id(nxt.variable)] = counts.get(id(nxt.variable), 0) + 1
            stack.append(nxt)
    return counts


def test_every_layer_weight_has_one_use_so_its_gradient_completes_with_its_layer():
    """The shared-prompt Hugging Face path uses every layer weight twice (prompt pass, rows pass), so no layer's
    gradient is complete before the prompt's backward at the very end; packed positions use each once."""
    model = build_tiny_model(seed=0, vocab_size=24)
    batch = _batch(24)
    layer_weights = [p for layer in model.model.layers for p in layer.parameters()]
    hf = _uses(response_logprobs(model, *batch, packed=False)[0].sum())
    fast = _uses(response_logprobs(model, *batch, packed=True)[0].sum())
    assert all(hf[id(p)] == 2 for p in layer_weights)
    assert all(fast[id(p)] == 1 for p in layer_weights)


def test_unsupported_models_fall_back_to_hugging_face(monkeypatch):
    calls = []
    real = packed.packed_hidden
    monkeypatch.setattr("lmpo.models.logprobs.packed_hidden", lambda *a, **k: calls.append(1) or real(*a, **k))
    batch = _batch(24)
    model = build_tiny_model(seed=0, vocab_size=24)
    response_logprobs(model, *batch)
    assert calls == [1]
    body = split_body_and_head(model)[0]

    lora = apply_lora(build_tiny_model(seed=0, vocab_size=24), r=2, alpha=4, dropout=0.0,
                      target_modules=["q_proj", "v_proj"])
    assert "not nn.Linear" in packed.packed_unsupported(split_body_and_head(lora)[0], 12)
    a = response_logprobs(lora, *batch)[0]
    assert calls == [1]  # the adapters' forward, not the packed one
    torch.testing.assert_close(a, response_logprobs(lora, *batch, packed=False)[0])

    for module in (body, body.layers[1].mlp, body.layers[0].self_attn.q_proj):
        handle = module.register_forward_hook(lambda *a: None)
        assert "forward hooks" in packed.packed_unsupported(body, 12)
        handle.remove()
    # the modules the packed pass calls itself keep their hooks (Hugging Face's checkpointing puts one on the
    # input embedding)
    handle = body.embed_tokens.register_forward_hook(lambda *a: None)
    assert packed.packed_unsupported(body, 12) == ""
    handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert packed.packed_unsupported(body, 12) == ""  # bf16 autocast is covered (test_bf16_autocast_*)
    with torch.autocast("cpu", dtype=torch.float16):
        assert "autocast to torch.float16" in packed.packed_unsupported(body, 12)
    gelu = build_tiny_model(seed=0, vocab_size=24)
    gelu.config.hidden_act = "gelu"
    assert "activation" in packed.packed_unsupported(gelu.model, 12)
    half = build_tiny_model(seed=0, vocab_size=24).to(torch.bfloat16)
    assert "float32" in packed.packed_unsupported(half.model, 12)
    windowed = build_tiny_model(seed=0, vocab_size=24)
    windowed.config.sliding_window = 8
    assert "sliding window" in packed.packed_unsupported(windowed.model, 12)
    assert packed.packed_unsupported(windowed.model, 8) == ""


def test_recompute_value_checked():
    model = build_tiny_model(seed=0, vocab_size=24)
    with pytest.raises(ValueError, match="recompute must be one of"):
        response_logprobs(model, *_batch(24), recompute="mlp")


def test_trim_heap_runs_and_trims_in_backward(monkeypatch):
    assert isinstance(trim_heap(), bool)
    calls = []
    monkeypatch.setattr(packed, "trim_heap", lambda: calls.append(1) or True)
    model = build_tiny_model(seed=0, vocab_size=24, num_layers=6)
    lp, _ = response_logprobs(model, *_batch(24))
    assert len(calls) == 1  # once at the end of the forward
    lp.sum().backward()
    assert len(calls) == 1 + len(range(0, 6, packed.TRIM_EVERY))  # and every TRIM_EVERY layers in backward
    with torch.no_grad():
        response_logprobs(model, *_batch(24))
    assert len(calls) == 1 + len(range(0, 6, packed.TRIM_EVERY))  # never without autograd


def test_default_model_is_supported():
    from lmpo.errors import ModelError
    from lmpo.models.load import _default_gguf_path, load_model

    try:
        _default_gguf_path()
    except ModelError:
        pytest.skip("the default model is not installed")
    model, _ = load_model("default")
    assert packed.packed_unsupported(split_body_and_head(model)[0], 1024) == ""
    assert isinstance(model.model.layers[0].mlp.gate_proj, nn.Linear)


def test_config_keys_validated():
    from lmpo.config import load_config
    from lmpo.errors import ConfigError

    cfg = load_config(overrides=[])
    assert cfg.model.packed_forward == "auto" and cfg.model.gradient_checkpointing == "attention"
    assert load_config(overrides=["model.gradient_checkpointing=attention"]).model.gradient_checkpointing == "attention"
    with pytest.raises(ConfigError, match="model.gradient_checkpointing must be true, false or attention"):
        load_config(overrides=["model.gradient_checkpointing=mlp"])
    with pytest.raises(ConfigError, match="model.packed_forward must be auto, true or false"):
        load_config(overrides=["model.packed_forward=sometimes"])
    # perf=reference turns every knob left at auto to its reference path; an explicit knob wins
    ref = load_config(overrides=["perf=reference"])
    assert (ref.model.packed_forward, ref.rollout.decode_kernel, ref.rollout.lean_decode, ref.rollout.sampler,
            ref.train.optimizer_in_backward, ref.rollout.prepack) == (False, False, False, "multinomial", False, False)
    mixed = load_config(overrides=["perf=reference", "model.packed_forward=true", "rollout.sampler=inverse_cdf"])
    assert mixed.model.packed_forward is True and mixed.rollout.sampler == "inverse_cdf"
    assert mixed.rollout.lean_decode is False
    fast = load_config(overrides=["perf=fast"])
    assert (fast.model.packed_forward, fast.rollout.lean_decode, fast.rollout.sampler) == ("auto", "auto", "auto")
    with pytest.raises(ConfigError, match="perf must be fast or reference"):
        load_config(overrides=["perf=quick"])


def test_trainer_same_with_and_without_the_packed_forward(tmp_path):
    """Two steps of the tiny task through the packed forward and through Hugging Face's: same rewards (the same
    samples), losses and gradient norms up to float rounding."""
    from lmpo.config import load_config
    from lmpo.train.loop import train

    common = ["train.steps=2", "eval.num_prompts=0", "eval.at_start=false", "eval.every=0", "output.checkpoint_every=0",
              "output.plot=false", "output.progress=false", f"output.dir={tmp_path}", "rollout.prompts_per_step=4",
              "rollout.num_generations=4"]
    runs = [train(load_config("configs/tiny.yaml", [*common, f"model.packed_forward={v}", f"output.run_name=packed_{v}"]))
            .history for v in ("true", "false")]
    for a, b in zip(*runs):
        assert a["reward/mean"] == b["reward/mean"]
        assert a["loss/total"] == pytest.approx(b["loss/total"], rel=1e-4, abs=1e-6)
        assert a["loss/grad_norm"] == pytest.approx(b["loss/grad_norm"], rel=1e-4)


def test_hugging_face_checkpointing_keeps_the_packed_forward_and_recomputes_layers(monkeypatch):
    """``model.gradient_checkpointing=true`` turns Hugging Face's checkpointing on (for the fallback path); the packed
    forward still applies and recomputes whole layers itself."""
    from lmpo.models.load import enable_activation_checkpointing

    model = build_tiny_model(seed=0, vocab_size=24)
    enable_activation_checkpointing(model)
    assert packed.packed_unsupported(split_body_and_head(model)[0], 12) == ""
    seen = []
    real = packed.packed_hidden
    monkeypatch.setattr("lmpo.models.logprobs.packed_hidden",
                        lambda *a, **k: seen.append(k["recompute"]) or real(*a, **k))
    response_logprobs(model, *_batch(24))[0].sum().backward()
    assert seen == ["layers"]


def test_runner_says_when_its_passes_are_packed():
    # the trainer folds the optimizer into backward when every weight has one use per pass: the runner answers
    # under its own autocast setting, through the same check the passes make
    from lmpo.train.step import PolicyRunner
    model = build_tiny_model(seed=0, vocab_size=24)
    assert PolicyRunner(model).packed_applies()
    assert PolicyRunner(model, autocast="bfloat16").packed_applies()
    assert not PolicyRunner(model, autocast="float16").packed_applies()
    assert not PolicyRunner(model, packed=False).packed_applies()
    assert not PolicyRunner(apply_lora(build_tiny_model(seed=0, vocab_size=24), r=2, alpha=4)).packed_applies()
