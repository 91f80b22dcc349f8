"""lmpo.engine.kernels.rowdot: the few-row linear kernel against a float64 reference, its routing, and its fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmpo.errors import ConfigError
from lmpo.engine.kernels import rowdot

needs_kernel = pytest.mark.skipif(not rowdot.available(), reason=f"kernel unavailable: {rowdot.unavailable_reason()}")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 40])
@pytest.mark.parametrize("k", [8, 64, 77])  # K multiple of the vector width and with a scalar tail
def test_rowdot_equals_float64_linear(rows, k):
    g = torch.Generator().manual_seed(rows * 100 + k)
    x, w, b = torch.randn(rows, k, generator=g), torch.randn(13, k, generator=g), torch.randn(13, generator=g)
    ref = x.double() @ w.double().T
    torch.testing.assert_close(rowdot.rowdot(x, w).double(), ref, rtol=1e-5, atol=1e-5 * k ** 0.5)
    torch.testing.assert_close(rowdot.rowdot(x, w, b).double(), ref + b.double(), rtol=1e-5, atol=1e-5 * k ** 0.5)


@needs_kernel
def test_rowdot_keeps_leading_dims_and_takes_noncontiguous_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 24, generator=g)
    w = torch.randn(24, 10, generator=g).T  # (10, 24), not contiguous
    y = rowdot.rowdot(x, w)
    assert y.shape == (3, 1, 10)
    torch.testing.assert_close(y, x @ w.T, rtol=1e-5, atol=1e-5)
    xt = torch.randn(24, 4, generator=g).T  # (4, 24) transposed view
    torch.testing.assert_close(rowdot.rowdot(xt, w), xt @ w.T, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_rowdot_threads_give_the_same_numbers():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(8, 96, generator=g), torch.randn(301, 96, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rowdot.rowdot(x, w)
        torch.set_num_threads(2)
        two = rowdot.rowdot(x, w)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # threads split output rows, each dot product is summed the same way


@needs_kernel
def test_rowdot_rejects_bad_inputs_clearly():
    with pytest.raises(ValueError, match=r"weight must be \(N, 8\)"):
        rowdot.rowdot(torch.randn(2, 8), torch.randn(3, 7))
    with pytest.raises(ValueError, match="bias"):
        rowdot.rowdot(torch.randn(2, 8), torch.randn(3, 8), torch.randn(4))
    with pytest.raises(ValueError, match="float32 CPU tensor, got torch.float64"):
        rowdot.rowdot(torch.randn(2, 8, dtype=torch.float64), torch.randn(3, 8))


class _SpyLib:
    """Stands in for the loaded library and records the row count of every kernel product."""

    def __init__(self, lib):
        self.lib, self.rows = lib, []

    def lmpo_rowdot(self, x, w, b, y, m, k, n, threads):
        self.rows.append(m)
        self.lib.lmpo_rowdot(x, w, b, y, m, k, n, threads)


@needs_kernel
def test_rowdot_linears_route_few_rows_without_grad_and_restore(monkeypatch):
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5, bias=False))
    spy = _SpyLib(rowdot._load()[0])
    monkeypatch.setattr(rowdot, "_load", lambda: (spy, ""))
    few, many = torch.randn(4, 1, 16), torch.randn(3, 7, 16)
    with torch.no_grad():
        ref_few, ref_many = net(few), net(many)
    with pytest.raises(RuntimeError, match="inside"):
        with rowdot.rowdot_linears(net, max_rows=4):
            with torch.no_grad():
                torch.testing.assert_close(net(few), ref_few, rtol=1e-5, atol=1e-6)
                assert spy.rows == [4, 4]  # both layers, 4 rows each
                torch.testing.assert_close(net(many), ref_many, rtol=1e-5, atol=1e-6)
                assert spy.rows == [4, 4]  # 21 rows: the BLAS
                torch.testing.assert_close(net(few.transpose(0, 2).contiguous().transpose(0, 2)), ref_few,
                                           rtol=1e-5, atol=1e-6)
                assert spy.rows == [4, 4, 4]  # a non-contiguous input takes the BLAS; the next layer's is contiguous
            out = net(few)  # grad enabled and trainable weights: autograd's path, gradients flow
            assert spy.rows == [4, 4, 4] and out.requires_grad
            out.sum().backward()
            assert net[0].weight.grad is not None
            raise RuntimeError("inside")
    assert not any("forward" in m.__dict__ for m in net.modules())


@needs_kernel
def test_rowdot_linears_fall_back_when_a_weight_is_replaced_inside(monkeypatch):
    lin = nn.Linear(8, 3)
    spy = _SpyLib(rowdot._load()[0])
    monkeypatch.setattr(rowdot, "_load", lambda: (spy, ""))
    x = torch.randn(2, 8)
    with torch.no_grad(), rowdot.rowdot_linears(lin):
        lin.weight = nn.Parameter(torch.randn(3, 8))  # new storage: the pointer read on entry is stale
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
    assert spy.rows == []


@needs_kernel
def test_rowdot_linears_keep_gradients_of_inputs_through_frozen_weights():
    lin = nn.Linear(8, 3).requires_grad_(False)  # a frozen base layer (LoRA): the input still needs its gradient
    x = torch.randn(2, 8, requires_grad=True)
    with rowdot.rowdot_linears(lin):
        lin(x).sum().backward()
    torch.testing.assert_close(x.grad, lin.weight.sum(0).expand(2, 8))


def test_should_use_auto_only_for_large_float32_models(monkeypatch):
    monkeypatch.setattr(rowdot, "_load", lambda: (object(), ""))
    small = nn.Linear(4, 4)
    assert not rowdot.should_use(small, "auto", None)  # tiny: nothing to stream
    assert rowdot.should_use(small, True, None)
    assert not rowdot.should_use(small, False, None)
    assert not rowdot.should_use(small, True, "bfloat16")  # autocast products are not float32
    monkeypatch.setattr(rowdot, "MIN_PARAMS", 1)
    assert rowdot.should_use(small, "auto", None)
    assert not rowdot.should_use(small.to(torch.float64), "auto", None)


def test_unavailable_kernel_falls_back_or_says_why(monkeypatch):
    monkeypatch.setattr(rowdot, "_load", lambda: (None, "needs a C compiler (set $CC or install cc/gcc)"))
    monkeypatch.setattr(rowdot, "MIN_PARAMS", 1)
    lin = nn.Linear(4, 4)
    assert not rowdot.should_use(lin, "auto", None)  # auto quietly keeps the BLAS
    with pytest.raises(ConfigError, match="decode_kernel is true .* C compiler .* auto or false"):
        rowdot.should_use(lin, True, None)
    with pytest.raises(RuntimeError, match="unavailable: needs a C compiler"):
        rowdot.rowdot(torch.randn(1, 4), lin.weight)


def test_failed_build_is_reported_not_raised(monkeypatch, tmp_path):
    if rowdot.platform.machine() not in ("x86_64", "AMD64") or torch.backends.cpu.get_cpu_capability() not in (
            "AVX2", "AVX512"):
        pytest.skip("the build is only attempted on AVX2 x86-64")
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setenv("LMPO_KERNEL_DIR", str(tmp_path / "k"))
    rowdot._load.cache_clear()
    try:
        assert not rowdot.available()
        assert "false failed to build rowdot.c" in rowdot.unavailable_reason()
        assert list((tmp_path / "k").iterdir()) == []  # no half-written library left behind
    finally:
        rowdot._load.cache_clear()


@needs_kernel
def test_build_goes_to_the_kernel_dir_once(monkeypatch, tmp_path):
    monkeypatch.setenv("LMPO_KERNEL_DIR", str(tmp_path))
    rowdot._load.cache_clear()
    try:
        assert rowdot.available()
        built = list(tmp_path.glob("rowdot-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        rowdot._load.cache_clear()
        assert rowdot.available() and built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
    finally:
        rowdot._load.cache_clear()


def test_linear_layers_are_unchanged_outside(monkeypatch):
    lin = nn.Linear(4, 2)
    x = torch.randn(1, 4)
    with rowdot.rowdot_linears(lin) if rowdot.available() else torch.no_grad():
        pass
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
    assert "forward" not in lin.__dict__


@needs_kernel
@pytest.mark.parametrize("B, H, KV, D, L", [(2, 4, 2, 8, 1), (3, 9, 3, 64, 41), (1, 2, 1, 10, 17), (2, 2, 2, 4, 2100)])
def test_decode_attention_equals_torch_reference(B, H, KV, D, L):
    # rotary embedding of q and k, the cache write at position L-1, masked softmax attention with grouped heads;
    # L = 2100 exceeds the kernel's stack buffer for the scores
    g = torch.Generator().manual_seed(L)
    Lmax = L + 3
    q, k, v = (torch.randn(*s, generator=g) for s in ((B, H, D), (B, KV, D), (B, KV, D)))
    K, V = torch.randn(B, KV, Lmax, D, generator=g), torch.randn(B, KV, Lmax, D, generator=g)
    angle = torch.rand(B, D // 2, generator=g).repeat(1, 2) * 6
    cos, sin = angle.cos(), angle.sin()
    bias = torch.zeros(B, Lmax)
    if L > 1:
        bias[0, : L // 2] = float("-inf")  # left padding of row 0
    # independent reference: rotate, write, attend, all with torch ops in float64
    half = D // 2
    rot = lambda x: x * cos[:, None].double() + torch.cat([-x[..., half:], x[..., :half]], -1) * sin[:, None].double()  # noqa: E731
    qr, kr = rot(q.double()), rot(k.double())
    Kr, Vr = K.double().clone(), V.double().clone()
    Kr[:, :, L - 1], Vr[:, :, L - 1] = kr, v.double()
    out_ref = torch.empty(B, H, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kv = h // (H // KV)
            w = torch.softmax(Kr[b, kv, :L] @ qr[b, h] * 0.125 + bias[b, :L].double(), -1)
            out_ref[b, h] = w @ Vr[b, kv, :L]
    out = rowdot.decode_attention(q, K, V, bias, L, 0.125, k, v, cos, sin)
    torch.testing.assert_close(out.double(), out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.double(), qr, rtol=1e-5, atol=1e-5)  # rotated in place
    torch.testing.assert_close(K.double(), Kr, rtol=1e-5, atol=1e-5)  # the new key went to position L-1
    assert torch.equal(V[:, :, L - 1], v)
    if L > 1:
        assert not torch.isnan(out).any()


@needs_kernel
def test_decode_attention_without_rope_or_write_and_masked_keys_get_zero_weight():
    g = torch.Generator().manual_seed(0)
    q, K = torch.randn(1, 2, 8, generator=g), torch.randn(1, 1, 12, 8, generator=g)
    V = torch.zeros(1, 1, 12, 8)
    V[0, 0, 3] = 1e30  # a masked position with a huge value: any non-zero weight would show
    bias = torch.zeros(1, 12)
    bias[0, 3] = float("-inf")
    before = q.clone()
    out = rowdot.decode_attention(q, K, V, bias, 12, 0.5)
    assert torch.equal(q, before) and torch.equal(out, torch.zeros(1, 2, 8))
    ref = rowdot.attention_reference(q[:, :, None], K, torch.randn(1, 1, 12, 8, generator=g), bias, 0.5)
    assert ref.shape == (1, 2, 1, 8)


@needs_kernel
def test_decode_attention_and_rms_norm_reject_bad_inputs():
    q, K, bias = torch.randn(1, 2, 8), torch.randn(1, 1, 4, 8), torch.zeros(1, 4)
    with pytest.raises(ValueError, match="bad: \\['K', 'V', 'bias'\\]"):
        rowdot.decode_attention(q, K.transpose(2, 3).contiguous(), K, bias, 2, 1.0)
    with pytest.raises(ValueError, match="length 5"):
        rowdot.decode_attention(q, K, K, bias, 5, 1.0)
    with pytest.raises(ValueError, match="weight \\(7,\\)"):
        rowdot.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-6)


@needs_kernel
def test_rms_norm_equals_llama_formula():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 1, 37, generator=g), torch.randn(37, generator=g)
    ref = w.double() * (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(rowdot.rms_norm(x, w, 1e-5).double(), ref, rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("n", [1, 7, 8, 2053])
@pytest.mark.parametrize("threads", [1, 2])
def test_adam_apply_equals_float64_reference(n, threads):
    g = torch.Generator().manual_seed(n)
    p, m, v = (torch.randn(n, generator=g) for _ in range(3))
    v = v.abs() * 1e-4
    ref = p.double() * (1 - 1e-3 * 0.1) - 1e-3 / 0.19 * m.double() / (v.double().sqrt() / 0.0447 + 1e-8)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rowdot.adam_apply(p, m, v, 1 - 1e-3 * 0.1, 1e-3 / 0.19, 0.0447, 1e-8)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(p.double(), ref, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_adam_apply_rejects_mismatched_tensors():
    with pytest.raises(ValueError, match="contiguous float32 CPU tensors of one size"):
        rowdot.adam_apply(torch.zeros(4), torch.zeros(5), torch.zeros(4), 1.0, 1.0, 1.0, 1e-8)
    with pytest.raises(ValueError, match="contiguous float32 CPU tensors"):
        rowdot.adam_apply(torch.zeros(4, 2).t(), torch.zeros(2, 4), torch.zeros(2, 4), 1.0, 1.0, 1.0, 1e-8)


def _torch_inverse_cdf(logits: torch.Tensor, temperature: float, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain draw: log-softmax, exp, cumulative sum in double, first index whose sum exceeds u * total."""
    logprobs = torch.log_softmax(logits / temperature, -1)
    cdf = logprobs.double().exp().cumsum(-1)
    token = torch.searchsorted(cdf, (u.double() * cdf[:, -1])[:, None], right=True).squeeze(-1)
    return token, logprobs.gather(-1, token[:, None]).squeeze(-1)


