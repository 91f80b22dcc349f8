"""Metrics: an append-only JSONL log per run, reward/accuracy curves as PNG, peak memory."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import torch


def to_float(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().item())
    return v


def peak_rss_gb() -> float:
    """Peak resident memory of this process in GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class MetricsLog:
    """``metrics.jsonl`` writer; on resume, lines after the checkpoint's step are dropped (they will be redone)."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        elif resume_step is None:
            self.path.write_text("")

    def write(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        row = {"step": step, **{k: to_float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return row


def read_metrics(path: Path) -> list[dict[str, Any]]:
    p = Path(path)
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(rows: list[dict[str, Any]], out: Path, title: str) -> None:
    """Training reward per step and held-out accuracy / reward, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    x, y = series(rows, "reward/mean")
    ax[0].plot(x, y, marker=".", label="train reward (mean)")
    ax[0].set_xlabel("step"), ax[0].set_ylabel("reward"), ax[0].set_title("training rollouts")
    for key, label in (("eval/accuracy", "held-out accuracy (greedy)"), ("eval/reward", "held-out reward")):
        x, y = series(rows, key)
        if x:
            ax[1].plot(x, y, marker="o", label=label)
    ax[1].set_xlabel("step"), ax[1].set_title("held-out evaluation"), ax[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
