"""Fused autograd nodes of a Llama-family decoder layer that keep less for backward than the chain of operations
they replace (used by :mod:`lmpo.models.packed`).

- :class:`NormLinears`: ``y = w * x * rsqrt(mean(x^2) + eps)`` (Hugging Face's RMSNorm in float32) followed by any
  number of projections ``y @ W_i^T + b_i``; keeps ``x`` and the rsqrt, recomputes ``y`` in backward.
- :class:`NormSwiGLU`: the same RMSNorm followed by the SwiGLU MLP ``down(silu(gate(y)) * up(y))``; keeps ``x``, the
  rsqrt, ``gate(y)`` and ``up(y)``, recomputes ``y`` and the SiLU product in backward.

Both take flat (N, H) inputs. Hugging Face's chain keeps the norm's input, its normalised input and its output, and
``gate``, ``silu(gate)``, ``up`` and their product; no matrix product is redone here, only element-wise passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _rms(x: Tensor, eps: float) -> Tensor:
    """``rsqrt(mean(x^2) + eps)`` over the last dimension, as Hugging Face's RMSNorm computes it."""
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _norm_backward(dy: Tensor, xn: Tensor, r: Tensor, w: Tensor, need_x: bool, need_w: bool):
    """Gradients of ``y = w * xn``, ``xn = x * r``, ``r = rsqrt(mean(x^2) + eps)``, given ``dy`` and ``xn``."""
    dw = (dy * xn).sum(0) if need_w else None
    dx = None
    if need_x:
        dxn = dy * w
        dx = torch.addcmul(dxn, xn, (dxn * xn).mean(-1, keepdim=True), value=-1).mul_(r)
    return dx, dw


class NormLinears(torch.autograd.Function):
    """``y = w * x * rsqrt(mean(x^2) + eps)``, then ``y @ W_i^T + b_i`` for each projection i; saves ``x`` and the
    rsqrt only (``y`` is recomputed in backward)."""

    @staticmethod
    def forward(ctx, x, norm_w, eps, n, *wb):
        r = _rms(x, eps)
        y = norm_w * (x * r)
        weights, biases = wb[:n], wb[n:]
        outs = tuple(F.linear(y, W, b) for W, b in zip(weights, biases))
        ctx.n = n
        ctx.has_bias = [b is not None for b in biases]
        ctx.save_for_backward(x, r, norm_w, *weights)
        return outs

    @staticmethod
    def backward(ctx, *grads):
        x, r, w, *weights = ctx.saved_tensors
        n = ctx.n
        need = ctx.needs_input_grad
        xn = x * r
        y = w * xn
        dy = None
        dweights, dbiases = [None] * n, [None] * n
        for i, (g, W) in enumerate(zip(grads, weights)):
            if g is None:
                continue
            if need[4 + i]:
                dweights[i] = g.t().mm(y)
            if ctx.has_bias[i] and need[4 + n + i]:
                dbiases[i] = g.sum(0)
            if need[0] or need[1]:
                dy = g.mm(W) if dy is None else dy.addmm_(g, W)
        del y
        dx = dw = None
        if dy is not None:
            dx, dw = _norm_backward(dy, xn, r, w, need[0], need[1])
        return (dx, dw, None, None, *dweights, *dbiases)


class NormSwiGLU(torch.autograd.Function):
    """``y = RMSNorm(x)``; ``down(silu(gate(y)) * up(y))``; saves ``x``, the rsqrt, ``gate(y)`` and ``up(y)``."""

    @staticmethod
    def forward(ctx, x, norm_w, eps, Wg, Wu, Wd):
        r = _rms(x, eps)
        y = norm_w * (x * r)
        g = F.linear(y, Wg)
        u = F.linear(y, Wu)
        del y
        out = F.linear(F.silu(g) * u, Wd)
        ctx.save_for_backward(x, r, norm_w, g, u, Wg, Wu, Wd)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, r, w, g, u, Wg, Wu, Wd = ctx.saved_tensors
        need = ctx.needs_input_grad
        a = F.silu(g)
        dWd = dout.t().mm(a * u) if need[5] else None
        dp = dout.mm(Wd)
        du = dp.mul(a)
        del a
        dg = torch.ops.aten.silu_backward(dp.mul_(u), g)  # dp u s (1 + g (1 - s)), s = sigmoid(g)
        del dp
        xn = x * r
        y = w * xn
        dWg = dg.t().mm(y) if need[3] else None
        dWu = du.t().mm(y) if need[4] else None
        del y
        dx = dw = None
        if need[0] or need[1]:
            dy = dg.mm(Wg).addmm_(du, Wu)
            del dg, du
            dx, dw = _norm_backward(dy, xn, r, w, need[0], need[1])
        return dx, dw, None, dWg, dWu, dWd
