"""A memory-lean, prompt-once forward of Llama-family decoders (Llama, Qwen2, Mistral) for the log-prob passes.

The update's forward dominates a full fine-tuning step's peak memory: Hugging Face's decoder layer leaves autograd
about 20 hidden-sized tensors per position (each RMSNorm keeps its input, its normalised input and its output; the
SwiGLU MLP keeps ``gate``, ``silu(gate)``, ``up`` and their product, each ``intermediate_size`` wide), and the group's
shared prompt, run as a separate pass whose cache the rows read, gives every weight a second use, so no gradient
is complete before the very end of backward. :func:`packed_hidden` runs the same network differently:

- **Packed positions.** The U distinct prompts (U x P positions) and the B responses (B x T positions) travel as one
  (U P + B T, H) matrix through every position-wise part of a layer (norms, projections, MLP), so each weight is
  used once per layer and its gradient is complete as soon as backward leaves that layer (what lets
  :mod:`lmpo.engine.inbackward` free it at once). Only attention sees the two parts apart: the prompt positions attend
  causally within their prompt; each response row attends to its prompt's keys and values (indexed by ``inverse``)
  and causally to itself.
- **Fused autograd nodes that save less** (:mod:`lmpo.engine.fused`). ``RMSNorm -> projections`` is one node
  saving the norm's input and its ``rsqrt`` (the normalised input is recomputed in backward, an element-wise pass);
  ``RMSNorm -> gate/up -> SiLU(gate) * up -> down`` is one node saving the norm's input, ``rsqrt``, ``gate`` and
  ``up`` (the SiLU product is recomputed); attention is one node over the CPU flash kernel that keeps the
  un-repeated (grouped-query) keys and values. A layer then keeps about 10 hidden-sized tensors per position instead
  of about 20, and no matrix product is redone.
- **Recompute by choice** (``recompute``; ``model.gradient_checkpointing`` in the trainer): ``"attention"`` keeps
  only each attention block's input and recomputes its projections and attention in backward (less activation
  memory for a little more update time); ``"layers"`` recomputes whole layers (activation checkpointing, one
  hidden-sized tensor per position and layer kept, the prompt still run once: the least memory, for the most
  recomputation).
- **The heap trimmed** (``trim``): glibc keeps freed blocks below its mmap threshold in the heap, and a long forward
  or backward fragments it (its free space grows layer by layer), so the packed forward hands its free pages back
  to the system at the end of the forward and every :data:`TRIM_EVERY` layers in backward
  (:func:`lmpo.engine.tuning.trim_heap`).

Against Hugging Face's forward, on the default model, the packed forward (with the optimizer folded into backward,
which it turns on by itself) lowers the update's peak memory, further with attention recomputed, and its CPU time
(larger products: the prompt and the rows share every matrix multiply); figures in docs/results/performance.md.

The numbers equal the Hugging Face forward up to float rounding (tests compare log-probs, entropies and every
weight's gradient with the plain path, for Llama and Qwen2, tied and untied embeddings, every recompute choice).
:func:`packed_unsupported` names what rules a model out (another architecture, device or parameter dtype than float32,
adapters or forward hooks on any submodule, biases in the MLP, another activation, a sliding window shorter than the
sequence, autocast to another dtype than bf16); the caller then keeps the Hugging Face forward. Under CPU bf16
autocast the layers run with autocast off and cast explicitly where autocast would (:mod:`lmpo.engine.fused`):
the forward then equals Hugging Face's under autocast, and gradients differ from its only in bf16 rounding.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lmpo.engine.fused import NormLinears, NormSwiGLU, cast_to
from lmpo.engine.tuning import trim_heap

ARCHITECTURES = ("llama", "qwen2", "mistral")
RECOMPUTE = ("none", "attention", "layers")
TRIM_EVERY = 5
"""Backward returns the heap's free pages to the system every this many layers (:func:`lmpo.engine.tuning.trim_heap`), and
forward once at its end. Trimming more often lowers the peak hardly more but costs CPU time in pages faulted back
in; trimming less often leaves more of the peak. On the default model this interval kept almost all of the saving
of trimming every layer at a small fraction of its cost (figures: docs/results/performance.md)."""
PLAIN_RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm")
"""RMSNorm classes of the form ``weight * x * rsqrt(mean(x^2) + eps)`` (what the fast paths recompute or fuse)."""


def family_unsupported(body: nn.Module, total_length: int) -> str:
    """Why ``body`` (the decoder without LM head) is not a Llama-family decoder that lmpo's fast paths (this packed
    forward, :mod:`lmpo.engine.lean`) can run on sequences of ``total_length`` positions; "" when it is."""
    cfg = getattr(body, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in ARCHITECTURES:
        return f"architecture {kind!r} (covered: {', '.join(ARCHITECTURES)})"
    if getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return f"attention implementation {cfg._attn_implementation!r}"
    window = getattr(cfg, "sliding_window", None)
    if window is not None and getattr(cfg, "use_sliding_window", True) and total_length > window:
        return f"a sliding window of {window} positions is shorter than the sequence ({total_length})"
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(body, name):
            return f"the decoder has no {name!r}"
    return ""


def packed_unsupported(body: nn.Module, total_length: int) -> str:
    """Why :func:`packed_hidden` cannot run ``body`` (the decoder without LM head) on sequences of ``total_length``
    positions in the current autograd/autocast state; "" when it can."""
    why = family_unsupported(body, total_length)
    if why:
        return why
    if getattr(body.config, "hidden_act", None) != "silu":
        return f"activation {getattr(body.config, 'hidden_act', None)!r} (the packed MLP is SwiGLU with SiLU)"
    if torch.is_autocast_enabled("cuda"):
        return "CUDA autocast is on"
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != torch.bfloat16:
        return f"autocast to {torch.get_autocast_dtype('cpu')} (the packed forward covers float32 and bfloat16)"
    device = body.embed_tokens.weight.device.type
    if device != "cpu":
        return f"device {device} (the packed attention runs the CPU flash-attention kernel)"
    dtype = body.embed_tokens.weight.dtype
    if dtype != torch.float32:  # Hugging Face's RMSNorm upcasts lower precisions, which the fused nodes do not
        return f"parameters in {dtype} (the packed forward covers float32)"
    called = ("embed_tokens", "rotary_emb", "norm")  # the modules whose forward (and hooks) the packed pass runs
    for name, mod in body.named_modules():
        if name.split(".")[0] in called:
            continue
        if mod._forward_hooks or mod._forward_pre_hooks:  # e.g. a hook on a projection would be silently skipped
            return f"forward hooks on {name or 'the decoder'}"
    if type(body.norm).__name__ not in PLAIN_RMS_NORMS:
        return f"final norm {type(body.norm).__name__}"
    for i, layer in enumerate(body.layers):
        at, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if at is None or mlp is None:
            return f"layer {i} has no self_attn / mlp"
        if getattr(layer, "gradient_checkpointing", False) and layer.training:
            return "activation checkpointing"
        if at.training and getattr(at, "attention_dropout", 0.0):
            return "attention dropout in training mode"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if type(getattr(at, name, None)) is not nn.Linear:
                return f"layer {i} self_attn.{name} is {type(getattr(at, name, None)).__name__}, not nn.Linear"
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(mlp, name, None)
            if type(lin) is not nn.Linear or lin.bias is not None:
                return f"layer {i} mlp.{name} is not a bias-free nn.Linear"
        for name in ("input_layernorm", "post_attention_layernorm"):
            if type(getattr(layer, name, None)).__name__ not in PLAIN_RMS_NORMS:
                return f"layer {i} {name} is {type(getattr(layer, name, None)).__name__}"
    return ""


# --------------------------------------------------------------------------- attention over the packed positions
def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(b, kv, L, d) -> (b, kv * n_rep, L, d), head j reading kv head j // n_rep (Hugging Face's ``repeat_kv``)."""
    if n_rep == 1:
        return x
    b, kv, L, d = x.shape
    return x[:, :, None].expand(b, kv, n_rep, L, d).reshape(b, kv * n_rep, L, d)


