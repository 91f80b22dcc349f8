"""Few-row float32 linear layers for KV-cached decoding on x86 CPUs (the C source is ``rowdot.c`` beside this file).

One decode step multiplies a handful of rows (the batch) by every weight of the model, so its cost is the time to
read the weights from memory. At a few rows MKL's matrix multiply passes the weights far below the speed of a
plain read (it packs the weights into a blocked copy on each call); ``rowdot.c`` streams each weight row once for all
rows with a software prefetch and gets much closer to it (`benchmarks/levers.py decode_matmul`; figures in
docs/results/performance.md). With more rows the BLAS's blocking pays off and it is faster again, so
:func:`rowdot_linears` routes only products of at most :data:`MAX_ROWS` rows through the kernel. The same library
holds the two other pieces of a decode step that a framework dispatches as many small operations:
:func:`decode_attention` (rotary embedding, cache write and masked softmax attention of one new position, for every
row and head) and Llama's :func:`rms_norm`; the lean decode step (:mod:`lmpo.engine.lean`) uses them.

The library is compiled once per source version with the system C compiler (``$CC``, else ``cc``/``gcc``) into
``$LMPO_KERNEL_DIR`` (default ``~/.cache/lmpo/kernels``), written atomically, and checked against a float64 product
before it is used. Where any of that is impossible (no compiler, no AVX2/FMA, not Linux/x86-64) :func:`available`
is False, :func:`unavailable_reason` says why, and callers fall back to ``torch.nn.functional.linear``. Results
agree with the BLAS to float rounding (each dot product is summed in eight interleaved partial sums), not bit for bit.

Threads: the parallel kernels take ``torch.get_num_threads()`` at each call (so they follow ``train.threads``, auto
included) and run on the OpenMP runtime torch already loaded (the library links ``libgomp.so.1``, which resolves to
torch's copy), so the spin-wait bound lmpo sets at import applies to them too (:mod:`lmpo.engine.threads`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmpo.engine.device import cuda_run
from lmpo.errors import ConfigError

SOURCE = Path(__file__).with_name("rowdot.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
LIBS = ("-lm",)
MAX_ROWS = 16
"""Products with more rows than this go to the BLAS (set at the crossover measured on the default model:
docs/results/performance.md)."""
MIN_PARAMS = 10_000_000
"""``decode_kernel="auto"`` uses the kernel only for models at least this large (smaller ones sit in the caches)."""


def _kernel_dir() -> Path:
    if os.environ.get("LMPO_KERNEL_DIR"):
        return Path(os.environ["LMPO_KERNEL_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lmpo" / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, why not)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None, f"needs Linux on x86-64 (this is {platform.system()} on {platform.machine()})"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return None, f"needs a CPU with AVX2 and FMA (torch reports {capability!r})"
    cc = _compiler()
    if cc is None:
        return None, "needs a C compiler (set $CC or install cc/gcc)"
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join((cc, *FLAGS, *LIBS)).encode()).hexdigest()[:16]
    target = _kernel_dir() / f"rowdot-{digest}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            run = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), *LIBS], capture_output=True, text=True)
            if run.returncode != 0:
                os.unlink(tmp)
                why = run.stderr.strip()[-500:] or f"exit status {run.returncode}, no message"
                return None, f"{cc} failed to build {SOURCE.name}: {why}"
            os.replace(tmp, target)  # atomic: concurrent builders each install a complete file
        except OSError as e:
            return None, f"cannot build into {target.parent} ({e}); set $LMPO_KERNEL_DIR to a writable folder"
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        return None, f"cannot load {target} ({e})"
    lib.lmpo_rowdot.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
    lib.lmpo_rowdot.restype = None
    lib.lmpo_decode_attention.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_long] * 6 + [ctypes.c_float, ctypes.c_int]
    lib.lmpo_decode_attention.restype = None
    lib.lmpo_rms_norm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 2 + [ctypes.c_float]
    lib.lmpo_rms_norm.restype = None
    lib.lmpo_adam_apply.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] + [ctypes.c_float] * 4 + [ctypes.c_int]
    lib.lmpo_adam_apply.restype = None
    lib.lmpo_sample_rows.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_float] + [ctypes.c_void_p] * 4
    lib.lmpo_sample_rows.restype = ctypes.c_long
    with torch.no_grad(), torch.autocast("cpu", enabled=False):  # the first call may come from inside autocast
        why = _self_test(lib)
    return (lib, "") if not why else (None, why)


def _self_test(lib: ctypes.CDLL) -> str:
    g = torch.Generator().manual_seed(0)
    for m, k, n in ((8, 40, 9), (3, 7, 5), (17, 64, 2)):  # every row-block size, a K tail, more than 8 rows
        x, w, b = (torch.randn(*s, generator=g) for s in ((m, k), (n, k), (n,)))
        y = torch.empty(m, n)
        lib.lmpo_rowdot(x.data_ptr(), w.data_ptr(), b.data_ptr(), y.data_ptr(), m, k, n, 1)
        ref = x.double() @ w.double().T + b.double()
        if not torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-4):
            return f"the built kernel gives wrong products (max error {(y.double() - ref).abs().max():.3g})"
    B, H, KV, D, L, Lmax = 2, 6, 2, 12, 13, 15  # 13 positions: one 8-wide exp block and a scalar tail
    q, k, v = (torch.randn(*s, generator=g) for s in ((B, H, D), (B, KV, D), (B, KV, D)))
    K, V = torch.randn(B, KV, Lmax, D, generator=g), torch.randn(B, KV, Lmax, D, generator=g)
    cos, sin = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    bias = torch.zeros(B, Lmax)
    bias[0, :2] = float("-inf")
    qr, kr = rope_reference(q, cos, sin), rope_reference(k, cos, sin)
    Kr, Vr = K.clone(), V.clone()
    Kr[:, :, L - 1], Vr[:, :, L - 1] = kr, v
    ref = attention_reference(qr[:, :, None], Kr[:, :, :L], Vr[:, :, :L], bias[:, :L], 0.3).squeeze(2)
    out = torch.empty(B, H, D)
    lib.lmpo_decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(), K.data_ptr(),
                              V.data_ptr(), bias.data_ptr(), out.data_ptr(), B, H, KV, D, L, Lmax, 0.3, 1)
    if not (torch.allclose(out, ref, rtol=1e-4, atol=1e-5) and torch.allclose(q, qr, rtol=1e-5, atol=1e-6)
            and torch.allclose(K, Kr, rtol=1e-5, atol=1e-6) and torch.equal(V, Vr)):
        return f"the built attention kernel is wrong (max error {(out - ref).abs().max():.3g})"
    x, w = torch.randn(3, 20, generator=g), torch.randn(20, generator=g)
    y = torch.empty(3, 20)
    lib.lmpo_rms_norm(x.data_ptr(), w.data_ptr(), y.data_ptr(), 3, 20, 1e-6)
    if not torch.allclose(y, w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)), rtol=1e-5, atol=1e-6):
        return "the built RMSNorm kernel is wrong"
    m, v, p = (torch.randn(2053, generator=g) for _ in range(3))  # a vector block and a scalar tail
    v = v.abs()
    p2 = p.clone()
    lib.lmpo_adam_apply(p2.data_ptr(), m.data_ptr(), v.data_ptr(), p.numel(), 0.999, 0.01, 0.3, 1e-8, 1)
    if not torch.allclose(p2, p * 0.999 - 0.01 * m / (v.sqrt() / 0.3 + 1e-8), rtol=1e-5, atol=1e-5):
        return "the built AdamW kernel is wrong"
    logits = torch.randn(3, 21, generator=g) * 3
    logits[1, :5] = -1e30  # zero probability: never drawn
    u = torch.tensor([0.0, 0.5, 0.999])
    e, token, logp = torch.empty(3, 21), torch.empty(3, dtype=torch.long), torch.empty(3)
    bad = lib.lmpo_sample_rows(logits.data_ptr(), 3, 21, 0.7, u.data_ptr(), e.data_ptr(), token.data_ptr(),
                               logp.data_ptr())
    ref = torch.log_softmax(logits / 0.7, -1)
    cdf = ref.double().exp().cumsum(-1)
    want = torch.searchsorted(cdf, (u.double() * cdf[:, -1])[:, None], right=True).squeeze(-1)
    if bad or not torch.equal(token, want) or not torch.allclose(logp, ref.gather(-1, want[:, None]).squeeze(-1),
                                                                 atol=1e-5):
        return "the built sampling kernel is wrong"
    return ""


def rope_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Llama's rotary embedding ``x cos + rotate_half(x) sin`` for x (B, n, D) and cos, sin (B, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def attention_reference(q: Tensor, K: Tensor, V: Tensor, bias: Tensor, scale: float) -> Tensor:
    """softmax(q K^T * scale + bias) V with torch ops: q (B, H, 1, D); K, V (B, KV, L, D); bias (B, L) additive."""
    B, H, _, D = q.shape
    KV = K.shape[1]
    qg = q.reshape(B, KV, H // KV, D)  # query heads grouped by their key/value head
    scores = torch.matmul(qg, K.transpose(-1, -2)) * scale + bias[:, None, None, :]
    return torch.matmul(torch.softmax(scores, dim=-1), V).reshape(B, H, 1, D)


CUDA_RUN_REASON = "this run is on a CUDA device (lmpo.engine.device): the CPU-only native kernels are not loaded"


def available() -> bool:
    """Whether the kernel is built (or can be) and passed its self-test on this machine; always False in a process
    running on a CUDA device (:func:`lmpo.engine.device.cuda_run`), which never compiles or loads the library."""
    return not cuda_run() and _load()[0] is not None


def _library() -> ctypes.CDLL:
    """The loaded library, or a RuntimeError saying why there is none."""
    if not available():
        raise RuntimeError(f"The rowdot kernel is unavailable: {unavailable_reason()}")
    return _load()[0]


def unavailable_reason() -> str:
    """Why :func:`available` is False ("" when it is True)."""
    return CUDA_RUN_REASON if cuda_run() else _load()[1]


def rowdot(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for float32 CPU tensors through the kernel (any number of rows, but it pays
    only for a few). ``x``: (..., K); ``weight``: (N, K); ``bias``: (N,) or None. No autograd."""
    lib = _library()
    K = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K or (bias is not None and bias.shape != (weight.shape[0],)):
        raise ValueError(f"rowdot: x (..., {K}), weight {tuple(weight.shape)} and bias "
                         f"{None if bias is None else tuple(bias.shape)} do not fit (weight must be (N, {K}))")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            raise ValueError(f"rowdot: {name} must be a float32 CPU tensor, got {t.dtype} on {t.device}")
    x2 = x.reshape(-1, K).contiguous()
    w = weight.contiguous()
    b = None if bias is None else bias.contiguous()
    y = torch.empty(x2.shape[0], w.shape[0], dtype=torch.float32)
    lib.lmpo_rowdot(x2.data_ptr(), w.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(),
                    x2.shape[0], K, w.shape[0], torch.get_num_threads())
    return y.reshape(*x.shape[:-1], w.shape[0])


