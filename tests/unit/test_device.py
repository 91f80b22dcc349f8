"""``device: auto|cpu|cuda`` (lmpo.engine.device): the choice, what a CUDA run turns off, the native-kernel guard and
the host -> device transfers. No GPU is needed: CUDA is mocked (``torch.cuda.is_available``) and the ``meta``
device stands in for a second device where tensors must really move."""

from __future__ import annotations

import pytest
import torch

from lmpo.config import load_config
from lmpo.engine import device as dev
from lmpo.engine.decode import plan_decode
from lmpo.engine.kernels import rowdot
from lmpo.errors import ConfigError
from lmpo.models.load import load_model
from lmpo.models.logprobs import split_body_and_head
from lmpo.rollout.base import SamplingParams
from factories import tagged_batch


@pytest.fixture
def fake_cuda(monkeypatch):
    """A machine where torch reports one bf16-capable CUDA device; the run flag is reset afterwards."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    yield
    dev.set_cuda_run(False)


@pytest.fixture(autouse=True)
def _reset_flag():
    yield
    dev.set_cuda_run(False)


def test_auto_follows_cuda_availability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dev.resolve_device("auto") == torch.device("cpu")
    assert dev.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dev.resolve_device("auto") == torch.device("cuda")
    assert dev.resolve_device("cuda:1") == torch.device("cuda:1")
    assert dev.resolve_device("cpu") == torch.device("cpu")  # asked for: the GPU is not used


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"device is 'cuda' but torch.cuda.is_available\(\) is False.*device=cpu"):
        dev.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"'cuda:3' but only 1 CUDA device"):
        dev.resolve_device("cuda:3")


def test_bad_device_and_attention_names_in_config():
    with pytest.raises(ConfigError, match=r"device must be auto, cpu, cuda.*'gpu'.*override"):
        load_config(None, ["device=gpu"])
    with pytest.raises(ConfigError, match=r"Did you mean \"cuda\""):
        load_config(None, ["device=cdua"])
    with pytest.raises(ConfigError, match=r"model.attn_implementation.*Did you mean \"sdpa\""):
        load_config(None, ["model.attn_implementation=spda"])
    assert load_config(None, ["device=cuda:1"]).device == "cuda:1"  # valid spelling; availability is checked at start


def test_cuda_run_turns_cpu_only_knobs_off_and_picks_bf16_and_sdpa(fake_cuda):
    cfg = load_config(None, ["model.autocast=auto", "rollout.prepack=auto"])
    assert (cfg.rollout.prepack, cfg.rollout.decode_kernel, cfg.rollout.lean_decode) == ("auto", "auto", "auto")
    assert dev.apply_device(cfg) == torch.device("cuda")
    assert cfg.device == "cuda" and dev.cuda_run()
    assert (cfg.rollout.prepack, cfg.rollout.decode_kernel, cfg.rollout.lean_decode) == (False, False, False)
    assert cfg.train.optimizer_in_backward is False
    assert cfg.model.autocast == "bfloat16"
    assert cfg.model.attn_implementation == "sdpa"


def test_cuda_run_precision_follows_the_gpu_and_explicit_choices(fake_cuda, monkeypatch):
    cfg = load_config(None, ["model.autocast=float32", "model.attn_implementation=eager"])
    dev.apply_device(cfg)
    assert cfg.model.autocast == "float32" and cfg.model.attn_implementation == "eager"  # explicit values win
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    cfg = load_config(None, ["model.autocast=auto"])
    dev.apply_device(cfg)
    assert cfg.model.autocast is None  # no bf16 on this GPU: float32


def test_cuda_run_refuses_an_explicit_cpu_kernel(fake_cuda):
    with pytest.raises(ConfigError, match=r"rollout.decode_kernel=true runs lmpo's CPU-only fast path.*cuda"):
        dev.apply_device(load_config(None, ["rollout.decode_kernel=true"]))
    cfg = load_config(None, ["train.optimizer_in_backward=true"])  # plain-torch part runs on CUDA: kept
    dev.apply_device(cfg)
    assert cfg.train.optimizer_in_backward is True
    with pytest.raises(ConfigError, match=r"flash_attention_2 needs half-precision parameters"):
        dev.apply_device(load_config(None, ["model.attn_implementation=flash_attention_2"]))


def test_cpu_run_changes_nothing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_config(None, ["model.autocast=auto"])
    assert dev.apply_device(cfg) == torch.device("cpu")
    assert not dev.cuda_run() and cfg.device == "cpu" and cfg.model.attn_implementation is None
    assert (cfg.rollout.decode_kernel, cfg.train.optimizer_in_backward, cfg.model.autocast) == ("auto", "auto", "auto")


def test_native_kernels_never_load_on_a_cuda_run(fake_cuda, monkeypatch):
    model, _ = load_model("tiny")
    body, head = split_body_and_head(model)
    greedy = SamplingParams(greedy=True, max_new_tokens=4)
    kw = dict(rows=2, steps=4, prompt_length=3, autocast=None, prepack="auto", decode_kernel="auto", lean="auto",
              sampler="auto")

    def forbidden():
        raise AssertionError("the native kernel library was loaded on a CUDA run")

    dev.apply_device(load_config(None, []))
    monkeypatch.setattr(rowdot, "_load", forbidden)  # any attempt to build or load the library fails the test
    assert not rowdot.available()
    assert "CUDA" in rowdot.unavailable_reason()
    plan = plan_decode(model, body, head, greedy, **kw)
    assert (plan.draw, plan.linears, plan.step) == ("torch", "plain", "cached")
    with pytest.raises(RuntimeError, match="CUDA device"):
        rowdot.rms_norm(torch.ones(1, 4), torch.ones(4), 1e-6)
    dev.set_cuda_run(False)  # the same model and settings on a CPU run may take the native draw
    monkeypatch.undo()
    if rowdot.available():
        assert plan_decode(model, body, head, greedy, **kw).draw == "native"


def test_host_to_device_pins_and_copies_asynchronously(monkeypatch):
    t = torch.arange(4)
    assert dev.host_to_device(t, torch.device("cpu")) is t  # CPU run: no copy at all
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append((str(a[0]), k)) or self)
    dev.host_to_device(t, torch.device("cuda"))
    assert calls == ["pin", ("cuda", {"non_blocking": True})]


def test_batch_to_device_moves_every_field_and_extra():
    batch = tagged_batch()
    assert dev.batch_to_device(batch, torch.device("cpu")) is batch
    moved = dev.batch_to_device(batch, torch.device("meta"))  # a real second device, no GPU needed
    for f in batch._tensor_fields():
        assert getattr(moved, f).device.type == "meta" and getattr(moved, f).shape == getattr(batch, f).shape
    assert moved.extras and all(v.device.type == "meta" for v in moved.extras.values())
    assert moved.meta == batch.meta


def test_the_update_moves_each_micro_batch_to_the_policys_device(monkeypatch):
    """policy_update hands every micro-batch to ``batch_to_device`` with the runner's device before its loss, and the
    loss sees what came back (here the CPU: the same batch, so the update is unchanged)."""
    from lmpo.config import TrainConfig
    from lmpo.engine.optim import build_optimizer
    from lmpo.methods.aggregate import TokenMean
    from lmpo.methods.loss.ppo_clip import PPOClipLoss
    from lmpo.train import step
    from factories import policy_batch

    model = load_model("tiny")[0]
    runner = step.PolicyRunner(model, packed=False)
    g = torch.Generator().manual_seed(0)
    attn = torch.arange(4)[None, :] < torch.tensor([4, 2, 3, 1])[:, None]
    b = policy_batch(torch.randint(3, 16, (4, 2), generator=g), torch.ones(4, 2, dtype=torch.bool),
                     torch.randint(3, 16, (4, 4), generator=g), attn, advantages=torch.randn(4, 4, generator=g) * attn)
    b = b.replace(group_ids=torch.arange(4), old_logprobs=runner.logprobs_nograd(b, None))
    moved, seen = [], []
    real = step.batch_to_device

    def record(batch, device):
        moved.append((batch.batch_size, device))
        return real(batch, device)

    def loss_fn(lp, mb):
        seen.append(mb.response_ids.device)
        return PPOClipLoss()(lp, mb)

    loss_fn.needs = PPOClipLoss.needs
    monkeypatch.setattr(step, "batch_to_device", record)
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], TrainConfig(learning_rate=1e-3), 10,
                          single_use=False)
    step.policy_update(runner, opt, b, loss_fn, TokenMean(), step.UpdateSettings(micro_batch_size=2, horizon=4), 1)
    assert moved == [(2, torch.device("cpu")), (2, torch.device("cpu"))] and runner.device == torch.device("cpu")
    assert seen == [torch.device("cpu")] * 2
    assert runner.logprobs_nograd(b, 2).device == b.response_ids.device  # pass results come back to the batch
