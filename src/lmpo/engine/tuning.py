"""Machine-dependent speed choices, measured rather than assumed.

``model.autocast: auto`` runs the forward passes in bfloat16 only when this CPU multiplies bf16 matrices faster
than fp32 ones. On CPUs with AVX512-BF16/AMX bf16 is several times faster; on AVX2-only CPUs PyTorch emulates it and
it is many times *slower*, so a fixed choice is wrong on one of the two (figures: docs/results/performance.md).
"""

from __future__ import annotations

import functools
import time

import torch

AUTOCAST_CHOICES = (None, "auto", "float32", "bfloat16", "float16")


def _matmul_seconds(dtype: torch.dtype, n: int = 256, reps: int = 4) -> float:
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return best


@functools.lru_cache(maxsize=None)
def bf16_speedup() -> float:
    """fp32 time / bf16 time of a 256x256 matmul on this machine (>1 means bf16 is faster)."""
    return _matmul_seconds(torch.float32) / max(_matmul_seconds(torch.bfloat16), 1e-12)


def resolve_autocast(value: str | None, threshold: float = 1.3) -> str | None:
    """The autocast dtype to use: ``auto`` -> ``"bfloat16"`` when bf16 is >= ``threshold`` x faster, else ``None``."""
    if value == "auto":
        return "bfloat16" if bf16_speedup() >= threshold else None
    if value == "float32":
        return None
    return value


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)


def set_mmap_threshold(kib: int | None) -> bool:
    """Fix glibc malloc's mmap threshold at ``kib`` KiB (``None``: leave the allocator as it is). True when applied.

    glibc serves a block above the threshold with its own ``mmap`` and unmaps it on free, but by default it raises the
    threshold to the size of every such block freed (up to 32 MiB), so after the first step the activations of the
    update come from the heap, whose freed space stays resident: peak memory then follows the allocator's history
    rather than what is alive. A fixed threshold turns that dynamic rule off (and sets the trim threshold beside it,
    as glibc does), so freed tensors go back to the system at once. The trade, measured on the default model
    (docs/results/performance.md): a lower peak RSS, but each fresh block is page-faulted in again, which costs
    system CPU time in every update. So it is opt-in (``train.mmap_threshold_kb``), part of the low-memory recipe.
    No effect where the C library is not glibc.
    """
    if kib is None:
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    value = int(kib) * 1024
    return bool(mallopt(M_MMAP_THRESHOLD, value)) and bool(mallopt(M_TRIM_THRESHOLD, 2 * value))


_MALLOC_TRIM = None  # glibc's malloc_trim, looked up once (False where the C library has none)


def trim_heap() -> bool:
    """Give the pages of the heap's free chunks back to the system (glibc ``malloc_trim(0)``); True when it ran.

    glibc keeps freed blocks below its mmap threshold in the heap. A long backward pass frees and allocates blocks of
    a few MB in an order that leaves free chunks the next request cannot use (a small long-lived allocation splits a
    large free chunk), so the heap grows while what is alive does not (on the default model, full fine-tuning with
    the optimizer folded into backward, its free part grew with every layer). ``malloc_trim(0)`` releases every
    whole free page with ``madvise`` (the chunks stay where they are, so nothing moves) for a few milliseconds per
    call; a page that is used again is faulted back in (figures: docs/results/performance.md).
    :mod:`lmpo.engine.packed` calls it at the end of its forward and every ``TRIM_EVERY`` layers of backward. No
    effect where the C library is not glibc.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            fn = ctypes.CDLL(None).malloc_trim
            fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
            _MALLOC_TRIM = fn
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM is False:
        return False
    _MALLOC_TRIM(0)
    return True