def decode_attention(q: Tensor, K: Tensor, V: Tensor, bias: Tensor, length: int, scale: float,
                     k: Tensor | None = None, v: Tensor | None = None, cos: Tensor | None = None,
                     sin: Tensor | None = None) -> Tensor:
    """One decode step's attention through the kernel; everything float32, contiguous, on the CPU.

    ``q`` (B, H, D) queries; ``K``, ``V`` (B, KV, Lmax, D) buffers of which the first ``length`` positions are
    attended; ``bias`` (B, Lmax) additive mask. With ``cos``, ``sin`` (B, D), ``q`` (and ``k``) are first rotated
    **in place** (:func:`rope_reference`); with ``k``, ``v`` (B, KV, D), they are first written to position
    ``length - 1`` of the buffers. Returns (B, H, D), equal to :func:`attention_reference` up to rounding."""
    lib = _library()
    B, H, D = q.shape
    KV, Lmax = K.shape[1], K.shape[2]
    parts = {"q": q, "K": K, "V": V, "bias": bias, "k": k, "v": v, "cos": cos, "sin": sin}
    shapes = {"K": (B, KV, Lmax, D), "V": (B, KV, Lmax, D), "bias": (B, Lmax), "k": (B, KV, D), "v": (B, KV, D),
              "cos": (B, D), "sin": (B, D)}
    bad = [n for n, t in parts.items() if t is not None and (
        t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous()
        or (n in shapes and tuple(t.shape) != shapes[n]))]
    if bad or H % KV or not 0 < length <= Lmax or (k is None) != (v is None) or (cos is None) != (sin is None):
        raise ValueError(f"decode_attention: {', '.join(f'{n} {tuple(t.shape)}' for n, t in parts.items() if t is not None)}"
                         f", length {length} do not fit (contiguous float32 CPU tensors expected; bad: {bad})")
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    out = torch.empty(B, H, D, dtype=torch.float32)
    lib.lmpo_decode_attention(q.data_ptr(), ptr(k), ptr(v), ptr(cos), ptr(sin), K.data_ptr(), V.data_ptr(),
                              bias.data_ptr(), out.data_ptr(), B, H, KV, D, length, Lmax, scale,
                              torch.get_num_threads())
    return out


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama's RMSNorm ``weight * (x / sqrt(mean(x^2) + eps))`` over the last dimension through the kernel."""
    lib = _library()
    H = x.shape[-1]
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or weight.shape != (H,):
        raise ValueError(f"rms_norm: x {tuple(x.shape)} {x.dtype} and weight {tuple(weight.shape)} {weight.dtype} "
                         f"do not fit (float32, weight ({H},))")
    xc, w = x.contiguous(), weight.contiguous()
    y = torch.empty_like(xc)
    lib.lmpo_rms_norm(xc.data_ptr(), w.data_ptr(), y.data_ptr(), xc.numel() // H, H, eps)
    return y


def adam_apply(p: Tensor, m: Tensor, v: Tensor, decay: float, step: float, bc2_sqrt: float, eps: float) -> None:
    """AdamW's weight update from its moments, in place, in one pass:
    ``p <- p * decay - step * m / (sqrt(v) / bc2_sqrt + eps)`` (fused AdamW's expression)."""
    _same_flat("adam_apply", p, m, v)
    _library().lmpo_adam_apply(p.data_ptr(), m.data_ptr(), v.data_ptr(), p.numel(), decay, step, bc2_sqrt, eps,
                               torch.get_num_threads())


def sample_rows(logits: Tensor, temperature: float, u: Tensor | None,
                scratch: Tensor | None = None) -> tuple[Tensor, Tensor, int]:
    """One token per row of ``logits`` (n, V) from ``softmax(logits / temperature)`` by inverse CDF with the
    uniforms ``u`` (n,) (the argmax where ``u`` is None), in one native call.

    Draws what :func:`lmpo.rollout.hf.sample_inverse_cdf` draws from ``log_softmax(logits / temperature).exp()``
    with the same uniforms, up to float rounding at the boundaries between entries (the cumulative sum is taken
    in double precision, as torch's CPU cumulative sum does). ``scratch``: an (n, V) float32 buffer to reuse
    across calls. Returns ``(tokens (n,) int64, log-probs (n,) float32, rows with NaN or infinite entries)``; the
    outputs of such rows are unset."""
    n, V = logits.shape
    if logits.dtype != torch.float32 or logits.device.type != "cpu" or not logits.is_contiguous() or temperature <= 0:
        raise ValueError(f"sample_rows: logits must be contiguous float32 on the CPU and temperature > 0, got "
                         f"{logits.dtype} on {logits.device} (contiguous: {logits.is_contiguous()}), {temperature}")
    if u is not None and (u.dtype != torch.float32 or u.numel() != n or not u.is_contiguous()):
        raise ValueError(f"sample_rows: u must be {n} contiguous float32 uniforms, got {tuple(u.shape)} {u.dtype}")
    if scratch is None or scratch.shape != (n, V) or scratch.dtype != torch.float32 or not scratch.is_contiguous():
        scratch = torch.empty(n, V, dtype=torch.float32)
    token, logp = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.float32)
    bad = _library().lmpo_sample_rows(logits.data_ptr(), n, V, float(temperature),
                                      None if u is None else u.data_ptr(), scratch.data_ptr(), token.data_ptr(),
                                      logp.data_ptr())
    return token, logp, int(bad)


