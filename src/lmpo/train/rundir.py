"""Run-folder safety: one writer per run folder, nothing written before the run has validated, nothing lost.

``train()`` uses a :class:`RunFolder` in five places (each one line):

1. ``with RunFolder(run_dir, cfg) as folder:`` around the whole run. The config is copied here, before anything
   (``model.autocast: auto``) is resolved, so ``config.yaml`` keeps what the user asked for. Leaving the block
   releases the lock; a fresh start that failed before it logged a training step removes what it wrote (the
   folder too, when nothing else is in it), so a failed first start leaves no folder behind.
2. ``plan = folder.plan(resume, overwrite, cfg.train.steps)`` before anything is built. Read-only checks: an
   existing folder is locked at once (a second writer fails here, before building a model, with the holder's
   pid); ``--resume`` needs a checkpoint and cannot shorten a run; a fresh start refuses a folder that holds
   checkpoints, or training metrics without a checkpoint, unless ``--overwrite``; ``output.dir`` must be usable.
3. ``if plan.finished: return ... folder.finished_run()``: the latest checkpoint is at ``train.steps``; say so,
   change nothing (``summary.json`` is only rebuilt when missing or describing another step).
4. ``folder.begin(plan)`` after the config, components, rewards, model and checkpoint have all been built and
   loaded: the first write. Creates and locks the folder (re-checking it did not change meanwhile), removes stale
   temporaries of a killed checkpoint write, clears the old run for ``--overwrite``, drops a ``summary.json`` that
   the resumed run will supersede, and writes ``config.yaml`` atomically.
5. ``folder.write_summary({...})`` at the end: ``summary.json`` (atomically); its ``steps`` is the step of the
   checkpoint it describes, which is always the latest one.

The lock is ``flock`` on ``<run>/.lock`` (which holds the holder's pid and host): the kernel releases it when the
holder exits for any reason, ``kill -9`` included, so there are no stale locks to clean up.
"""

from __future__ import annotations

import copy
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmpo.config import Config, check_writable_folder, save_config
from lmpo.errors import ConfigError, LmpoError
from lmpo.train.checkpoint import latest_checkpoint
from lmpo.train.metrics import read_metrics

LOCK_NAME = ".lock"
SUMMARY = "summary.json"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
# What a run writes; --overwrite clears these (other files in the folder are left alone).
RUN_FILES = (CONFIG, METRICS, SUMMARY, "curves.png")


class RunFolderBusy(LmpoError):
    """Another process holds the run folder's lock."""


@dataclass(frozen=True)
class Plan:
    """What ``train()`` will do in its run folder (decided before anything is built or written)."""

    checkpoint: Path | None  # resume from this checkpoint (None: a fresh start)
    step: int  # the checkpoint's step (0 for a fresh start)
    steps: int  # train.steps
    finished: bool  # the latest checkpoint is at train.steps: nothing to train
    overwrite: bool  # a fresh start that clears the previous run's files first


def checkpoint_step(ckpt: Path) -> int:
    m = re.fullmatch(r"step_(\d+)", ckpt.name)
    if not m:
        raise LmpoError(f"Checkpoint folder {str(ckpt)!r} is not named step_NNNNNN; cannot tell its step.")
    return int(m.group(1))


