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

from lmpo.engine.device import cuda_run

from lmpo.errors import LmpoError

LATEST = "latest"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only the parameters being trained (all of them for full fine-tuning, the adapters for LoRA), as the weights
    themselves: ``torch.save`` writes each one's own storage, so no copy is made (a copy of full fine-tuning's
    weights raised the run's peak memory by their size at every checkpoint)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if cuda_run() and torch.cuda.is_available():  # a CUDA run's sampler draws from the GPU's generators
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
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


def _way_out(path: Path) -> str:
    """What to do about an unreadable checkpoint: the truth depends on whether an older one is kept."""
    older = sorted(p for p in path.parent.glob("step_*") if p.is_dir() and p.name < path.name)
    if older:
        return (f"Delete the folder {str(path)!r} to resume from the one before ({older[-1].name}), or pass "
                "--overwrite to start the run over.")
    return ("It is the run's only checkpoint, so the run cannot be resumed: start it over with --overwrite (its "
            "checkpoints and metrics are replaced) or train into another output.run_name.")


class CorruptCheckpoint(LmpoError):
    """A checkpoint file is missing, truncated or not what lmpo wrote."""

    def __init__(self, path: Path, name: str, why: str):
        super().__init__(f"Checkpoint file {str(path / name)!r} cannot be read ({why}): it is missing, empty, cut "
                         f"short or damaged. {_way_out(path)}")


def _read(path: Path, name: str, weights_only: bool) -> Any:
    """``torch.load`` of one checkpoint file; any failure (EOFError, UnpicklingError, ...) names the file."""
    try:
        return torch.load(path / name, map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many kinds on a damaged file
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "no data"
        raise CorruptCheckpoint(path, name, f"{type(exc).__name__}: {detail}") from None


def _restore(path: Path, name: str, fn, value) -> None:
    """``fn(value)`` (a ``load_state_dict``); an error means the file is not what this run wrote."""
    try:
        fn(value)
    except Exception as exc:  # noqa: BLE001
        why = f"it does not fit this run: {type(exc).__name__}: {str(exc)[:200]}"
        raise CorruptCheckpoint(path, name, why) from None


def _check_weights(path: Path, weights: Any, params: dict[str, torch.Tensor]) -> None:
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise CorruptCheckpoint(path, "model.pt", f"it holds a {type(weights).__name__}, not named tensors")
    missing = [n for n in weights if n not in params]
    if missing:
        raise LmpoError(
            f"Checkpoint {str(path)!r} does not match the model: {len(missing)} saved tensors (e.g. {missing[0]!r}) "
            "have no parameter of that name. Resume with the same model and LoRA settings the run was started with."
        )
    wrong = [n for n, t in weights.items() if t.shape != params[n].shape]
    if wrong:
        n = wrong[0]
        raise LmpoError(
            f"Checkpoint {str(path)!r} does not match the model: {n!r} was saved with shape {tuple(weights[n].shape)} "
            f"but the model's is {tuple(params[n].shape)}. Resume with the same model and LoRA settings the run was "
            "started with."
        )


def load_checkpoint(path: Path, model, optimizer=None, scheduler=None) -> dict[str, Any]:
    """Restore weights (and optimizer/scheduler if given); returns the saved state dict (step, rng, extras).

    A missing, empty, truncated or foreign file raises :class:`CorruptCheckpoint` naming it and the way out.
    """
    path = Path(path)
    weights = _read(path, "model.pt", weights_only=True)  # every file is read before anything is restored
    state = _read(path, "state.pt", weights_only=False)
    if not isinstance(state, dict) or not {"step", "scheduler", "rng"} <= set(state):
        raise CorruptCheckpoint(path, "state.pt", "it lacks the step, scheduler and RNG states lmpo saves")
    optim_state = _read(path, "optimizer.pt", weights_only=False) if optimizer is not None else None
    params = dict(model.named_parameters())
    _check_weights(path, weights, params)
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    if optimizer is not None:
        _restore(path, "optimizer.pt", optimizer.load_state_dict, optim_state)
    if scheduler is not None:
        _restore(path, "state.pt", scheduler.load_state_dict, state["scheduler"])
    return state