def flat_float32(*ts: Tensor) -> bool:
    """Whether every tensor is a contiguous float32 CPU tensor with the first one's number of elements (what the
    element-wise kernels take)."""
    n = ts[0].numel()
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() and t.numel() == n
               for t in ts)


def _same_flat(name: str, *ts: Tensor) -> None:
    if not flat_float32(*ts):
        raise ValueError(f"{name}: expects contiguous float32 CPU tensors of one size, got "
                         f"{[(tuple(t.shape), t.dtype, str(t.device)) for t in ts]}")


def float32_cpu_linears(model: nn.Module) -> bool:
    """Whether ``model`` has ``nn.Linear`` layers and all of them hold float32 weights on the CPU."""
    weights = [m.weight for m in model.modules() if type(m) is nn.Linear]
    return bool(weights) and all(w.device.type == "cpu" and w.dtype == torch.float32 for w in weights)


def large_model(model: nn.Module) -> bool:
    """Whether ``model`` has at least :data:`MIN_PARAMS` parameters (the decode fast paths' ``auto`` threshold)."""
    return sum(p.numel() for p in model.parameters()) >= MIN_PARAMS


def should_use(model: nn.Module, mode: str | bool, autocast: str | None) -> bool:
    """``mode``: ``"auto"`` (float32 CPU models of at least :data:`MIN_PARAMS` parameters, no autocast, kernel
    available), ``True`` (float32 CPU weights; raises if the kernel cannot be built) or ``False``."""
    if mode is False or autocast or not float32_cpu_linears(model):
        return False
    if mode is True:
        if not available():
            raise ConfigError(f"rollout.decode_kernel is true but the kernel is unavailable: "
                               f"{unavailable_reason()}. Set rollout.decode_kernel to auto or false.")
        return True
    return large_model(model) and available()


