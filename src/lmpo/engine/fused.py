"""Fused autograd nodes of a Llama-family decoder layer that keep less for backward than the chain of operations
they replace (used by :mod:`lmpo.engine.packed`).

- :class:`NormLinears`: ``y = w * x * rsqrt(mean(x^2) + eps)`` (Hugging Face's RMSNorm in float32) followed by any
  number of projections ``y @ W_i^T + b_i``; keeps ``x`` and the rsqrt, recomputes ``y`` in backward.
- :class:`NormSwiGLU`: the same RMSNorm followed by the SwiGLU MLP ``down(silu(gate(y)) * up(y))``; keeps ``x``, the
  rsqrt, ``gate(y)`` and ``up(y)``, recomputes ``y`` and the SiLU product in backward.

Both take flat (N, H) inputs. Hugging Face's chain keeps the norm's input, its normalised input and its output, and
``gate``, ``silu(gate)``, ``up`` and their product; no matrix product is redone here, only element-wise passes.

``cd`` (compute dtype) ``None`` keeps everything in the parameters' dtype. ``torch.bfloat16`` reproduces what CPU
autocast does to the same chain with float32 parameters: the norm in float32, its output, the weights and biases
cast to bf16 for the products (outputs in bf16), SiLU and the product in bf16; gradients of the weights come back
in float32 (computed by bf16 products, as autocast's do), the input gradient is summed over the projections in
float32. Weights are cast again in backward instead of being kept in bf16 (a cast costs an element-wise pass;
keeping them would hold a bf16 copy of every weight until backward reaches it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _rms(x: Tensor, eps: float) -> Tensor:
    """``rsqrt(mean(x^2) + eps)`` over the last dimension, as Hugging Face's RMSNorm computes it."""
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def cast_to(t: Tensor | None, cd: torch.dtype | None) -> Tensor | None:
    """``t`` in the compute dtype ``cd`` (``t`` itself when either is None)."""
    return t if t is None or cd is None else t.to(cd)


def _float(t: Tensor | None, cd: torch.dtype | None) -> Tensor | None:
    return t if t is None or cd is None else t.float()


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
    def forward(ctx, x, norm_w, eps, cd, n, *wb):
        r = _rms(x, eps)
        y = cast_to(norm_w * (x * r), cd)
        weights, biases = wb[:n], wb[n:]
        outs = tuple(F.linear(y, cast_to(W, cd), cast_to(b, cd)) for W, b in zip(weights, biases))
        ctx.n, ctx.cd = n, cd
        ctx.has_bias = [b is not None for b in biases]
        ctx.save_for_backward(x, r, norm_w, *weights)
        return outs

    @staticmethod
    def backward(ctx, *grads):
        x, r, w, *weights = ctx.saved_tensors
        n, cd = ctx.n, ctx.cd
        need = ctx.needs_input_grad
        xn = x * r
        y = cast_to(w * xn, cd)
        dy = None
        dweights, dbiases = [None] * n, [None] * n
        for i, (g, W) in enumerate(zip(grads, weights)):
            if g is None:
                continue
            if need[5 + i]:
                dweights[i] = _float(g.t().mm(y), cd)
            if ctx.has_bias[i] and need[5 + n + i]:
                dbiases[i] = g.sum(0, dtype=W.dtype)
            if need[0] or need[1]:
                if cd is None:
                    dy = g.mm(W) if dy is None else dy.addmm_(g, W)
                else:  # each projection's input gradient in bf16, their sum in float32 (as autocast's casts do)
                    part = g.mm(cast_to(W, cd))
                    dy = part.float() if dy is None else dy.add_(part)
        del y
        dx = dw = None
        if dy is not None:
            dx, dw = _norm_backward(dy, xn, r, w, need[0], need[1])
        return (dx, dw, None, None, None, *dweights, *dbiases)


class NormSwiGLU(torch.autograd.Function):
    """``y = RMSNorm(x)``; ``down(silu(gate(y)) * up(y))``; saves ``x``, the rsqrt, ``gate(y)`` and ``up(y)``."""

    @staticmethod
    def forward(ctx, x, norm_w, eps, cd, Wg, Wu, Wd):
        r = _rms(x, eps)
        y = cast_to(norm_w * (x * r), cd)
        g = F.linear(y, cast_to(Wg, cd))
        u = F.linear(y, cast_to(Wu, cd))
        del y
        out = F.linear(F.silu(g) * u, cast_to(Wd, cd))
        ctx.cd = cd
        ctx.save_for_backward(x, r, norm_w, g, u, Wg, Wu, Wd)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, r, w, g, u, Wg, Wu, Wd = ctx.saved_tensors
        cd = ctx.cd
        need = ctx.needs_input_grad
        a = F.silu(g)
        dWd = _float(dout.t().mm(a * u), cd) if need[6] else None
        dp = dout.mm(cast_to(Wd, cd))
        du = dp.mul(a)
        del a
        dg = torch.ops.aten.silu_backward(dp.mul_(u), g)  # dp u s (1 + g (1 - s)), s = sigmoid(g)
        del dp
        xn = x * r
        y = cast_to(w * xn, cd)
        dWg = _float(dg.t().mm(y), cd) if need[4] else None
        dWu = _float(du.t().mm(y), cd) if need[5] else None
        del y
        dx = dw = None
        if need[0] or need[1]:
            if cd is None:
                dy = dg.mm(Wg).addmm_(du, Wu)
            else:  # each projection's input gradient in bf16, their sum in float32
                dy = dg.mm(cast_to(Wg, cd)).float().add_(du.mm(cast_to(Wu, cd)))
            del dg, du
            dx, dw = _norm_backward(dy, xn, r, w, need[0], need[1])
        return dx, dw, None, None, dWg, dWu, dWd
