"""Machine-dependent speed choices, measured rather than assumed.

``model.autocast: auto`` runs the forward passes in bfloat16 only when this CPU multiplies bf16 matrices faster
than fp32 ones. On CPUs with AVX512-BF16/AMX bf16 is ~3x faster; on AVX2-only CPUs PyTorch emulates it and it is
10-40x *slower*, so a fixed choice is wrong on one of the two.
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
