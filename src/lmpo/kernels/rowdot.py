"""Few-row float32 linear layers for KV-cached decoding on x86 CPUs (the C source is ``rowdot.c`` beside this file).

One decode step multiplies a handful of rows (the batch) by every weight of the model, so its cost is the time to
read the weights from memory. On the 2-core AVX2 machine we measured, MKL's matrix multiply at 8 rows passes 2.8-4.3
weight GB per CPU second against 9-12 GB/s for a plain read (it packs the weights into a blocked copy on each call);
``rowdot.c`` streams each weight row once for all rows with a software prefetch and reaches 6.4-8.1 GB/s at 8 rows
(`benchmarks/levers.py decode_matmul`). Beyond ~16 rows the BLAS is faster again, so :func:`rowdot_linears` routes
only products of at most :data:`MAX_ROWS` rows through the kernel.

The library is compiled once per source version with the system C compiler (``$CC``, else ``cc``/``gcc``) into
``$LMPO_KERNEL_DIR`` (default ``~/.cache/lmpo/kernels``), written atomically, and checked against a float64 product
before it is used. Where any of that is impossible (no compiler, no AVX2/FMA, not Linux/x86-64) :func:`available`
is False, :func:`unavailable_reason` says why, and callers fall back to ``torch.nn.functional.linear``. Results
agree with the BLAS to float rounding (each dot product is summed in eight interleaved partial sums), not bit for bit.
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

SOURCE = Path(__file__).with_name("rowdot.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
MAX_ROWS = 16
"""Products with more rows than this go to the BLAS (measured crossover: 16-24 rows of the default model)."""
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
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join((cc, *FLAGS)).encode()).hexdigest()[:16]
    target = _kernel_dir() / f"rowdot-{digest}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            run = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
            if run.returncode != 0:
                os.unlink(tmp)
                return None, f"{cc} failed to build {SOURCE.name}: {run.stderr.strip()[-500:]}"
            os.replace(tmp, target)  # atomic: concurrent builders each install a complete file
        except OSError as e:
            return None, f"cannot build into {target.parent} ({e}); set $LMPO_KERNEL_DIR to a writable folder"
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        return None, f"cannot load {target} ({e})"
    lib.lmpo_rowdot.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
    lib.lmpo_rowdot.restype = None
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
    return ""


def available() -> bool:
    """Whether the kernel is built (or can be) and passed its self-test on this machine."""
    return _load()[0] is not None


def unavailable_reason() -> str:
    """Why :func:`available` is False ("" when it is True)."""
    return _load()[1]


def rowdot(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for float32 CPU tensors through the kernel (any number of rows, but it pays
    only for a few). ``x``: (..., K); ``weight``: (N, K); ``bias``: (N,) or None. No autograd."""
    lib = _load()[0]
    if lib is None:
        raise RuntimeError(f"The rowdot kernel is unavailable: {unavailable_reason()}")
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


def should_use(model: nn.Module, mode: str | bool, autocast: str | None) -> bool:
    """``mode``: ``"auto"`` (float32 CPU models of at least :data:`MIN_PARAMS` parameters, no autocast, kernel
    available), ``True`` (float32 CPU weights; raises if the kernel cannot be built) or ``False``."""
    if mode is False or autocast:
        return False
    weights = [m.weight for m in model.modules() if type(m) is nn.Linear]
    if not weights or any(w.device.type != "cpu" or w.dtype != torch.float32 for w in weights):
        return False
    if mode is True:
        if not available():
            raise RuntimeError(f"rollout.decode_kernel is true but the kernel is unavailable: "
                               f"{unavailable_reason()}. Set rollout.decode_kernel to auto or false.")
        return True
    return sum(p.numel() for p in model.parameters()) >= MIN_PARAMS and available()


@contextlib.contextmanager
def rowdot_linears(model: nn.Module, max_rows: int = MAX_ROWS) -> Iterator[None]:
    """Inside, every ``nn.Linear`` of ``model`` (peft's base layers included) computes products of at most
    ``max_rows`` float32 rows without autograd through :func:`rowdot`, anything else through ``F.linear``; on exit
    the modules are as before."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    try:
        for m in linears:

            def forward(x: Tensor, m: nn.Linear = m) -> Tensor:
                w, b = m.weight, m.bias
                needs_grad = torch.is_grad_enabled() and (
                    x.requires_grad or w.requires_grad or (b is not None and b.requires_grad))
                if (not needs_grad and x.numel() <= max_rows * x.shape[-1] and x.dtype == torch.float32
                        and w.dtype == torch.float32 and x.device.type == "cpu"):
                    return rowdot(x, w, b)
                return F.linear(x, w, b)

            m.forward = forward
        yield
    finally:
        for m in linears:
            m.__dict__.pop("forward", None)