@contextlib.contextmanager
def rowdot_linears(model: nn.Module, max_rows: int = MAX_ROWS) -> Iterator[None]:
    """Inside, every ``nn.Linear`` of ``model`` (peft's base layers included) with contiguous float32 CPU weights
    computes products of at most ``max_rows`` contiguous float32 rows that need no gradient through the kernel, and
    anything else through ``F.linear``; on exit the modules are as before. Each module's weight pointer is read on
    entry (a decode step calls the kernel hundreds of times, so the per-call work is kept to a few checks); a module
    whose weight is replaced inside the context falls back to ``F.linear``."""
    lib = _library()
    kernel, threads = lib.lmpo_rowdot, torch.get_num_threads()
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    try:
        for m in linears:
            w, b = m.weight, m.bias
            if not all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous())
                       for t in (w, b)):
                continue
            N, K = w.shape
            limit, w_ptr, b_ptr = max_rows * K, w.data_ptr(), None if b is None else b.data_ptr()
            trainable = w.requires_grad or (b is not None and b.requires_grad)

            def forward(x: Tensor, m: nn.Linear = m, N=N, K=K, limit=limit, w_ptr=w_ptr, b_ptr=b_ptr,
                        trainable=trainable) -> Tensor:
                if (x.dtype == torch.float32 and x.numel() <= limit and x.is_cpu and x.is_contiguous()
                        and m.weight.data_ptr() == w_ptr
                        and not (torch.is_grad_enabled() and (trainable or x.requires_grad))):
                    y = torch.empty((*x.shape[:-1], N), dtype=torch.float32)
                    kernel(x.data_ptr(), w_ptr, b_ptr, y.data_ptr(), x.numel() // K, K, N, threads)
                    return y
                return F.linear(x, m.weight, m.bias)

            m.forward = forward
        yield
    finally:
        for m in linears:
            m.__dict__.pop("forward", None)
