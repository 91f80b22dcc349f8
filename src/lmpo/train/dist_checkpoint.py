"""Sharded checkpoints of a run on several ranks, written with ``torch.distributed.checkpoint`` (DCP).

``checkpoints/step_000010/`` then holds

    sharded/            DCP's files: the trainable weights and the AdamW states (each rank writes its shards;
                        replicated tensors, as under DDP, are written once), and DCP's .metadata
    state.pt            step, scheduler, data position, components, evaluation-before (rank 0; the same on every rank)
    rng_rank<r>.pt      rank r's RNG states (each rank samples from its own stream)

Atomic as the single-process format (lmpo.train.checkpoint): every rank writes into ``.tmp-step_000010-dist``, a
barrier waits for all of them, then rank 0 moves the folder into place with one ``os.replace`` and rewrites the
``latest`` pointer. A run killed at any moment leaves the previous checkpoint or the new one.

Resuming on the same number of ranks restores everything, RNG states included: the resumed run equals the
uninterrupted one. DCP reshards on load, so another number of ranks (or one process, e.g. ``lmpo eval``) loads the
weights and optimizer states too; a rank with no saved RNG state then starts a fresh stream seeded by
(train.seed, rank, step), so that resume is no longer bit-exact (docs/distributed.md).
"""

from __future__ import annotations

import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmpo.train.checkpoint import LATEST, CorruptCheckpoint, _atomic_write_text, _read, rng_state

SHARDED = "sharded"


def is_sharded(ckpt: Path) -> bool:
    return (Path(ckpt) / SHARDED).is_dir()


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True)  # the trained parameters only (LoRA: the adapters)


def _barrier(dist) -> None:
    if dist is not None:
        dist.barrier()


def save(run_dir: Path, step: int, model, optimizer, scheduler, dist, extra: dict[str, Any], keep: int = 1) -> Path:
    """Every rank calls this at the same step (it is collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    main = dist is None or dist.main
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step_{step:06d}", root / f".tmp-step_{step:06d}-dist"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(dist)
    msd, osd = get_state_dict(model, optimizer, options=_options())
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / SHARDED))
    rank = dist.rank if dist is not None else 0
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if main:
        torch.save({"step": step, "scheduler": scheduler.state_dict(), "world_size": dist.world if dist else 1,
                    "rng": None, **extra}, tmp / "state.pt")
    _barrier(dist)  # every rank's files are in the temporary folder
    if main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(root / LATEST, final.name)
        old = sorted(p for p in root.glob("step_*") if p.is_dir() and p != final)
        for p in old[: max(0, len(old) - (keep - 1))] if keep >= 1 else []:
            shutil.rmtree(p, ignore_errors=True)
    _barrier(dist)
    return final


def fresh_rng(seed: int, rank: int, step: int) -> dict[str, Any]:
    """A new RNG stream for a rank the checkpoint has none for (it was written on fewer ranks)."""
    keep = rng_state()
    s = (int(seed) * 1_000_003 + 7_919 * int(rank) + 104_729 * int(step)) % (2**32)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    out = rng_state()
    torch.set_rng_state(keep["torch"])
    random.setstate(keep["python"])
    np.random.set_state(keep["numpy"])
    return out


def load(path: Path, model, optimizer, scheduler, dist, seed: int = 0) -> dict[str, Any]:
    """Restore a sharded checkpoint into ``model`` / ``optimizer`` (either may be wrapped or not; on any number of
    ranks, or in one process); returns state.pt's dict with this rank's RNG states under ``"rng"``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    state = _read(path, "state.pt", weights_only=False)
    if not isinstance(state, dict) or not {"step", "scheduler"} <= set(state):
        raise CorruptCheckpoint(path, "state.pt", "it lacks the step and scheduler states lmpo saves")
    msd, osd = get_state_dict(model, optimizer, options=_options()) if optimizer is not None else \
        (get_state_dict(model, [], options=_options())[0], None)
    sd = {"model": msd} if osd is None else {"model": msd, "optim": osd}
    try:
        with warnings.catch_warnings():  # read in one process (lmpo eval, a 1-process resume): expected, say nothing
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(sd, checkpoint_id=str(path / SHARDED))
    except Exception as exc:  # noqa: BLE001 - DCP raises several kinds on a missing or foreign shard
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CorruptCheckpoint(path, SHARDED, f"{type(exc).__name__}: {detail}") from None
    if osd is None:
        set_state_dict(model, [], model_state_dict=sd["model"], optim_state_dict={}, options=_options())
    else:
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                       options=_options())
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    rank = dist.rank if dist is not None else 0
    rng_file = path / f"rng_rank{rank}.pt"
    state["rng"] = (_read(path, rng_file.name, weights_only=False) if rng_file.is_file()
                    else fresh_rng(seed, rank, state["step"]))
    return state


def load_whole(path: Path, model, optimizer, scheduler, dist, seed: int = 0) -> dict[str, Any]:
    """A single process's checkpoint (lmpo.train.checkpoint: whole tensors, the optimizer's states by parameter
    index) into a model on several ranks, DDP or FSDP2: every rank reads the files and keeps its part
    (``set_state_dict`` with whole state dicts); this rank's RNG states are fresh unless it is rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from lmpo.train.checkpoint import _check_weights

    path = Path(path)
    weights = _read(path, "model.pt", weights_only=True)
    state = _read(path, "state.pt", weights_only=False)
    osd = _read(path, "optimizer.pt", weights_only=False)
    if not isinstance(state, dict) or not {"step", "scheduler", "rng"} <= set(state):
        raise CorruptCheckpoint(path, "state.pt", "it lacks the step, scheduler and RNG states lmpo saves")
    _check_weights(path, weights, dict(model.named_parameters()))
    names = [n for n, p in model.named_parameters() if p.requires_grad]  # the optimizer's parameter order
    try:
        by_name = {"state": {names[i]: v for i, v in osd["state"].items()},
                   "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]}
        set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=by_name,
                       options=StateDictOptions(full_state_dict=True, strict=False))
    except Exception as exc:  # noqa: BLE001
        raise CorruptCheckpoint(path, "optimizer.pt", f"it does not fit this run: {type(exc).__name__}: "
                                f"{str(exc)[:200]}") from None
    scheduler.load_state_dict(state["scheduler"])
    if dist is not None and dist.rank > 0:  # the file holds the single process's (rank 0's) RNG states
        state["rng"] = fresh_rng(seed, dist.rank, state["step"])
    return state