@needs_kernel
def test_sample_rows_draws_by_hand():
    # probabilities [0, .5, 0, .5], [.2, .2, .2, .4], [0, 0, 0, 1]: cdf [0, .5, .5, 1], [.2, .4, .6, 1], [0, 0, 0, 1]
    logits = torch.tensor([[-1e30, 0.0, -1e30, 0.0], [0.0, 0.0, 0.0, 0.6931472], [-1e30, -1e30, -1e30, 3.0]])
    for u, expect in (([0.0, 0.0, 0.0], [1, 0, 3]), ([0.5, 0.39, 0.5], [3, 1, 3]), ([0.9999, 0.6, 0.9999], [3, 3, 3]),
                      ([0.25, 0.59, 0.1], [1, 2, 3])):
        token, logp, bad = rowdot.sample_rows(logits, 1.0, torch.tensor(u))
        assert bad == 0 and token.tolist() == expect  # zero-probability entries (flat stretches) never drawn
        row1 = 0.4 if expect[1] == 3 else 0.2  # the probability of row 1's draw
        assert logp[2].item() == pytest.approx(0.0, abs=1e-6)
        assert logp[0].item() == pytest.approx(float(torch.log(torch.tensor(0.5))), abs=1e-6)
        assert logp[1].item() == pytest.approx(float(torch.log(torch.tensor(row1))), abs=1e-6)


