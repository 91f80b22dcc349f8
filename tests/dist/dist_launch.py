"""Start ``torchrun --standalone`` (a free port per launch, so parallel test sessions never collide) for the
multi-process tests of tests/dist, with this checkout's sources first on the import path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), e.get("PYTHONPATH", "")])
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def run(nproc: int, *args: str, cwd: Path | str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun(nproc, *args), cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def lmpo(nproc: int, *args: str, cwd: Path | str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun -m lmpo ...``; one process: ``python -m lmpo ...``, no launcher."""
    if nproc == 1:
        return subprocess.run([sys.executable, "-m", "lmpo", *args], cwd=cwd, env=env(), capture_output=True,
                              text=True, timeout=timeout)
    return run(nproc, "-m", "lmpo", *args, cwd=cwd, timeout=timeout)
