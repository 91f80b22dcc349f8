"""The trainer's optimizer: AdamW with its learning-rate schedule behind one interface.

    opt.zero_grad()
    for each micro-batch:  opt.backward(loss, whole=<this loss is the optimizer step's whole loss>)
    grad_norm = opt.clip()            # the gradient's total 2-norm before clipping (clip_grad_norm_'s value)
    opt.step(lr_scale)                # one AdamW step at lr x lr_scale, then the scheduler advances

Two implementations of the same update: :class:`TrainOptimizer` (``loss.backward()``, ``clip_grad_norm_``,
``optimizer.step()`` of any torch optimizer; AdamW in training) and :class:`FoldedAdamW`, which folds AdamW into backward when an optimizer step's
loss comes from one backward (:mod:`lmpo.engine.inbackward`; with several micro-batches it takes the plain path for
that step). ``train.optimizer_in_backward`` chooses (:func:`build_optimizer`); the trainer never branches on it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lmpo.engine import inbackward


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, kind: str, total: int):
    """Linear warm-up over ``warmup_steps`` optimizer steps, then constant, linear or cosine decay to ``total``."""

    def factor(i: int) -> float:
        if warmup_steps and i < warmup_steps:
            return (i + 1) / warmup_steps
        frac = min(1.0, (i - warmup_steps) / max(1, total - warmup_steps))
        return {"constant": 1.0, "linear": 1.0 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[kind]

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class TrainOptimizer:
    """A torch optimizer with gradient clipping and a learning-rate schedule, stepped as the module docstring says."""

    folded = None  # the in-backward AdamW (FoldedAdamW only)
    replays = 0  # backward passes repeated because the clip factor changed (FoldedAdamW only)

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler, max_grad_norm: float | None) -> None:
        self.optimizer, self.scheduler, self.max_grad_norm = optimizer, scheduler, max_grad_norm
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: Tensor, whole: bool) -> None:
        loss.backward()

    def clip(self) -> Tensor:
        max_norm = self.max_grad_norm if self.max_grad_norm else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2's sharded gradients: the total

    def _apply(self) -> None:
        self.optimizer.step()

    def step(self, lr_scale: float | None = None) -> None:
        base = [g["lr"] for g in self.optimizer.param_groups]
        if lr_scale is not None:
            for g in self.optimizer.param_groups:
                g["lr"] = g["lr"] * float(lr_scale)
        self._apply()
        for g, lr in zip(self.optimizer.param_groups, base):
            g["lr"] = lr
        self.scheduler.step()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FoldedAdamW(TrainOptimizer):
    """The same update with AdamW folded into backward whenever one backward holds the whole step's loss."""

    def __init__(self, optimizer: torch.optim.AdamW, scheduler, max_grad_norm: float | None) -> None:
        super().__init__(optimizer, scheduler, max_grad_norm)
        self.folded = inbackward.BackwardAdamW(optimizer)
        self._norm: Tensor | None = None  # set by a folded backward, consumed by clip()

    @property
    def replays(self) -> int:  # type: ignore[override]
        return self.folded.replays

    def backward(self, loss: Tensor, whole: bool) -> None:
        self._norm = self.folded.backward(loss, self.max_grad_norm) if whole else None
        if not whole:
            loss.backward()

    def clip(self) -> Tensor:
        return self._norm if self._norm is not None else super().clip()

    def _apply(self) -> None:
        if self._norm is not None:
            self.folded.step()
        else:
            self.optimizer.step()
        self._norm = None

    def state_dict(self) -> dict:
        return self.folded.state_dict()  # its clip-factor guess, so a resumed run folds as the uninterrupted one

    def load_state_dict(self, state: dict) -> None:
        self.folded.load_state_dict(state)


def build_optimizer(params: list[Tensor], t, total_steps: int, single_use: bool) -> TrainOptimizer:
    """AdamW over ``params`` with the schedule of the training settings ``t`` (``lmpo.config.TrainConfig``); folded
    into backward when ``train.optimizer_in_backward`` allows (:func:`lmpo.engine.inbackward.wanted`; ``single_use``:
    the training forward uses every weight once per pass)."""
    # fused AdamW: the same update in far less CPU time and memory than foreach (docs/results/performance.md)
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay,
                                  betas=(t.adam_beta1, t.adam_beta2),
                                  fused=all(p.device.type in ("cpu", "cuda") for p in params))
    scheduler = make_scheduler(optimizer, t.warmup_steps, t.lr_scheduler, total_steps)
    cls = FoldedAdamW if inbackward.wanted(t.optimizer_in_backward, params, single_use) else TrainOptimizer
    return cls(optimizer, scheduler, t.max_grad_norm)
