"""A lean KV-cached decode step for Llama-family decoders (Llama, Qwen2, Mistral): one token per row.

A Hugging Face decode step spends as much CPU time around the matrix products as in them when the batch is a few
rows: every step rebuilds the attention mask, grows the key/value cache by concatenation (copying it), and runs each
layer through generic hooks and dispatch. :class:`LeanDecoder` takes the cache the Hugging Face prefill produced,
copies it once into preallocated buffers long enough for the whole reply, and then runs each decode step as the
plain sequence of the model's own submodules (norms, projections, MLP, rotary embedding) with attention computed
directly over the filled part of the buffers. The projections stay the model's modules, so LoRA adapters, the
few-row kernel (:mod:`lmpo.engine.kernels.rowdot`) and CPU autocast apply unchanged; the result equals the Hugging Face
step up to float rounding (tests compare sampled tokens and log-probs with the plain path). Under bf16 autocast the
keys and values are kept and attended in float32 (Hugging Face's step attends in bf16); the projections and the
MLP are the same bf16 products, whose weights autocast casts once per generation, so a decode step reads half
the bytes of a float32 one.

:func:`lean_unsupported` names what rules a model out (another architecture, a sliding window shorter than the
sequence, a non-default attention implementation); callers then keep the Hugging Face step.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmpo.engine.kernels import rowdot
from lmpo.engine.packed import PLAIN_RMS_NORMS, family_unsupported

def lean_unsupported(body: nn.Module, total_length: int) -> str:
    """Why the lean step cannot run ``body`` (the decoder without LM head) for sequences of ``total_length``
    positions; "" when it can."""
    return family_unsupported(body, total_length)


class LeanDecoder:
    """Decode steps over preallocated key/value buffers, started from a Hugging Face prefill cache.

    Args:
        body: The decoder (``model.model``), already prefilled into ``cache``.
        cache: The ``DynamicCache`` after the prefill (rows already expanded to the batch); it is consumed (each
            layer's tensors are released once copied), so that a large batch never holds two copies of its cache.
        prompt_mask: (B, P) bool, True on real prompt tokens (prompts are left-padded).
        max_new: Decode steps that may follow (the buffers hold P + max_new positions).
    """

    def __init__(self, body: nn.Module, cache, prompt_mask: Tensor, max_new: int) -> None:
        self.body = body
        cfg = body.config
        layer0 = body.layers[0].self_attn
        self.head_dim = layer0.head_dim
        self.scaling = layer0.scaling
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.rope = importlib.import_module(type(layer0).__module__).apply_rotary_pos_emb
        B, P = prompt_mask.shape
        self.length = P  # positions filled so far
        device, dtype = prompt_mask.device, cache.layers[0].keys.dtype
        # one allocation for every layer's keys and values: a single large block goes back to the OS when freed,
        # where 2 x layers blocks of a few MB would stay in (and fragment) the allocator's heap
        store = torch.empty(len(cache.layers), 2, B, self.kv_heads, P + max_new, self.head_dim, dtype=dtype,
                            device=device)
        self.keys, self.values = list(store[:, 0].unbind(0)), list(store[:, 1].unbind(0))
        for layer, k, v in zip(cache.layers, self.keys, self.values):
            k[:, :, :P].copy_(layer.keys)
            v[:, :, :P].copy_(layer.values)
            layer.keys = layer.values = None  # consumed: never two full copies of the cache at once
        # additive mask over all positions: -inf on left padding, 0 elsewhere (decoded positions are always attended)
        self.bias = torch.zeros(B, P + max_new, dtype=dtype, device=device)
        self.bias[:, :P].masked_fill_(~prompt_mask, float("-inf"))
        self.native = dtype == torch.float32 and device.type == "cpu" and rowdot.available()

    def _attention(self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, i: int) -> Tensor:
        """Rotate ``q`` (B, 1, heads*d) and ``k``, store ``k``/``v`` (B, 1, kv*d) at the current position of layer
        ``i``'s buffers, attend over the filled positions; returns (B, 1, heads*d)."""
        B, L, d = q.shape[0], self.length, self.head_dim
        K, V = self.keys[i], self.values[i]
        if self.native and q.dtype == torch.float32:  # one kernel call: rotary embedding, cache write, attention
            out = rowdot.decode_attention(q.reshape(B, self.heads, d).contiguous(), K, V, self.bias, L + 1,
                                          self.scaling, k.reshape(B, self.kv_heads, d).contiguous(),
                                          v.reshape(B, self.kv_heads, d).contiguous(), cos, sin)
            return out.view(B, 1, self.heads * d)
        if self.native:  # autocast: bf16 projections; rotated in float32, rounded to their dtype as Hugging Face's
            # attention sees them (autocast casts its inputs), then attended by the kernel in float32
            low = q.dtype
            rotated = self.rope(q.view(B, self.heads, d), k.view(B, self.kv_heads, d), cos, sin)  # (B, 1, d) cos
            qr, kr = (t.to(low).float().contiguous() for t in rotated)
            out = rowdot.decode_attention(qr, K, V, self.bias, L + 1, self.scaling, kr,
                                          v.reshape(B, self.kv_heads, d).float().contiguous())
            return out.view(B, 1, self.heads * d)
        q = q.view(B, 1, self.heads, d).transpose(1, 2)
        k = k.view(B, 1, self.kv_heads, d).transpose(1, 2)
        q, k = self.rope(q, k, cos[:, None], sin[:, None])
        K[:, :, L : L + 1] = k
        V[:, :, L : L + 1] = v.view(B, 1, self.kv_heads, d).transpose(1, 2)
        out = rowdot.attention_reference(q, K[:, :, : L + 1], V[:, :, : L + 1], self.bias[:, : L + 1], self.scaling)
        return out.reshape(B, 1, self.heads * d)

    def _norm(self, module: nn.Module, x: Tensor) -> Tensor:
        """The model's RMSNorm, fused into one op where it is the plain ``weight * x / rms(x)`` form."""
        eps = getattr(module, "variance_epsilon", None)
        if eps is None or type(module).__name__ not in PLAIN_RMS_NORMS:
            return module(x)
        if self.native:
            return rowdot.rms_norm(x, module.weight, eps)
        return F.rms_norm(x, (x.shape[-1],), module.weight, eps)

    def step(self, token: Tensor, positions: Tensor) -> Tensor:
        """One decode step: ``token`` (B, 1) ids at ``positions`` (B, 1). Returns the final hidden state (B, H)."""
        body = self.body
        B = token.shape[0]
        L = self.length
        x = body.embed_tokens(token)  # (B, 1, H)
        cos, sin = body.rotary_emb(x, positions)
        cos, sin = (t.reshape(B, self.head_dim).contiguous() for t in (cos, sin))  # (B, 1, d) -> (B, d)
        for i, layer in enumerate(body.layers):
            attn = layer.self_attn
            h = self._norm(layer.input_layernorm, x)
            x = x + attn.o_proj(self._attention(attn.q_proj(h), attn.k_proj(h), attn.v_proj(h), cos, sin, i))
            x = x + layer.mlp(self._norm(layer.post_attention_layernorm, x))
        self.length = L + 1
        return self._norm(body.norm, x)[:, -1]