def trained_steps(run_dir: Path) -> list[int]:
    """Steps >= 1 logged in ``metrics.jsonl`` (step 0 is the evaluation before training, reproducible at will)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue  # a torn line still shows the run got that far; count what can be read
        if isinstance(step, int) and step >= 1:
            steps.append(step)
    return steps


class RunFolder:
    def __init__(self, path: Path | str, cfg: Config | None = None):
        self.path = Path(path)
        self._cfg = copy.deepcopy(cfg) if cfg is not None else None  # as given: config.yaml keeps "auto" etc.
        self._fd: int | None = None
        self._created: list[Path] = []  # folders this process created (removed again if a fresh start fails)
        self._fresh = False  # begin() ran for a fresh start (no checkpoint resumed)
        self._begun = False

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(failed=exc_type is not None)

    # ------------------------------------------------------------------ lock
    def holder(self) -> str:
        """The pid (and host) recorded by the lock's holder, as text."""
        try:
            text = (self.path / LOCK_NAME).read_text().split()
        except OSError:
            text = []
        if not text:
            return "pid unknown"
        return f"pid {text[0]}" + (f" on {text[1]}" if len(text) > 1 and text[1] != socket.gethostname() else "")

    def acquire(self) -> None:
        """Take the folder's lock (creating the folder); raises :class:`RunFolderBusy` naming the holder's pid."""
        self._lock(create=True)

    def _lock(self, create: bool) -> bool:
        """Take the lock (creating the folder if ``create``); False if the folder does not exist and not ``create``."""
        if self._fd is not None:
            return True
        if not self.path.is_dir():
            if not create:
                return False
            self._mkdir()
        try:
            fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"Cannot write in run folder {str(self.path)!r} ({exc.strerror}); check output.dir "
                              "and its permissions.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"Cannot lock run folder {str(self.path)!r} ({exc.strerror}).") from None
            raise RunFolderBusy(
                f"Run folder {str(self.path)!r} is in use by another lmpo process ({self.holder()}). Two runs "
                "writing one folder would mix their metrics and checkpoints: wait for it to finish (or stop it), "
                "or pick another output.run_name."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return True

    def _mkdir(self) -> None:
        missing = []
        p = self.path
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"Cannot create run folder {str(self.path)!r} ({exc.strerror}); check output.dir.") from None
        self._created = missing  # innermost first

    def release(self, failed: bool = False) -> None:
        """Unlock; after a failed fresh start with no training step logged, remove what this process wrote."""
        if failed and self._fresh and self._fd is not None and not trained_steps(self.path) \
                and latest_checkpoint(self.path) is None:
            for name in (CONFIG, METRICS, "curves.png"):
                (self.path / name).unlink(missing_ok=True)
            try:
                remaining = {p.name for p in self.path.iterdir()}
            except OSError:
                remaining = {""}
            if remaining <= {LOCK_NAME, "checkpoints"}:
                shutil.rmtree(self.path, ignore_errors=True)
                for d in self._created[1:]:  # the parent folders this process created, innermost first
                    try:
                        d.rmdir()
                    except OSError:
                        break
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    # ------------------------------------------------------------------ checks (read-only)
    def _check_output_dir(self) -> None:
        check_writable_folder(self.path, "output.dir", str(self.path.parent))

    def plan(self, resume: bool, overwrite: bool, steps: int) -> Plan:
        """Decide what to do in the folder, refusing anything that would lose a run; writes nothing but the lock
        file of an existing folder."""
        self._check_output_dir()
        self._lock(create=False)  # an existing folder: a second writer fails here, at once
        where = str(self.path)
        ckpt = latest_checkpoint(self.path)
        if resume:
            if ckpt is None:
                logged = trained_steps(self.path)
                why = (f" Its metrics.jsonl logs {len(logged)} training steps (up to step {max(logged)}), but the run "
                       "stopped before its first checkpoint (output.checkpoint_every); start it again with "
                       "--overwrite instead of --resume." if logged else " Start the run without --resume.")
                raise LmpoError(f"--resume: no checkpoint found under {where!r}.{why}")
            step = checkpoint_step(ckpt)
            if step > steps:
                raise LmpoError(
                    f"--resume: run {where!r} is already at step {step}, past train.steps={steps}; a run cannot be "
                    f"shortened. Evaluate it with `lmpo eval {where}`, or raise train.steps to continue it.")
            return Plan(ckpt, step, steps, finished=step == steps, overwrite=False)
        if ckpt is not None and not overwrite:
            raise LmpoError(
                f"Run folder {where!r} already holds checkpoints (latest: step {checkpoint_step(ckpt)}). Continue it "
                "with --resume, pick another output.run_name, or pass --overwrite to start over (its checkpoints "
                "will be replaced).")
        if ckpt is None and not overwrite:
            logged = trained_steps(self.path)
            if logged:
                raise LmpoError(
                    f"Run folder {where!r} holds metrics of {len(logged)} training steps (up to step {max(logged)}) "
                    "but no checkpoint: a run that stopped before its first checkpoint (output.checkpoint_every), "
                    "so it cannot be resumed. Pass --overwrite to replace it, or pick another output.run_name.")
        return Plan(None, 0, steps, finished=False, overwrite=overwrite)

    # ------------------------------------------------------------------ a finished run
    def finished_run(self, plan: Plan) -> dict[str, Any]:
        """Say the run is finished and return its results (``eval_before``, ``eval_after``, ``history``) unchanged.

        ``summary.json`` is rewritten only when it is missing or describes another step (a run killed between
        its last checkpoint and its summary): it is then rebuilt from the checkpoint and ``metrics.jsonl``."""
        history = read_metrics(self.path / METRICS)
        summary = self.read_summary()
        if summary is None or summary.get("steps") != plan.step:
            summary = self._rebuild_summary(plan, history)
            self.write_summary(summary)
        print(f"lmpo: run {str(self.path)!r} is already finished (its latest checkpoint is step {plan.step} of "
              f"train.steps={plan.steps}); nothing to train, nothing changed. Raise train.steps to continue it, or "
              f"evaluate it with `lmpo eval {self.path}`.", file=sys.stderr, flush=True)
        return {"eval_before": summary.get("eval_before", {}), "eval_after": summary.get("eval_after", {}),
                "history": history}

    def _rebuild_summary(self, plan: Plan, history: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        try:
            state = torch.load(plan.checkpoint / "state.pt", map_location="cpu", weights_only=False)
            eval_before = state.get("eval_before", {})
        except Exception:  # noqa: BLE001 - any unreadable state: the summary just lacks the "before" numbers
            eval_before = {}
        row = next((r for r in reversed(history) if r.get("step") == plan.step), {})
        return {"eval_before": eval_before, "eval_after": {k: v for k, v in row.items() if k.startswith("eval/")},
                "steps": plan.step, "peak_rss_gb": None, "autocast": None, "threads": None,
                "rebuilt": True}

    def read_summary(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.path / SUMMARY).read_text())
        except (OSError, ValueError):
            return None

    # ------------------------------------------------------------------ the first write
    def begin(self, plan: Plan) -> None:
        """Everything has validated: lock (creating the folder), clean up, write ``config.yaml``."""
        had_lock = self._fd is not None
        self._lock(create=True)
        if not had_lock:  # the folder was created or appeared meanwhile: the plan must still hold
            again = self.plan(plan.checkpoint is not None, plan.overwrite, plan.steps)
            if again != plan:
                raise LmpoError(f"Run folder {str(self.path)!r} changed while this run was starting (another "
                                "process wrote to it); run the command again.")
        self._fresh = plan.checkpoint is None
        self._begun = True
        self.remove_stale_temporaries()
        if plan.overwrite:
            shutil.rmtree(self.path / "checkpoints", ignore_errors=True)
            for name in RUN_FILES:
                (self.path / name).unlink(missing_ok=True)
        elif plan.checkpoint is not None:
            # the resumed run trains past the checkpoint this summary describes; a new one is written at its end
            (self.path / SUMMARY).unlink(missing_ok=True)
        if self._cfg is not None:
            self.write_config(self._cfg)

    def remove_stale_temporaries(self) -> list[Path]:
        """Temporary files and folders of writes that were killed midway (only the lock holder may call this)."""
        stale = [*self.path.glob("checkpoints/.tmp-step_*"), *self.path.glob("checkpoints/.latest.tmp-*"),
                 *self.path.glob(".*.tmp-*")]
        for p in stale:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        return stale

    def _atomic(self, name: str, write) -> None:
        final = self.path / name
        tmp = self.path / f".{name}.tmp-{os.getpid()}"
        write(tmp)
        os.replace(tmp, final)

    def write_config(self, cfg: Config) -> None:
        self._atomic(CONFIG, lambda p: save_config(cfg, p))

    def write_summary(self, summary: dict[str, Any]) -> None:
        """``summary.json``, atomically; ``summary["steps"]`` must be the step of the latest checkpoint."""
        self._atomic(SUMMARY, lambda p: p.write_text(json.dumps(summary, indent=2)))
