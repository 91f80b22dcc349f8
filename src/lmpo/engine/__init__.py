"""The engine: every piece of speed machinery behind one boundary, with one switch.

What lives here (each fast path is tested equal to its reference path):

- ``packed``, ``fused``, ``head``: the packed prompt-once forward of Llama-family models for log-prob passes, its
  fused norm+projection / norm+SwiGLU autograd nodes, and the chunked LM head (reference: Hugging Face's forward);
- ``lean``, ``prepack``, ``kernels``: decode strategies (preallocated key/value buffers; oneDNN pre-packed weights;
  lmpo's native few-row kernels and the native token draw) (reference: Hugging Face's cached forward per token and
  ``torch.multinomial``);
- ``inbackward``, ``optim``: AdamW folded into backward behind the trainer's one optimizer interface
  (reference: ``loss.backward()``, ``clip_grad_norm_``, ``AdamW.step()``);
- ``tuning``: what is measured on the machine at start (bf16 or fp32 autocast) and allocator settings;
- ``device``: ``device: auto|cpu|cuda`` (CUDA turns the CPU-only knobs off and guards the native kernels, resolves
  the GPU's precision and attention kernel, and moves micro-batches to the GPU through pinned memory);
- ``threads``: the intra-op thread count (``train.threads: auto``: available cores, or one where a short probe finds
  one faster) and OpenMP's spin-wait, bounded at ``import lmpo`` so that a busy machine slows a run down gracefully
  (reference: torch's default thread count; the spin bound is process-wide and applies under both modes).

``perf: fast | reference`` (top-level config key) sets every knob below that is left at ``auto``: ``fast`` lets each
choose by measurement or model size (the default), ``reference`` turns every fast path off (the plain PyTorch /
Hugging Face code, for debugging and for checking a fast path). A knob set explicitly always wins. The precision
(``model.autocast``) and memory settings (``model.gradient_checkpointing``, ``train.mmap_threshold_kb``) are not speed
knobs: they change numerics or memory, so they keep their own values under both modes.

Method authors never import this package: components see ``lmpo.ops``, ``lmpo.batch`` and ``lmpo.methods.base``.
"""

from __future__ import annotations

from typing import Any

PERF_MODES = ("fast", "reference")

REFERENCE_KNOBS: dict[tuple[str, str], Any] = {
    ("model", "packed_forward"): False,
    ("rollout", "prepack"): False,
    ("rollout", "decode_kernel"): False,
    ("rollout", "lean_decode"): False,
    ("rollout", "sampler"): "multinomial",
    ("train", "optimizer_in_backward"): False,
    ("train", "threads"): None,
}
"""Each speed knob and its value under ``perf: reference``."""


def apply_perf(cfg) -> None:
    """Resolve the knobs left at ``auto`` for ``cfg.perf`` (in place; ``fast`` leaves them to their measured rule)."""
    if cfg.perf != "reference":
        return
    for (section, key), value in REFERENCE_KNOBS.items():
        part = getattr(cfg, section)
        if getattr(part, key) == "auto":
            setattr(part, key, value)


def setup_process(cfg):
    """Process-wide engine settings of a run, after seeding: intra-op threads (``train.threads: auto`` measured
    here), the allocator's mmap threshold, and the autocast precision measured on this machine (``model.autocast:
    auto``). What ``auto`` resolved to is written back into ``cfg`` (``config.yaml`` keeps what the user asked for,
    so a resumed run measures again). Returns the run's :class:`~lmpo.engine.threads.ThreadTuner` (``auto``
    measures again before long steps; its ``summary()`` goes into ``summary.json``)."""
    from lmpo.engine.device import apply_device
    from lmpo.engine.threads import ThreadTuner
    from lmpo.engine.tuning import resolve_autocast, set_mmap_threshold

    apply_device(cfg)  # device: auto|cpu|cuda, and what it settles (CPU-only knobs, GPU precision, attention)
    tuner = ThreadTuner(cfg.train.threads)
    tuner.apply()
    cfg.train.threads = tuner.threads
    set_mmap_threshold(cfg.train.mmap_threshold_kb)
    cfg.model.autocast = resolve_autocast(cfg.model.autocast)
    return tuner


def setup_inference(cfg) -> None:
    """What ``lmpo eval`` and ``lmpo chat`` share with a run's start: the intra-op thread count (``train.threads``,
    ``auto`` probed once: no re-probing, a session is short) and the measured autocast precision, written back into
    ``cfg``."""
    from lmpo.engine.device import apply_device
    from lmpo.engine.threads import ThreadTuner
    from lmpo.engine.tuning import resolve_autocast

    apply_device(cfg)
    tuner = ThreadTuner(cfg.train.threads)
    tuner.apply()
    cfg.train.threads = tuner.threads
    cfg.model.autocast = resolve_autocast(cfg.model.autocast)