@needs_kernel
@pytest.mark.parametrize("V", [5, 8, 4099, 49152])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sample_rows_equals_the_torch_inverse_cdf(V, temperature):
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(16, V, generator=g) * 4
    logits[3, : V // 2] = -1e30  # half the vocabulary at zero probability
    u = torch.rand(16, generator=g)
    u[0], u[1] = 0.0, 1 - 2**-24  # both ends of [0, 1)
    token, logp, bad = rowdot.sample_rows(logits, temperature, u)
    want, want_logp = _torch_inverse_cdf(logits, temperature, u)
    assert bad == 0
    assert token.tolist() == want.tolist()
    torch.testing.assert_close(logp, want_logp, rtol=1e-5, atol=1e-5)
    assert token[3] >= V // 2


@needs_kernel
def test_sample_rows_greedy_takes_the_first_maximum():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0], [5.0, -1.0, 0.0, 5.0]])
    token, logp, bad = rowdot.sample_rows(logits, 1.0, None)
    assert bad == 0 and token.tolist() == [1, 0] == logits.argmax(-1).tolist()
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1).gather(-1, token[:, None]).squeeze(-1))


@needs_kernel
def test_sample_rows_frequencies_match_the_distribution():
    p = torch.tensor([0.05, 0.0, 0.15, 0.3, 0.5])
    n = 40_000
    g = torch.Generator().manual_seed(0)
    logits = p.clamp_min(1e-45).log().expand(n, 5).contiguous()
    token, _, _ = rowdot.sample_rows(logits, 1.0, torch.rand(n, generator=g))
    freq = torch.bincount(token, minlength=5).double() / n
    assert freq[1] == 0
    assert ((freq - p.double()).abs() <= 4 * (p.double() * (1 - p.double()) / n).sqrt() + 1e-12).all()


