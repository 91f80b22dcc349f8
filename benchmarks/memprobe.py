"""Where the peak memory of an lmpo training step comes from: RSS and the kernel's high-water mark at marks around
the update's forward, backward and optimizer step, plus each update's CPU seconds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memprobe.py                       # the bench workload, 4 steps
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memprobe.py model.gradient_checkpointing=true train.mmap_threshold_kb=128

Extra arguments are lmpo config overrides. The workload is the benchmark's (``workers.lmpo_overrides``): the default
model, one prompt x 8 completions of exactly 64 tokens, full fp32 fine-tuning, no checkpoint writes. ``ru_maxrss`` at each
mark tells in which phase the peak was reached; a sampling thread cannot (backward holds the interpreter).
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**30


def main(overrides: list[str]) -> None:
    import torch

    import lmpo.train.loop as loop
    import lmpo.train.step as step
    from lmpo.config import load_config
    from lmpo.rollout.hf import HFGenerator
    from lmpo.engine import inbackward
    from workers import lmpo_overrides

    t0 = time.perf_counter()
    marks: list[tuple[float, str, float, float]] = []
    cpu: list[float] = []

    def mark(name: str) -> None:
        marks.append((time.perf_counter() - t0, name, rss_gb(),
                      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20))

    def around(obj, name: str, label: str, timed: bool = False):
        orig = getattr(obj, name)

        def wrapped(*a, **kw):
            mark(f"{label} start")
            c0 = time.process_time()
            out = orig(*a, **kw)
            if timed:
                cpu.append(time.process_time() - c0)
            mark(f"{label} end")
            return out

        setattr(obj, name, wrapped)

    around(step, "minibatch_loss", "forward")
    around(inbackward.BackwardAdamW, "backward", "backward (optimizer folded in)")
    around(inbackward.BackwardAdamW, "step", "weights")
    around(torch.nn.utils, "clip_grad_norm_", "clip (after backward)")
    around(loop, "policy_update", "update", timed=True)
    init = HFGenerator.__init__

    def fixed_length(self, *a, **kw):  # as the benchmark: every row samples exactly max_new_tokens
        init(self, *a, **kw)
        self.eos_ids = []

    HFGenerator.__init__ = fixed_length
    loop.save_checkpoint = lambda *a, **kw: None
    spec = {"model": "default", "seed": 0, "group": 8, "length": 64, "steps": 4, "threads": 1, "precision": "fp32",
            "overrides": overrides}
    with tempfile.TemporaryDirectory() as out:
        loop.train(load_config(None, lmpo_overrides(spec, out)))
    for t, name, rss, peak in marks:
        print(f"{t:8.2f}s  {name:38s} RSS {rss:.2f} GB   high-water {peak:.2f} GB")
    print(f"update CPU-s per step: {[round(c, 2) for c in cpu]}")
    print(f"peak RSS (high-water): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


if __name__ == "__main__":
    main(sys.argv[1:])
