"""AdamW applied during backward: every gradient is folded into the optimizer's moments as soon as autograd has
produced it, then freed, so the gradients of all weights never exist at once (under full fine-tuning a buffer the
size of the weights).

The update is ``torch.nn.utils.clip_grad_norm_`` followed by ``torch.optim.AdamW.step()``, the trainer's normal path:

    c   = min(1, max_norm / (||g|| + 1e-6))        ||g|| = the 2-norm of every trainable weight's gradient
    m  <- b1 m + (1 - b1) c g                      v <- b2 v + (1 - b2) (c g)^2
    p  <- p (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)

The clip factor ``c`` needs the whole gradient's norm, which is known only when backward ends. So backward folds
each gradient into the moments with a guessed factor ``c0`` (1, or the previous step's factor when that step clipped;
saved in checkpoints) and adds its norm to the total; the weights move only after backward, from the moments alone.
When the total gives ``c = c0`` (every step that does not clip, after one that did not) this is the normal path up
to float rounding. Else backward runs a second time over the retained graph (the loss is not evaluated again, so
stateful losses see one step) and each gradient corrects its moments: ``m_old = (m' - (1 - b1) c0 g) / b1``,
likewise ``v_old`` (clamped at 0), then the update with ``c g``; a weight's first step needs no recovery (its
moments were exactly 0). Recovering ``v_old`` costs an absolute error of about one rounding unit of ``v'``: relative
to the new ``v`` that is ``~1e-7 (c0 / c)^2`` where the squared gradient dominates the running moment, so the guess
keeps it at rounding level while clipping persists, and a sudden jump (``c0 = 1``, ``c`` << 1) bounds it by
``~1e-7 / c^2`` for those entries on that step (tests/unit/test_inbackward.py). The second backward costs about two
thirds of an update (a forward more under activation checkpointing), only on steps whose factor changed and whose
gradient is not zero.

The optimizer stays a ``torch.optim.AdamW``: its state (``step``, ``exp_avg``, ``exp_avg_sq``) is kept in its own
format, so checkpoints, resuming and switching the mode between runs are unchanged. Used by
:func:`lmpo.train.step.policy_update` when ``train.optimizer_in_backward`` allows it.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from lmpo.engine.kernels import rowdot

MIN_TRAINABLE = 10_000_000
"""``train.optimizer_in_backward: auto`` needs this many trainable parameters (full fine-tuning of real models; LoRA
adapters and the tiny test models keep the plain optimizer step)."""


def wanted(setting, params, single_use: bool) -> bool:
    """Whether ``train.optimizer_in_backward`` (auto|true|false) applies.

    ``auto``: with 10M+ trainable parameters when the training forward uses every weight once per pass
    (``single_use``): the packed forward of :mod:`lmpo.engine.packed` (the default for Llama-family models), or
    Hugging Face's under activation checkpointing. Only there does it pay: a weight's gradient can be freed at once
    only when its single use has run backward. Hugging Face's forward with the group's prompt run once
    (``lmpo.models.logprobs.shared_prompt_rows``) gives every weight two uses, the prompt pass's backward running
    last, so autograd holds each gradient until the end anyway, while the replay-ready retained graph keeps the
    activations the plain path frees as it goes, so folding there raised the measured peak. With the packed forward
    (heap trimmed, lmpo.engine.tuning.trim_heap) and under Hugging Face's checkpointing folding lowers it (figures:
    docs/results/performance.md).
    """
    if setting is True or setting is False:
        return setting
    return single_use and sum(p.numel() for p in params) >= MIN_TRAINABLE


def unsupported(optimizer) -> str | None:
    """Why ``optimizer`` cannot be applied during backward, or ``None`` when it can."""
    if type(optimizer) is not torch.optim.AdamW:
        return f"it needs torch.optim.AdamW, got {type(optimizer).__name__}"
    for group in optimizer.param_groups:
        for key in ("amsgrad", "maximize", "differentiable"):
            if group.get(key):
                return f"AdamW with {key}=True is not supported"
        if group.get("decoupled_weight_decay") is False:
            return "AdamW without decoupled weight decay is not supported"
    return None


class BackwardAdamW:
    """Runs backward with ``optimizer`` (a ``torch.optim.AdamW``) folded into it; see the module docstring.

    ``grad_norm = inb.backward(loss, max_norm)`` replaces ``loss.backward(); clip_grad_norm_(...)`` and leaves no
    ``.grad``; ``inb.step()`` replaces ``optimizer.step()`` (reading each group's current ``lr``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        why = unsupported(optimizer)
        if why:
            raise ValueError(f"train.optimizer_in_backward: {why}.")
        self.optimizer = optimizer
        self.group = {p: g for g in optimizer.param_groups for p in g["params"]}
        self.order = {p: i for i, p in enumerate(self.group)}
        self.norms: dict[torch.nn.Parameter, Tensor] = {}  # weights that received a gradient in this backward
        self.coef: Tensor | None = None
        self.guess = 1.0  # the clip factor the first pass assumes: 1, or the last step's when that one clipped
        self.replays = 0  # backward passes repeated because the clip factor was not the guess (a metric)
        # the weight update in one pass over memory (lmpo.engine.kernels.rowdot.adam_apply) for float32 CPU weights; the
        # moments keep torch's operations, whose rounding the replay's recovery undoes exactly
        self.kernel = rowdot.available()

    def state_dict(self) -> dict[str, float]:
        return {"guess": self.guess, "replays": self.replays}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.guess, self.replays = float(state["guess"]), int(state["replays"])

    # ------------------------------------------------------------------ backward
    def backward(self, loss: Tensor, max_norm: float | None) -> Tensor:
        """Backward of ``loss`` with the moments updated on the fly; returns the gradient's total 2-norm (before
        clipping, as ``clip_grad_norm_`` does). A non-finite norm is returned as is (the caller stops the run:
        the moments then hold it, the weights do not)."""
        self.norms, self.coef = {}, None
        clip = max_norm is not None and math.isfinite(max_norm)
        with self._hooks(self._first):
            loss.backward(retain_graph=clip)
        if not self.norms:
            return torch.zeros(())
        total = torch.linalg.vector_norm(torch.stack([self.norms[p] for p in sorted(self.norms, key=self.order.get)]))
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0) if clip else torch.ones(())
        # A zero gradient (a group whose rewards are all equal) was folded exactly whatever the guess: no replay, and
        # the guess stays for the next step.
        if torch.isfinite(total) and float(total) > 0:
            if float(coef) != self.guess:
                self.coef = coef
                self.replays += 1
                with self._hooks(self._replay):
                    loss.backward()
            self.guess = float(coef)
        return total

    @contextlib.contextmanager
    def _hooks(self, fn):
        params = [p for p in self.group if p.requires_grad]
        handles = [p.register_post_accumulate_grad_hook(fn) for p in params]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for p in params:  # a failed backward must not leave gradients behind
                p.grad = None

    def _state(self, p: Tensor) -> dict[str, Tensor]:
        st = self.optimizer.state[p]
        if not st:  # torch's AdamW layout (fused / capturable keep ``step`` on the weight's device)
            fused = bool(self.group[p].get("fused") or self.group[p].get("capturable"))
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    @torch.no_grad()
    def _first(self, p: Tensor) -> None:
        g = p.grad.to_dense() if p.grad.is_sparse else p.grad
        b1, b2 = self.group[p]["betas"]
        st = self._state(p)
        self.norms[p] = torch.linalg.vector_norm(g)
        if self.guess != 1.0:
            g = g * self.guess
        st["exp_avg"].lerp_(g, 1 - b1)
        st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
        p.grad = None

    @torch.no_grad()
    def _replay(self, p: Tensor) -> None:
        g = p.grad.to_dense() if p.grad.is_sparse else p.grad
        b1, b2 = self.group[p]["betas"]
        st = self._state(p)
        m, v = st["exp_avg"], st["exp_avg_sq"]
        gc = g * self.coef  # what clip_grad_norm_ leaves in .grad
        if float(st["step"]) == 0:  # the moments were exactly zero before this backward
            torch.mul(gc, 1 - b1, out=m)
            torch.mul(gc, gc, out=v).mul_(1 - b2)
        else:
            if self.guess != 1.0:  # what the first pass folded in
                g = g * self.guess
            m.sub_(g, alpha=1 - b1).div_(b1).lerp_(gc, 1 - b1)
            v.addcmul_(g, g, value=-(1 - b2)).div_(b2).clamp_(min=0).mul_(b2).addcmul_(gc, gc, value=1 - b2)
        p.grad = None

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def step(self) -> None:
        """Move every weight that received a gradient in the last :meth:`backward` (AdamW's formula, its moments
        already updated)."""
        self.optimizer._opt_called = True  # what optimizer.step() records for the LR scheduler's order check
        if not self.norms:
            return
        largest = max(w.numel() for w in self.norms)
        buf: Tensor | None = None  # the denominator of each weight in turn, allocated once
        for p in self.norms:
            group = self.group[p]
            b1, b2 = group["betas"]
            lr, wd, eps = float(group["lr"]), group["weight_decay"], group["eps"]
            st = self.optimizer.state[p]
            st["step"] += 1
            t = float(st["step"])
            bc1, bc2_sqrt = 1 - b1**t, math.sqrt(1 - b2**t)
            if self.kernel and rowdot.flat_float32(p, st["exp_avg"], st["exp_avg_sq"]):
                rowdot.adam_apply(p, st["exp_avg"], st["exp_avg_sq"], 1 - lr * wd, lr / bc1, bc2_sqrt, eps)
                continue
            if wd:
                p.mul_(1 - lr * wd)
            if buf is None or buf.dtype != p.dtype or buf.device != p.device:
                buf = torch.empty(largest, dtype=p.dtype, device=p.device)
            denom = torch.sqrt(st["exp_avg_sq"], out=buf[: p.numel()].view_as(p)).div_(bc2_sqrt).add_(eps)
            p.addcdiv_(st["exp_avg"], denom, value=-lr / bc1)
        self.norms = {}
