"""Atomic, resumable checkpoints.

A checkpoint is a folder ``checkpoints/step_000010/`` holding the trainable weights, optimizer, scheduler, RNG
states, step, data position and the state of stateful components. It is written to a temporary folder and moved
into place with one ``os.replace``; the ``checkpoints/latest`` pointer is then rewritten the same way. A run killed
at any moment therefore leaves either the previous checkpoint or the new one, never a half-written one.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmpo.errors import LmpoError

LATEST = "latest"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only the parameters being trained (all of them for full fine-tuning, the adapters for LoRA), as the weights
    themselves: ``torch.save`` writes each one's own storage, so no copy is made (a copy of full fine-tuning's
    weights raised the run's peak memory by their size at every checkpoint)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, extra: dict[str, Any], keep: int = 1) -> Path:
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f".tmp-step_{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(trainable_state(model), tmp / "model.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state(), **extra}, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(ckpt_root / LATEST, final.name)
    old = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir() and p != final)
    for p in old[: max(0, len(old) - (keep - 1))] if keep >= 1 else []:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpt_root = Path(run_dir) / "checkpoints"
    pointer = ckpt_root / LATEST
    if pointer.is_file():
        path = ckpt_root / pointer.read_text().strip()
        if path.is_dir():
            return path
    steps = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    return steps[-1] if steps else None


def load_checkpoint(path: Path, model, optimizer=None, scheduler=None) -> dict[str, Any]:
    """Restore weights (and optimizer/scheduler if given); returns the saved state dict (step, rng, extras)."""
    try:
        weights = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    except (OSError, RuntimeError) as exc:
        raise LmpoError(f"Checkpoint {str(path)!r} cannot be read ({exc}). Delete it to resume from the one before.") from None
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise LmpoError(
            f"Checkpoint {str(path)!r} does not match the model: {len(missing)} saved tensors (e.g. {missing[0]!r}) "
            "have no parameter of that name. Resume with the same model and LoRA settings the run was started with."
        )
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state
