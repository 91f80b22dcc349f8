"""Metrics: an append-only JSONL log per run, reward/accuracy curves as PNG, peak memory."""

from __future__ import annotations

import json
import logging
import resource
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


def to_float(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().item())
    return v


def peak_rss_gb() -> float:
    """Peak resident memory of this process in GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _parse(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], list[int]]:
    """The (line, row) pairs of a ``metrics.jsonl`` and the (1-based) numbers of lines that are not a JSON row with
    a step (a line torn by a kill during its write)."""
    rows, bad = [], []
    for i, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append((line, row))
        else:
            bad.append(i)
    return rows, bad


class MetricsLog:
    """``metrics.jsonl`` writer; on resume, lines after the checkpoint's step are dropped (they will be redone), and
    so are unreadable lines (a kill can tear the last one), with a warning: the checkpoint is the truth."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            rows, bad = _parse(self.path)
            if bad:
                logger.warning("%s: dropped %d unreadable line(s) (line %s; a run killed while writing tears "
                               "its last line); the metrics go on from the checkpoint's step %d.", self.path, len(bad),
                               ", ".join(map(str, bad)), resume_step)
            self.path.write_text("".join(line + "\n" for line, row in rows if row["step"] <= resume_step))
        elif resume_step is None:
            self.path.write_text("")

    def write(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        row = {"step": step, **{k: to_float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return row


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The readable rows of a ``metrics.jsonl`` (a torn line is skipped)."""
    p = Path(path)
    return [row for _, row in _parse(p)[0]] if p.exists() else []


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
    if x or not series(rows, "rewards/margins")[0]:
        ax[0].plot(x, y, marker=".", label="train reward (mean)")
        ax[0].set_xlabel("step"), ax[0].set_ylabel("reward"), ax[0].set_title("training rollouts")
    else:  # a preference run (lmpo.train.preference): the implicit-reward margin and ranking of the step's pairs
        for key, label in (("rewards/margins", "reward margin"), ("rewards/accuracies", "pairs ranked right")):
            ax[0].plot(*series(rows, key), marker=".", label=label)
        ax[0].set_xlabel("step"), ax[0].set_title("training pairs"), ax[0].legend()
    for key, label in (("eval/accuracy", "held-out accuracy (greedy)"), ("eval/reward", "held-out reward"),
                       ("eval/logp_accuracy", "held-out pairs ranked right"),
                       ("eval/reward_accuracy", "held-out pairs, implicit reward")):
        x, y = series(rows, key)
        if x:
            ax[1].plot(x, y, marker="o", label=label)
    ax[1].set_xlabel("step"), ax[1].set_title("held-out evaluation"), ax[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
