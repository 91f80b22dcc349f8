"""The device of a run (``device: auto | cpu | cuda | cuda:N``) and what changes with it.

``auto`` is the first CUDA device when ``torch.cuda.is_available()``, else the CPU. :func:`apply_device` resolves it
at a run's start (``setup_process`` / ``setup_inference``) and, on a CUDA device:

- turns off the CPU-only speed knobs left at ``auto`` (``rollout.prepack``: oneDNN's packed weights;
  ``rollout.decode_kernel`` and ``rollout.lean_decode``: lmpo's native C kernels; ``train.optimizer_in_backward``'s
  native AdamW apply) and refuses them when set to ``true``; and marks the process as a CUDA run, so that
  :func:`lmpo.engine.kernels.rowdot.available` answers False without compiling or loading the library (the guard:
  the native kernels never load on a CUDA run, whatever path asks for them);
- resolves ``model.autocast: auto`` to bfloat16 where the GPU supports it (parameters and optimizer state stay
  float32), float32 otherwise;
- resolves ``model.attn_implementation: auto`` to ``sdpa`` (PyTorch's scaled-dot-product attention, which runs the
  flash / memory-efficient kernels under bf16); ``flash_attention_2`` is used only when asked for (it needs the
  ``flash-attn`` package and half-precision parameters).

The rollout batch lives on the host (CPU) between passes: every component (rewards, advantages, selectors, the async
queue, checkpoints) sees host tensors, the log-prob passes return host tensors, and the update moves each
micro-batch to the device with :func:`batch_to_device` (pinned host memory, asynchronous copies). On the CPU all of
this is a no-op: ``Tensor.to`` returns the tensor itself.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from lmpo.errors import ConfigError, did_you_mean

DEVICE_CHOICES = ("auto", "cpu", "cuda")
ATTN_CHOICES = ("auto", "eager", "sdpa", "flash_attention_2")
CPU_ONLY_KNOBS = (("rollout", "prepack"), ("rollout", "decode_kernel"), ("rollout", "lean_decode"))
"""Speed knobs whose fast path exists only on the CPU (native kernels, oneDNN): off on a CUDA run, refused when
``true``."""
CPU_TUNED_KNOBS = (("train", "optimizer_in_backward"),)
"""Knobs measured and tuned on the CPU (their native part is guarded): ``auto`` is off on a CUDA run; ``true`` runs
the plain-torch part there."""

HOST = torch.device("cpu")
"""Where rollout batches live between passes."""

_CUDA_RUN = False  # set by apply_device: this process runs on a CUDA device (rowdot.available() is then False)


def cuda_run() -> bool:
    """True once :func:`apply_device` resolved a CUDA device in this process."""
    return _CUDA_RUN


def set_cuda_run(value: bool) -> None:
    global _CUDA_RUN
    _CUDA_RUN = bool(value)


def valid_device_spec(spec) -> bool:
    return isinstance(spec, str) and (spec in DEVICE_CHOICES or re.fullmatch(r"cuda:\d+", spec) is not None)


def check_device_spec(spec) -> str:
    """``spec`` if it names a device lmpo accepts, else a ConfigError naming ``device``."""
    if valid_device_spec(spec):
        return spec
    raise ConfigError(f"device must be auto, cpu, cuda or cuda:<index>, got {spec!r}"
                      f"{did_you_mean(str(spec), DEVICE_CHOICES)}")


def resolve_device(spec: str = "auto") -> torch.device:
    """The torch device of ``spec``; ``auto`` = ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``."""
    spec = check_device_spec(spec)
    if spec == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if spec == "auto":
        return torch.device("cuda") if available else torch.device("cpu")
    if not available:
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ConfigError(f"device is {spec!r} but torch.cuda.is_available() is False (torch {torch.__version__}, "
                          f"{build}): no usable GPU here. Set device=auto or device=cpu, or install a CUDA torch on "
                          "a machine with a GPU.")
    index = int(spec.split(":")[1]) if ":" in spec else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device is {spec!r} but only {torch.cuda.device_count()} CUDA device(s) are visible "
                          f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1}).")
    return torch.device(spec)


def cuda_bf16() -> bool:
    """Whether the current CUDA device computes in bfloat16 (Ampere and later)."""
    try:
        return bool(torch.cuda.is_bf16_supported())
    except (RuntimeError, AssertionError):
        return False


def apply_device(cfg) -> torch.device:
    """Resolve ``cfg.device`` and settle what depends on it (module docstring); writes the resolved device, the
    knobs, ``model.autocast`` (when ``auto`` on CUDA) and ``model.attn_implementation`` back into ``cfg``."""
    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    set_cuda_run(cuda)
    cfg.device = str(device)
    m = cfg.model
    if m.attn_implementation == "auto":
        m.attn_implementation = "sdpa" if cuda else None
    if not cuda:
        return device
    for section, key in CPU_ONLY_KNOBS:
        part = getattr(cfg, section)
        value = getattr(part, key)
        if value is True:
            raise ConfigError(f"{section}.{key}=true runs lmpo's CPU-only fast path, but this run is on {device}; "
                              f"set {section}.{key}=auto (off on CUDA) or false, or device=cpu.")
        if value == "auto":
            setattr(part, key, False)
    for section, key in CPU_TUNED_KNOBS:
        if getattr(getattr(cfg, section), key) == "auto":
            setattr(getattr(cfg, section), key, False)
    if m.autocast == "auto":
        m.autocast = "bfloat16" if cuda_bf16() else None
    if m.attn_implementation == "flash_attention_2" and m.dtype == "float32":
        raise ConfigError("model.attn_implementation=flash_attention_2 needs half-precision parameters "
                          "(model.dtype=bfloat16 or float16); with float32 parameters use sdpa (the auto choice), "
                          "which runs the flash kernel under bf16 autocast.")
    return device


def run_device() -> torch.device:
    """Where a component's own second model (a judge, a PRM) should live: the GPU on a CUDA run, else the CPU.
    Components hand the trainer host tensors either way (their passes' results come back with ``.cpu()``)."""
    return torch.device("cuda") if cuda_run() else HOST


def peak_gpu_gb() -> float | None:
    """Peak memory allocated by torch on the CUDA device of a CUDA run (GB), None on a CPU run."""
    if not (cuda_run() and torch.cuda.is_available()):
        return None
    return round(torch.cuda.max_memory_allocated() / 1e9, 3)


def rng_devices() -> list[int]:
    """The CUDA devices whose generators ``torch.random.fork_rng`` must fork too: all visible ones on a CUDA run
    (the sampler draws there), none on the CPU."""
    return list(range(torch.cuda.device_count())) if cuda_run() and torch.cuda.is_available() else []


def host_to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``: a host tensor bound for a CUDA device goes through pinned (page-locked) memory with an
    asynchronous copy (the copy overlaps the host's work until a kernel needs it); otherwise ``t.to(device)``, which
    is ``t`` itself when it is already there."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def batch_to_device(batch, device: torch.device):
    """A :class:`lmpo.batch.RolloutBatch` with every tensor (fields and extras) on ``device``; the batch itself when
    nothing has to move."""
    fields = {f: getattr(batch, f) for f in batch._tensor_fields()}
    if all(t.device == device for t in (*fields.values(), *batch.extras.values())):
        return batch
    kw = {f: host_to_device(t, device) for f, t in fields.items()}
    kw["extras"] = {k: host_to_device(v, device) if isinstance(v, Tensor) else v for k, v in batch.extras.items()}
    return batch.replace(**kw)