@needs_kernel
def test_sample_rows_counts_rows_with_nan_or_inf_and_rejects_bad_inputs():
    logits = torch.zeros(4, 19)
    logits[1, 17], logits[2, 3], logits[3, 0] = float("nan"), float("inf"), float("-inf")
    _, _, bad = rowdot.sample_rows(logits, 1.0, torch.full((4,), 0.5))
    assert bad == 3
    with pytest.raises(ValueError, match="contiguous float32"):
        rowdot.sample_rows(torch.zeros(4, 3).t(), 1.0, None)
    with pytest.raises(ValueError, match="temperature > 0"):
        rowdot.sample_rows(torch.zeros(2, 3), 0.0, None)
    with pytest.raises(ValueError, match="u must be 2 contiguous float32 uniforms"):
        rowdot.sample_rows(torch.zeros(2, 3), 1.0, torch.zeros(3))


@needs_kernel
def test_the_self_test_passes_when_first_loaded_inside_autocast():
    # the sampler may ask for the kernels first inside generation's bf16 autocast: the self-test's torch
    # references must still run in float32 there
    rowdot._load.cache_clear()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            assert rowdot.available(), rowdot.unavailable_reason()
    finally:
        rowdot._load.cache_clear()


@needs_kernel
def test_kernels_share_torchs_openmp_runtime():
    """The kernels' OpenMP regions run on the runtime torch loaded (one libgomp in the process), so the spin-wait
    bound set at ``import lmpo`` (lmpo.engine.threads) applies to them as to torch's own regions."""
    rowdot.rowdot(torch.randn(2, 8), torch.randn(3, 8))
    with open("/proc/self/maps") as f:
        runtimes = {line.split()[-1] for line in f if any(n in line for n in ("libgomp", "libiomp", "libomp.so"))}
    assert len(runtimes) == 1, runtimes


class _ThreadSpy:
    def __init__(self, lib):
        self.lib, self.threads = lib, []

    def lmpo_rowdot(self, x, w, b, y, m, k, n, threads):
        self.threads.append(threads)
        self.lib.lmpo_rowdot(x, w, b, y, m, k, n, threads)


@needs_kernel
def test_kernels_follow_the_chosen_thread_count(monkeypatch):
    from lmpo.engine.threads import ThreadChoice, apply_threads

    spy = _ThreadSpy(rowdot._load()[0])
    monkeypatch.setattr(rowdot, "_load", lambda: (spy, ""))
    lin, before = nn.Linear(8, 3), torch.get_num_threads()
    try:
        for n in (1, 2):
            apply_threads(ThreadChoice(n, "auto: probe", 2))
            rowdot.rowdot(torch.randn(2, 8), lin.weight.detach())
            with torch.no_grad(), rowdot.rowdot_linears(lin):
                lin(torch.randn(2, 8))
    finally:
        torch.set_num_threads(before)
    assert spy.threads == [1, 1, 2, 2]
