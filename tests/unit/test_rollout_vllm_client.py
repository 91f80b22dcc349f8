"""The vLLM backend's parts that need no vLLM: options, the server client and its process handling (against
tests/vllm_engine/fake_server.py, a stand-in that answers the OpenAI completions API with token ids and log-probs), the
result builder's checks, and the weights an engine receives (LoRA merged out of place)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lmpo.config import load_config
from lmpo.errors import ConfigError
from lmpo.models import build_tiny_model, build_tiny_tokenizer
from lmpo.rollout.base import SamplingParams
from lmpo.rollout.vllm import (EngineError, VLLMGenerator, VLLMOptions, _free_port, build_output, vllm_available,
                               vllm_options)
from lmpo.rollout.weights import engine_weights

FAKE = str(Path(__file__).parents[1] / "vllm_engine" / "fake_server.py")


def fake(mode: str = "ok", **kw) -> VLLMOptions:
    return VLLMOptions(mode="server", command=[sys.executable, FAKE, "--port", "{port}", "--mode", mode],
                       startup_timeout_s=kw.pop("startup_timeout_s", 30), **kw)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped) is not alive
        return f.read().split(")")[-1].split()[0] != "Z"


def test_options_errors_name_the_key():
    with pytest.raises(ConfigError, match="rollout.vllm.mode"):
        vllm_options({"mode": "remote"})
    with pytest.raises(ConfigError, match='rollout.vllm.prot".*port'):
        vllm_options({"prot": 8000})
    with pytest.raises(ConfigError, match="rollout.vllm.sync=rpc needs"):
        vllm_options({"mode": "server", "sync": "rpc"})
    with pytest.raises(ConfigError, match="rollout.vllm.url"):
        vllm_options({"url": "localhost:8000"})


@pytest.mark.skipif(vllm_available(), reason="vLLM is installed here")
def test_backend_vllm_without_vllm_says_how_to_install():
    with pytest.raises(ConfigError, match="make setup-vllm.*rollout.backend"):
        load_config(None, ["rollout.backend=vllm"])


def test_backend_vllm_refuses_modes_of_lmpos_own_loop():
    with pytest.raises(ConfigError, match="rollout.mode=reference.*rollout.backend=hf"):
        load_config(None, ["rollout.backend=vllm", "rollout.mode=reference"])
    with pytest.raises(ConfigError, match="rollout.vllm.mode"):
        load_config(None, ["rollout.backend=vllm", "rollout.vllm.mode=remote"])


def test_server_client_tokens_logprobs_truncation_and_sync(tok):
    model = build_tiny_model(seed=0)
    gen = VLLMGenerator(model, tok, fake())
    try:
        prompts = ["1+1=", "12+34=", "7"]
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        out = gen.generate(prompts, SamplingParams(temperature=0.7, max_new_tokens=5), max_new_tokens=[5, 3, 5])
        eos = set(gen.eos_ids)
        for row, p in enumerate(ids):
            want = []
            for k in range(1, [5, 3, 5][row] + 1):
                want.append((p[-1] + k) % 50)
                if want[-1] in eos:
                    break
            n = len(want)
            assert out.response_ids[row, :n].tolist() == want
            assert out.response_attn[row].sum() == n
            assert torch.allclose(out.sampler_logprobs[row, :n], torch.tensor([-0.1 * k for k in range(1, n + 1)]))
            assert (out.sampler_logprobs[row, n:] == 0).all()
            assert bool(out.truncated[row]) == (want[-1] not in eos)
            assert out.prompt_ids[row, -len(p):].tolist() == p and out.prompt_mask[row].sum() == len(p)
        gen.sync_weights()
        assert gen.sync_method == "reload" and gen.last_sync_s is not None
        assert (gen.folder / "lmpo-update.safetensors").is_file()
        again = gen.generate(prompts[:1], SamplingParams(temperature=0, max_new_tokens=1))
        assert again.response_ids[0, 0].item() == (ids[0][-1] + 2) % 50  # the fake shifts its tokens per sync
        pid = gen._engine.proc.pid
    finally:
        gen.close()
    assert not alive(pid)
    assert not gen.folder.parent.exists()  # the temporary model folder is removed


@pytest.mark.parametrize("mode, match", [("malformed", "token_id"), ("no-logprobs", "without token log-probs")])
def test_server_malformed_output_is_a_clear_error(tok, mode, match):
    with VLLMGenerator(build_tiny_model(seed=0), tok, fake(mode)) as gen:
        with pytest.raises(EngineError, match=match):
            gen.generate(["1+1="], SamplingParams(max_new_tokens=3))


def test_server_that_fails_to_start_reports_its_log(tok):
    gen = VLLMGenerator(build_tiny_model(seed=0), tok, fake("fail-start"))
    with pytest.raises(EngineError, match="(?s)exited with code 1 before it was ready.*not supported"):
        gen.generate(["1+1="], SamplingParams(max_new_tokens=3))
    gen.close()


def test_server_port_taken(tok):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with VLLMGenerator(build_tiny_model(seed=0), tok, fake(port=port)) as gen:
            with pytest.raises(EngineError, match=f"port={port} is already in use"):
                gen.generate(["1+1="], SamplingParams(max_new_tokens=3))


def test_server_dying_mid_run_says_resume(tok):
    with VLLMGenerator(build_tiny_model(seed=0), tok, fake("die-after-1")) as gen:
        gen.generate(["1+1="], SamplingParams(max_new_tokens=3))
        with pytest.raises(EngineError, match="--resume"):
            gen.generate(["1+1="], SamplingParams(max_new_tokens=3))


def test_server_by_url(tok):
    port = _free_port("127.0.0.1")
    proc = subprocess.Popen([sys.executable, FAKE, "--port", str(port)])
    try:
        with VLLMGenerator(build_tiny_model(seed=0), tok, VLLMOptions(mode="server", url=f"http://127.0.0.1:{port}",
                                                                       startup_timeout_s=30)) as gen:
            out = gen.generate(["7"], SamplingParams(temperature=0, max_new_tokens=2))
            assert out.response_attn.sum() >= 1 and gen._engine.model_name == "fake-model"
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("how", ["exit", "sigint", "sigkill"])
def test_no_orphaned_server_when_lmpo_exits(tmp_path, how):
    """The server dies with lmpo: a normal exit (atexit), Ctrl-C (KeyboardInterrupt unwinding) and SIGKILL of lmpo
    itself (PR_SET_PDEATHSIG)."""
    script = tmp_path / "run.py"
    pidfile = tmp_path / "pid"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from lmpo.models import build_tiny_model, build_tiny_tokenizer
        from lmpo.rollout.base import SamplingParams
        from lmpo.rollout.vllm import VLLMGenerator, VLLMOptions
        o = VLLMOptions(mode="server", command=[sys.executable, {FAKE!r}, "--port", "{{port}}"], startup_timeout_s=30)
        gen = VLLMGenerator(build_tiny_model(seed=0), build_tiny_tokenizer(), o)
        gen.generate(["7"], SamplingParams(max_new_tokens=2))
        open({str(pidfile)!r}, "w").write(str(gen._engine.proc.pid))
        if {how!r} != "exit":
            time.sleep(120)
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2] / "src"), os.environ.get(
        "PYTHONPATH", "")]))
    # SIGINT back to its default first: a pytest-xdist worker ignores it, and a child inherits an ignored signal (Python
    # then installs no KeyboardInterrupt handler)
    proc = subprocess.Popen([sys.executable, str(script)], env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not pidfile.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert pidfile.exists(), "the script did not start its server"
    time.sleep(0.2)
    server = int(pidfile.read_text())
    if how == "sigint":
        proc.send_signal(signal.SIGINT)
    elif how == "sigkill":
        proc.kill()
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while alive(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(server)


def test_build_output_rejects_malformed_rows(tok):
    with pytest.raises(EngineError, match="2 tokens but 1 log-probs"):
        build_output([[5]], [([1, 2], [-0.1], False)], 0, tok)
    with pytest.raises(EngineError, match="invalid log-probs"):
        build_output([[5]], [([1], [float("nan")], False)], 0, tok)
    with pytest.raises(EngineError, match="2 completions for 1 prompts"):
        build_output([[5]], [([1], [-0.1], False)] * 2, 0, tok)


def test_engine_weights_merge_lora_out_of_place():
    from lmpo.models.load import apply_lora

    base = build_tiny_model(seed=0)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_lora(base, r=4, alpha=8)
    layer = next(m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A"))
    name = next(n for n, m in model.get_base_model().named_modules() if m is layer)
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(0.5)
        layer.lora_A["default"].weight.fill_(0.25)
    w = engine_weights(model, only_trainable=False)
    assert not any("lora_" in k or "base_layer" in k for k in w)
    r, alpha = 4, 8
    expected = before[f"{name}.weight"] + (alpha / r) * (torch.full((layer.out_features, r), 0.5)
                                                        @ torch.full((r, layer.in_features), 0.25))
    assert torch.allclose(w[f"{name}.weight"], expected)
    assert torch.equal(layer.base_layer.weight, before[f"{name}.weight"])  # the peft model is left unmerged
    changed = engine_weights(model, only_trainable=True)
    assert set(changed) == {k for k in w if k.endswith("proj.weight")}  # a LoRA step changes adapted layers only


def test_cpu_engine_runs_without_chunked_prefill(monkeypatch):
    """Per-request seeds + chunked prefill make vLLM rewind a CPU generator ("CPU Generator does not use offset",
    the 128-row failure): on the CPU the engine is asked for whole-prompt prefills; a GPU keeps vLLM's defaults."""
    from lmpo.rollout.vllm import cpu_scheduler_args

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cpu_scheduler_args(VLLMOptions(max_model_len=512)) == {"enable_chunked_prefill": False,
                                                                   "max_num_batched_tokens": 4096}
    assert cpu_scheduler_args(VLLMOptions(max_model_len=8192))["max_num_batched_tokens"] == 8192  # >= max_model_len
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_scheduler_args(VLLMOptions()) == {}