def _unrepeat(dx: Tensor, n_rep: int) -> Tensor:
    if n_rep == 1:
        return dx
    b, h, L, d = dx.shape
    return dx.view(b, h // n_rep, n_rep, L, d).sum(2)


class _Layout:
    """Where the prompt and response positions sit in the packed (U P + B T) rows, and their attention masks."""

    def __init__(self, U: int, P: int, B: int, T: int, inverse: Tensor, prompt_mask: Tensor, dtype, scale: float):
        self.U, self.P, self.B, self.T = U, P, B, T
        self.Np = U * P
        self.inverse = inverse
        self.scale = scale
        device = prompt_mask.device
        causal_p = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        eye = torch.eye(P, dtype=torch.bool, device=device)
        # a left-padding query sees itself only (its output is never read), so no row of the mask is empty
        allow_p = (causal_p & prompt_mask[:, None, :]) | eye
        causal_r = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        allow_r = torch.cat([prompt_mask[inverse][:, None, :].expand(B, T, P),
                             causal_r.expand(B, T, T)], dim=-1)
        self.mask_p = self._additive(allow_p, dtype)
        self.mask_r = self._additive(allow_r, dtype)

    @staticmethod
    def _additive(allow: Tensor, dtype) -> Tensor:
        return torch.zeros(allow.shape, dtype=dtype, device=allow.device).masked_fill_(~allow, float("-inf"))[:, None]


def _flash(q, k, v, mask, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                        scale=scale)


def _flash_backward(do, q, k, v, o, lse, mask, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(do, q, k, v, o, lse, 0.0, False,
                                                                                 attn_mask=mask, scale=scale)


def _attention_parts(lay: _Layout, q: Tensor, k: Tensor, v: Tensor):
    """(prompt part, response part) of q, k, v as (batch, heads, length, d) views; the response keys and values
    are its prompt's (indexed by ``inverse``) followed by its own."""
    U, P, B, T, Np = lay.U, lay.P, lay.B, lay.T, lay.Np

    def split(t: Tensor):
        h, d = t.shape[1], t.shape[2]
        return t[:Np].view(U, P, h, d).transpose(1, 2), t[Np:].view(B, T, h, d).transpose(1, 2)

    (qp, qr), (kp, kr), (vp, vr) = split(q), split(k), split(v)
    Kr = torch.cat([kp[lay.inverse], kr], dim=2)
    Vr = torch.cat([vp[lay.inverse], vr], dim=2)
    return (qp, kp, vp), (qr, Kr, Vr)


class _PackedAttention(torch.autograd.Function):
    """Softmax attention of the packed prompt and response positions (see :class:`_Layout`); q (N, heads, d),
    k and v (N, kv_heads, d), rotary already applied. Returns (N, heads * d)."""

    @staticmethod
    def forward(ctx, q, k, v, lay: _Layout):
        n_rep = q.shape[1] // k.shape[1]
        N, h, d = q.shape
        (qp, kp, vp), (qr, Kr, Vr) = _attention_parts(lay, q, k, v)
        op, lp = _flash(qp, _repeat_kv(kp, n_rep), _repeat_kv(vp, n_rep), lay.mask_p, lay.scale)
        orr, lr = _flash(qr, _repeat_kv(Kr, n_rep), _repeat_kv(Vr, n_rep), lay.mask_r, lay.scale)
        out = torch.cat([op.transpose(1, 2).reshape(lay.Np, h * d), orr.transpose(1, 2).reshape(N - lay.Np, h * d)])
        ctx.lay = lay
        ctx.save_for_backward(q, k, v, out, lp, lr)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lp, lr = ctx.saved_tensors
        lay = ctx.lay
        U, P, B, T, Np = lay.U, lay.P, lay.B, lay.T, lay.Np
        N, h, d = q.shape
        n_rep = h // k.shape[1]
        (qp, kp, vp), (qr, Kr, Vr) = _attention_parts(lay, q, k, v)
        op = out[:Np].view(U, P, h, d).transpose(1, 2)
        orr = out[Np:].view(B, T, h, d).transpose(1, 2)
        dout = dout.contiguous()
        dop = dout[:Np].view(U, P, h, d).transpose(1, 2)
        dor = dout[Np:].view(B, T, h, d).transpose(1, 2)
        dqr, dKr, dVr = _flash_backward(dor, qr, _repeat_kv(Kr, n_rep), _repeat_kv(Vr, n_rep), orr, lr, lay.mask_r,
                                        lay.scale)
        dKr, dVr = _unrepeat(dKr, n_rep), _unrepeat(dVr, n_rep)
        dqp, dkp, dvp = _flash_backward(dop, qp, _repeat_kv(kp, n_rep), _repeat_kv(vp, n_rep), op, lp, lay.mask_p,
                                        lay.scale)
        dkp, dvp = _unrepeat(dkp, n_rep), _unrepeat(dvp, n_rep)
        dkp = dkp.index_add(0, lay.inverse, dKr[:, :, :P])
        dvp = dvp.index_add(0, lay.inverse, dVr[:, :, :P])

        def join(dp_: Tensor, dr_: Tensor) -> Tensor:
            hh = dp_.shape[1]
            return torch.cat([dp_.transpose(1, 2).reshape(Np, hh, d), dr_.transpose(1, 2).reshape(N - Np, hh, d)])

        return join(dqp, dqr), join(dkp, dKr[:, :, P:]), join(dvp, dVr[:, :, P:]), None


class _TrimInBackward(torch.autograd.Function):
    """Identity; in backward, hands the heap's free pages back to the system (:func:`lmpo.engine.tuning.trim_heap`) before
    passing the gradient on. Placed at each layer's output, it runs once per layer as backward leaves the layer."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        trim_heap()
        return g


def _attention_block(x: Tensor, layer: nn.Module, cos: Tensor, sin: Tensor, lay: "_Layout", heads: int,
                     kv_heads: int, rotate_half, cd: torch.dtype | None = None) -> Tensor:
    """``x + o_proj(attention(RMSNorm(x)))`` over the packed (N, H) positions; products in ``cd`` when given (the
    rotary embedding in float32, as under autocast, where a bf16 query times float32 cos/sin is float32)."""
    N = x.shape[0]
    at = layer.self_attn
    d = at.head_dim
    norm = layer.input_layernorm
    q, k, v = NormLinears.apply(x, norm.weight, norm.variance_epsilon, cd, 3, at.q_proj.weight, at.k_proj.weight,
                                 at.v_proj.weight, at.q_proj.bias, at.k_proj.bias, at.v_proj.bias)
    q, k = q.view(N, heads, d), k.view(N, kv_heads, d)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    o = _PackedAttention.apply(cast_to(q, cd), cast_to(k, cd), v.view(N, kv_heads, d), lay)
    return x + F.linear(o, cast_to(at.o_proj.weight, cd), cast_to(at.o_proj.bias, cd))


def _mlp_block(x: Tensor, layer: nn.Module, cd: torch.dtype | None = None) -> Tensor:
    """``x + mlp(RMSNorm(x))`` over the packed (N, H) positions."""
    norm, mlp = layer.post_attention_layernorm, layer.mlp
    return x + NormSwiGLU.apply(x, norm.weight, norm.variance_epsilon, cd, mlp.gate_proj.weight, mlp.up_proj.weight,
                                 mlp.down_proj.weight)


def _layer(x: Tensor, layer: nn.Module, cos: Tensor, sin: Tensor, lay: _Layout, heads: int, kv_heads: int,
           rotate_half, cd: torch.dtype | None = None) -> Tensor:
    """One decoder layer over the packed (N, H) positions."""
    return _mlp_block(_attention_block(x, layer, cos, sin, lay, heads, kv_heads, rotate_half, cd), layer, cd)


def packed_hidden(body: nn.Module, prompt_in: dict[str, Tensor], response_in: dict[str, Tensor], prompt_mask: Tensor,
                  prompt_pos: Tensor, response_pos: Tensor, inverse: Tensor, recompute: str = "none",
                  trim: bool = True) -> Tensor:
    """Final (normed) hidden states (B, T, H) predicting each response token: position 0 from the last prompt
    position, position t from response position t - 1.

    Args:
        body: The decoder (checked by :func:`packed_unsupported`).
        prompt_in / response_in: ``{"input_ids": (U, P)}`` / ``{"input_ids": (B, T)}``, or ``inputs_embeds``.
        prompt_mask: (U, P) bool, False on left padding.
        prompt_pos / response_pos: (U, P) / (B, T) long position ids.
        inverse: (B,) long, the prompt of each response row.
        recompute: Under autograd, what backward recomputes instead of keeping: ``"none"``; ``"attention"``, the
            attention block of every layer (its input is kept: less activation memory for a little more compute);
            ``"layers"``, whole layers (activation checkpointing: one hidden-sized tensor per position and layer is
            kept; the prompt still runs once).
        trim: Under autograd, return the heap's free pages to the system at the end of the forward and every
            :data:`TRIM_EVERY` layers in backward (:func:`lmpo.engine.tuning.trim_heap`).
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    # under CPU bf16 autocast the layers cast explicitly (what autocast would do, see lmpo.engine.fused) with
    # autocast off inside; the final norm's float32 output then meets the LM head under the caller's autocast
    cd = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    with torch.autocast("cpu", enabled=False):
        return _packed_layers(body, prompt_in, response_in, prompt_mask, prompt_pos, response_pos, inverse,
                              recompute, trim, cd)


def _packed_layers(body: nn.Module, prompt_in: dict[str, Tensor], response_in: dict[str, Tensor],
                   prompt_mask: Tensor, prompt_pos: Tensor, response_pos: Tensor, inverse: Tensor, recompute: str,
                   trim: bool, cd: torch.dtype | None) -> Tensor:

    def embed(inp: dict[str, Tensor]) -> Tensor:
        x = inp.get("inputs_embeds")
        return body.embed_tokens(inp["input_ids"]) if x is None else x

    xp, xr = embed(prompt_in), embed(response_in)
    U, P, H = xp.shape
    B, T = xr.shape[:2]
    x = torch.cat([xp.reshape(U * P, H), xr.reshape(B * T, H)])
    pos = torch.cat([prompt_pos.reshape(-1), response_pos.reshape(-1)]).to(x.device)[None]
    cos, sin = body.rotary_emb(x[None], pos)
    cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # (N, 1, d)
    at0 = body.layers[0].self_attn
    rope = importlib.import_module(type(at0).__module__).rotate_half
    lay = _Layout(U, P, B, T, inverse.to(x.device), prompt_mask.to(device=x.device, dtype=torch.bool),
                  cd or x.dtype, at0.scaling)
    cfg = body.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    grad = torch.is_grad_enabled()
    for i, layer in enumerate(body.layers):
        args = (layer, cos, sin, lay, heads, kv_heads, rope, cd)
        if grad and recompute == "layers":
            x = checkpoint(_layer, x, *args, use_reentrant=False, preserve_rng_state=False)
        elif grad and recompute == "attention":
            x = _mlp_block(checkpoint(_attention_block, x, *args, use_reentrant=False, preserve_rng_state=False),
                           layer, cd)
        else:
            x = _layer(x, *args)
        if grad and trim and x.requires_grad and i % TRIM_EVERY == 0:
            x = _TrimInBackward.apply(x)
    if grad and trim and x.requires_grad:
        trim_heap()  # what the forward left free in the heap, before the LM head and backward add their own
    # only the positions that predict a response token go through the final norm
    last_prompt = x[: U * P].view(U, P, H)[:, P - 1][lay.inverse]  # (B, H): predicts response token 0
    rows = x[U * P :].view(B, T, H)[:, :-1]
    return body.norm(torch.cat([last_prompt.unsqueeze(1), rows], dim=1))
