"""Memory-lean per-token log-probabilities of responses under a causal LM.

The (B, T, vocab) logits tensor is the largest activation in RL post-training (B=64, T=1024 and a 150k vocabulary
is 40 GB in float32). :func:`response_logprobs` never builds it: it runs the transformer body once to get final
hidden states, then applies the LM head to at most ``chunk_size`` response tokens at a time, keeping only the
log-normaliser, the gathered target logit and (optionally) the entropy of each token. Under autograd every chunk
is checkpointed, so its logits are recomputed in backward instead of stored.

The body/head split and the position-id convention here are shared with :mod:`lmpo.rollout.hf`, so the sampler and
the trainer see bit-for-bit the same network.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from lmpo.errors import DataError, ModelError

DEFAULT_CHUNK_SIZE = 256
"""LM-head chunk (tokens whose logits exist at once) unless configured: benchmarks/levers.py ``chunk`` measured 256
as fast as 1024 with 0.8 GB less peak memory at 2048 reply tokens."""


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that ignore left padding: the first real token of every row is position 0.

    Args:
        attention_mask: (B, L) bool or 0/1, False/0 on padding.

    Returns:
        (B, L) long, ``cumsum(mask) - 1`` clamped at 0 (padding before the first real token gets 0).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def split_body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Return (transformer body, LM head) of a causal LM, looking through a peft wrapper.

    The body maps ids to final (normed) hidden states without computing logits; the head maps hidden states to
    logits. LoRA layers are injected in place, so the returned modules carry the adapters (and honour
    ``disable_adapter()``).

    Raises:
        ModelError: if the model does not expose ``get_decoder()`` and ``get_output_embeddings()``.
    """
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    get_decoder = getattr(inner, "get_decoder", None)
    get_head = getattr(inner, "get_output_embeddings", None)
    body = get_decoder() if callable(get_decoder) else None
    head = get_head() if callable(get_head) else None
    if body is None or head is None or body is inner:
        raise ModelError(
            f"The model {type(inner).__name__} does not expose a separate transformer body and LM head "
            "(get_decoder() / get_output_embeddings()), which lmpo needs to compute log-probs without "
            "materialising the full logits. Use a standard Hugging Face *ForCausalLM model."
        )
    return body, head


def head_logits(model: nn.Module, head: nn.Module, hidden: Tensor) -> Tensor:
    """Float32 logits of ``hidden`` (..., H) -> (..., V), including the model's final logit soft-capping if any."""
    logits = head(hidden).float()
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if cap:  # Gemma-style models squash logits in their own forward; mirror it so probabilities match
        logits = torch.tanh(logits / cap) * cap
    return logits


def _chunk_stats(
    model: nn.Module, head: nn.Module, hidden: Tensor, targets: Tensor, temperature: float, with_entropy: bool,
    side: list[Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Log-prob of ``targets`` (n,) and entropy (n,) for one chunk of hidden states (n, H).

    With ``side`` (an empty list) the entropy is computed without gradient and appended to it, on the first call
    only: when a checkpoint recomputes this chunk in backward, the entropy (needed for metrics, not for the
    gradient) is not computed again.
    """
    logits = head_logits(model, head, hidden)
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    # H = logsumexp(z) - sum softmax(z) * z; only an (n, V) chunk ever exists.
    entropy = lambda: lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)  # noqa: E731
    ent = entropy() if with_entropy else torch.zeros_like(lse)
    if side is not None and not side:
        with torch.no_grad():
            side.append(entropy())
    return logp, ent


class _HeadStats(torch.autograd.Function):
    """Log-probs of ``targets`` and entropies under a plain linear LM head, ``chunk`` tokens of logits at a time.

    One autograd node for the whole head instead of a checkpoint per chunk: forward keeps per token only the
    log-normaliser; backward recomputes each chunk's logits once and overwrites them with ``d/dz = g_lp (onehot - p)
    + g_ent p (E_p[z] - z)`` (divided by the temperature), from which one product gives the hidden-state gradient and
    one accumulates the weight gradient into a single buffer. The chunk's logits live in one or two buffers reused by
    every chunk, so no operation allocates a (vocab, chunk) temporary. Logits are vocabulary-major, ``W @ h^T``:
    on the default model the logits product is 1.7x and the weight-gradient product 1.2x faster that way, the
    hidden-state product the same (benchmarks/levers.py ``head``). Mixed precision: the products run in ``mm_dtype``
    (the autocast dtype the caller saw), everything else in float32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk, with_entropy, mm_dtype):
        with torch.autocast(hidden.device.type, enabled=False):  # explicit dtypes below, float32 outside the products
            return _HeadStats._forward(ctx, hidden, weight, bias, targets, temperature, chunk, with_entropy, mm_dtype)

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        saved = ctx.saved_tensors  # read once: a surrounding non-reentrant checkpoint allows a single unpack
        with torch.autocast(saved[0].device.type, enabled=False):
            return _HeadStats._backward(ctx, saved, g_lp, g_ent)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, targets, temperature, chunk, with_entropy, mm_dtype):
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        logp = torch.empty_like(lse)
        ent = torch.empty_like(lse) if with_entropy else None
        logits, expd = _chunk_buffers(weight.shape[0], min(chunk, n), 2, hidden.device)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            z = _head_logits_t(hidden[s:e], weight, bias, temperature, mm_dtype, logits(e - s))  # (V, e - s)
            target = z.gather(0, targets[None, s:e])[0]
            top = z.amax(0)
            z.sub_(top)  # z - max: every exponent <= 0
            p = torch.exp(z, out=expd(e - s))  # unnormalised probabilities
            total = p.sum(0)
            log_total = total.log()
            lse[s:e] = top + log_total
            logp[s:e] = target - lse[s:e]
            if with_entropy:  # H = lse - E_p[z] = log(total) - sum_v p_v (z_v - max) / total
                ent[s:e] = log_total - p.mul_(z).sum(0) / total
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.options = temperature, chunk, mm_dtype
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def _backward(ctx, saved, g_lp, g_ent):
        hidden, weight, bias, targets, lse, ent = saved
        temperature, chunk, mm_dtype = ctx.options
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if g_lp is None and g_ent is None:
            return (None,) * 8
        n = hidden.shape[0]
        gh = torch.empty_like(hidden) if need_h else None
        gw = None
        gb = torch.zeros_like(bias) if need_b else None
        w_mm = weight.to(mm_dtype)
        logits, *probs = _chunk_buffers(weight.shape[0], min(chunk, n), 1 + (g_ent is not None), hidden.device)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            z = _head_logits_t(hidden[s:e], weight, bias, temperature, mm_dtype, logits(e - s))  # tempered
            a = lse[s:e]
            glp = g_lp[s:e] / temperature if g_lp is not None else None
            if g_ent is not None:  # dH/dz = p (lse - H - z)
                ge = g_ent[s:e] / temperature
                coef = ge * (a - ent[s:e]) - (glp if glp is not None else 0.0)
                dz = torch.sub(z, a, out=probs[0](e - s)).exp_().mul_(z.mul_(-ge).add_(coef))
            else:
                dz = z.sub_(a).exp_().mul_(-glp)
            if glp is not None:
                dz.index_put_((targets[s:e], torch.arange(e - s, device=dz.device)), glp, accumulate=True)
            dz_mm = dz.to(mm_dtype)
            h_mm = hidden[s:e].to(mm_dtype)
            if need_h and gh.dtype == mm_dtype:
                torch.mm(dz_mm.t(), w_mm, out=gh[s:e])
            elif need_h:
                gh[s:e] = (dz_mm.t() @ w_mm).to(hidden.dtype)
            if need_w and gw is None:
                gw = (dz_mm @ h_mm).to(weight.dtype)
            elif need_w and gw.dtype == mm_dtype:
                gw.addmm_(dz_mm, h_mm)
            elif need_w:
                gw += (dz_mm @ h_mm).to(gw.dtype)
            if need_b:
                gb += dz.sum(1).to(gb.dtype)
        return gh, gw, gb, None, None, None, None, None


def _chunk_buffers(vocab: int, width: int, count: int, device):
    """``count`` reusable float32 buffers of ``vocab x width``, each as a function ``k -> (vocab, k)`` contiguous view.

    One allocation per pass instead of one per chunk and operation: above the allocator's mmap threshold every fresh
    tensor of this size (50 MB for 256 tokens of a 49k vocabulary) comes back from the kernel as zeroed pages.
    """
    flats = [torch.empty(vocab * width, dtype=torch.float32, device=device) for _ in range(count)]
    return [lambda k, f=f: f[: vocab * k].view(vocab, k) for f in flats]


def _head_logits_t(h: Tensor, weight: Tensor, bias: Tensor | None, temperature: float, mm_dtype, out: Tensor,
                   ) -> Tensor:
    """Tempered float32 logits of the rows of ``h`` (n, H), vocabulary-major, written into ``out`` (V, n)."""
    if mm_dtype == torch.float32 and weight.dtype == h.dtype == torch.float32:
        torch.mm(weight, h.t(), out=out)
    else:
        out.copy_(weight.to(mm_dtype) @ h.to(mm_dtype).t())
    if bias is not None:
        out += bias.float()[:, None]
    if temperature != 1.0:
        out /= temperature
    return out


def fused_head(model: nn.Module, head: nn.Module) -> bool:
    """Whether :class:`_HeadStats` computes this head's statistics: a plain ``nn.Linear`` LM head without logit
    soft-capping (a peft-wrapped or custom head, or a soft-capped model, takes the checkpointed per-chunk path)."""
    return type(head) is nn.Linear and not getattr(getattr(model, "config", None), "final_logit_softcapping", None)


def head_stats(model: nn.Module, head: nn.Module, hidden: Tensor, targets: Tensor, *, temperature: float = 1.0,
               chunk_size: int = DEFAULT_CHUNK_SIZE, with_entropy: bool = False, entropy_grad: bool = True,
               fused: bool | None = None) -> tuple[Tensor, Tensor | None]:
    """Log-probs of ``targets`` (n,) and entropies (n,) (``None`` unless ``with_entropy``) for final hidden states
    (n, H), never holding more than ``chunk_size`` tokens of logits.

    ``fused=None`` picks :class:`_HeadStats` where :func:`fused_head` allows it, else one
    :func:`torch.utils.checkpoint.checkpoint` per chunk around :func:`_chunk_stats`; both give the same values and
    gradients (``tests/unit/test_logprobs.py``). ``entropy_grad=False``: the entropies are returned detached.
    """
    chunk = max(1, chunk_size)
    if fused is None:
        fused = fused_head(model, head)
    if fused:
        mm_dtype = (torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type)
                    else head.weight.dtype)
        lp, en = _HeadStats.apply(hidden, head.weight, head.bias, targets, temperature, chunk, with_entropy, mm_dtype)
        return lp, (en.detach() if en is not None and not entropy_grad else en)
    use_ckpt = torch.is_grad_enabled() and hidden.requires_grad
    logp_parts, ent_parts = [], []
    for h, y in zip(hidden.split(chunk), targets.split(chunk)):
        if use_ckpt and with_entropy and not entropy_grad:
            side: list[Tensor] = []
            lp, _ = checkpoint(_chunk_stats, model, head, h, y, temperature, False, side, use_reentrant=False)
            en = side[0]
        elif use_ckpt:
            lp, en = checkpoint(_chunk_stats, model, head, h, y, temperature, with_entropy, use_reentrant=False)
        else:
            lp, en = _chunk_stats(model, head, h, y, temperature, with_entropy)
        logp_parts.append(lp)
        ent_parts.append(en)
    cat = lambda parts: torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)  # noqa: E731
    return cat(logp_parts).float(), cat(ent_parts).float() if with_entropy else None


def joined_inputs(prompt_ids: Tensor, prompt_mask: Tensor | None, response_ids: Tensor, response_attn: Tensor,
                  device) -> tuple[Tensor, Tensor, Tensor]:
    """Prompt and response joined on ``device``: (input_ids, attention mask (bool), response mask (bool))."""
    if prompt_mask is None:
        prompt_mask = torch.ones_like(prompt_ids, dtype=torch.bool)
    response_attn = response_attn.to(device=device, dtype=torch.bool)
    input_ids = torch.cat([prompt_ids, response_ids], dim=1).to(device)
    attn = torch.cat([prompt_mask.to(device=device, dtype=torch.bool), response_attn], dim=1)
    return input_ids, attn, response_attn


def response_logprobs(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor | None,
    response_ids: Tensor,
    response_attn: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = False,
    return_hidden: bool = False,
    share_prompt: bool = True,
    entropy_grad: bool = True,
) -> tuple[Tensor, Tensor | None] | tuple[Tensor, Tensor | None, Tensor]:
    """Per-token log-probs (and entropies) of the responses given the prompts.

    ``logp[b, t] = log softmax(logits / temperature)[response_ids[b, t]]`` with the logits predicted after
    ``prompt[b]`` and ``response[b, :t]``. Gradients flow to the model parameters when grad mode is on.

    Args:
        model: A Hugging Face causal LM, optionally peft-wrapped.
        prompt_ids: (B, P) long, left-padded prompts (P >= 1).
        prompt_mask: (B, P) bool, False on left padding; ``None`` means no padding.
        response_ids: (B, T) long, right-padded responses.
        response_attn: (B, T) bool, True on real response tokens (including EOS).
        temperature: Logits are divided by this before the softmax (use the sampling temperature).
        chunk_size: Maximum number of response tokens whose logits exist at the same time.
        with_entropy: Also return the entropy of the tempered next-token distribution.
        return_hidden: Also return the LM-head inputs (B, T, H): the final hidden state that predicts each response
            token, from the same forward pass (gradients flow through it; 0 where ``response_attn`` is False).
        entropy_grad: ``False`` when the entropies are only reported, never differentiated: they are then computed
            once without gradient instead of again when backward recomputes each LM-head chunk (same values).
        share_prompt: When rows repeat a prompt (a GRPO group), run each distinct prompt through the body once and
            let its rows attend to that one key/value cache (:func:`shared_prompt_rows`); the same numbers up to
            float rounding, with the prompt's share of the compute and activations divided by the group size.

    Returns:
        ``(logprobs, entropies)``: (B, T) float32 each (``entropies`` is ``None`` unless ``with_entropy``),
        exactly 0 where ``response_attn`` is False; ``(logprobs, entropies, hidden)`` when ``return_hidden``.
    """
    if prompt_ids.dim() != 2 or response_ids.dim() != 2 or prompt_ids.shape[0] != response_ids.shape[0]:
        raise DataError(
            f"response_logprobs expects prompt_ids (B, P) and response_ids (B, T) with the same B, got "
            f"{tuple(prompt_ids.shape)} and {tuple(response_ids.shape)}."
        )
    if prompt_ids.shape[1] == 0:
        raise DataError("response_logprobs needs at least one prompt token per row (got P=0).")
    if response_attn.shape != response_ids.shape:
        raise DataError(
            f"response_attn {tuple(response_attn.shape)} must match response_ids {tuple(response_ids.shape)}."
        )
    if temperature <= 0:
        raise DataError(f"temperature must be > 0 to compute log-probs, got {temperature}.")
    body, head = split_body_and_head(model)
    device = head.weight.device
    B, P = prompt_ids.shape
    T = response_ids.shape[1]
    input_ids, attn, response_attn = joined_inputs(prompt_ids, prompt_mask, response_ids, response_attn, device)
    groups = shared_prompt_rows(input_ids[:, :P], attn[:, :P]) if share_prompt and can_share_prompt(model) else None
    hidden = _shared_prompt_hidden(body, head, input_ids, attn, P, *groups) if groups is not None else None
    if hidden is None:
        out = body(
            **_token_inputs(body, head, input_ids)[0],
            attention_mask=attn.long(),
            position_ids=position_ids_from_mask(attn),
            use_cache=False,
        )
        # The hidden state at position P+t-1 predicts response token t.
        hidden = out.last_hidden_state[:, P - 1 : P + T - 1]  # (B, T, H)
    flat_hidden = hidden[response_attn]  # (N, H), N = number of real response tokens
    flat_targets = response_ids.to(device)[response_attn]  # (N,)

    lp, en = head_stats(model, head, flat_hidden, flat_targets, temperature=temperature, chunk_size=chunk_size,
                        with_entropy=with_entropy, entropy_grad=entropy_grad)

    def scatter(flat: Tensor) -> Tensor:
        # masked_scatter keeps autograd through the gathered values and leaves zeros elsewhere.
        return torch.zeros(B, T, dtype=torch.float32, device=device).masked_scatter(response_attn, flat)

    logprobs = scatter(lp)
    entropies = scatter(en) if with_entropy else None
    if return_hidden:
        return logprobs, entropies, hidden * response_attn.unsqueeze(-1).to(hidden.dtype)
    return logprobs, entropies


# --------------------------------------------------------------------------- one prompt pass per group
def shared_prompt_rows(prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(first, inverse)`` when some rows share a prompt, else ``None``.

    ``first`` (U,) indexes one row per distinct prompt (ids and padding both equal), ``inverse`` (B,) maps every row to
    its prompt's position in ``first``.
    """
    key = torch.where(prompt_mask.bool(), prompt_ids, torch.full_like(prompt_ids, -1))
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
    if uniq.shape[0] == key.shape[0]:
        return None
    first = torch.full((uniq.shape[0],), key.shape[0], dtype=torch.long, device=key.device)
    first = first.scatter_reduce(0, inverse, torch.arange(key.shape[0], device=key.device), reduce="amin")
    return first, inverse


def _recomputes_in_backward(model: nn.Module) -> bool:
    """Whether a forward under grad will be recomputed in backward (Hugging Face activation checkpointing is on)."""
    ckpt = getattr(model, "is_activation_checkpointing", None)
    ckpt = getattr(model, "is_gradient_checkpointing", False) if ckpt is None else ckpt
    return bool(ckpt) and torch.is_grad_enabled()


def can_share_prompt(model: nn.Module) -> bool:
    """Whether the prompt-once path applies: not under activation checkpointing (Hugging Face turns the key/value cache
    off there) and not inside :func:`layer_noise` (its noise is drawn per whole sequence)."""
    return not getattr(model, "_lmpo_layer_noise", False) and not _recomputes_in_backward(model)


def cache_kwarg(body: nn.Module) -> str:
    """Name of the key/value-cache argument of ``body.forward``: ``cache`` from transformers 5.20 on (the old name
    ``past_key_values`` still works there but warns), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


def _token_inputs(body: nn.Module, head: nn.Module, *ids: Tensor) -> list[dict[str, Tensor]]:
    """Keyword inputs of ``body`` for each id tensor: ``{"input_ids": ...}``, or, when the input embedding is tied to
    the LM head and trains, ``{"inputs_embeds": ...}`` from one lookup of all of them with a sparse gradient.

    The dense gradient of an embedding is a zero-filled (vocab, H) tensor added in full into the tied head's gradient,
    per call (0.3 CPU-s per update on the default model); one sparse lookup touches only the rows of the tokens
    present and is added into the head's dense gradient, which every pass through :func:`head_stats` produces, so the
    parameter's ``.grad`` stays dense.
    """
    emb = body.get_input_embeddings() if callable(getattr(body, "get_input_embeddings", None)) else None
    if (type(emb) is not nn.Embedding or emb.weight is not getattr(head, "weight", None) or emb.max_norm is not None
            or not emb.weight.requires_grad or not torch.is_grad_enabled()):
        return [{"input_ids": x} for x in ids]
    flat = F.embedding(torch.cat([x.reshape(-1) for x in ids]), emb.weight, emb.padding_idx,
                       scale_grad_by_freq=emb.scale_grad_by_freq, sparse=True)
    parts = flat.split([x.numel() for x in ids])
    return [{"inputs_embeds": part.view(*x.shape, -1)} for part, x in zip(parts, ids)]


def _shared_prompt_hidden(body: nn.Module, head: nn.Module, input_ids: Tensor, attn: Tensor, P: int, first: Tensor,
                          inverse: Tensor) -> Tensor | None:
    """Final hidden states (B, T, H) predicting each response token, with each distinct prompt run once.

    The U distinct prompts go through the body as one batch that returns their key/value cache; the cache is indexed
    to the B rows (autograd sums every row's gradient back into its prompt's single pass) and the responses run on
    top of it with the positions and padding mask of the joined sequence. ``None`` for a model whose cache cannot be
    indexed by row (the caller then runs the full sequences).
    """
    pos = position_ids_from_mask(attn)
    prompt_in, response_in = _token_inputs(body, head, input_ids[first, :P], input_ids[:, P:])
    pre = body(**prompt_in, attention_mask=attn[first, :P].long(), position_ids=pos[first, :P],
               use_cache=True)
    # transformers >= 5.20 calls the key/value cache ``cache``; earlier versions ``past_key_values``
    cache = pre.get("cache", None)
    cache = pre.get("past_key_values", None) if cache is None else cache
    if cache is None or not callable(getattr(cache, "batch_select_indices", None)):
        return None
    cache.batch_select_indices(inverse)
    out = body(**response_in, attention_mask=attn.long(), position_ids=pos[:, P:], use_cache=True,
               **{cache_kwarg(body): cache})
    last_prompt = pre.last_hidden_state[:, P - 1][inverse].unsqueeze(1)  # predicts response token 0
    return torch.cat([last_prompt, out.last_hidden_state[:, :-1]], dim=1)


# --------------------------------------------------------------------------- layer-wise noise (opt-in forward hook)
@dataclass(frozen=True)
class LayerNoise:
    """Gaussian noise added to the input hidden state of decoder layers ``first .. last`` (inclusive; ``None`` = last).

    ``std`` is one float for every perturbed layer or a tuple with one entry per perturbed layer.
    """

    std: float | tuple[float, ...]
    first: int = 0
    last: int | None = None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM (``body.layers`` / ``body.h`` / ``body.blocks``)."""
    body, _ = split_body_and_head(model)
    for name in ("layers", "h", "blocks"):
        layers = getattr(body, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ModelError(f"Cannot find the decoder layers of {type(body).__name__} (no .layers / .h / .blocks list).")


def _noise_seed(row_seed: int, layer: int) -> int:
    return (row_seed * 1_000_003 + 7919 * (layer + 1)) % (2**63 - 1)


@contextlib.contextmanager
def layer_noise(model: nn.Module, spec: LayerNoise | None, row_seeds: Tensor | None):
    """Inside the context, decoder layer l's input becomes ``h + std_l * eps`` with eps ~ N(0, I), detached.

    eps of row b at layer l is drawn from a generator seeded by ``(row_seeds[b], l)`` only, so it is identical when
    the forward is recomputed (gradient checkpointing), independent of how the batch is split into micro-batches, and
    reproducible across processes; a recomputation that re-enters this context (``torch.utils.checkpoint`` around
    the whole pass) sees the same noise. ``spec=None`` (the default everywhere) installs nothing. The hooks are removed on
    exit, so passes outside the context (sampling, old/ref log-probs) are never perturbed.
    """
    if spec is None:
        yield
        return
    if row_seeds is None:
        raise DataError("layer_noise needs one integer seed per row (batch.extras['noise_seed']).")
    if _recomputes_in_backward(model):
        raise ModelError(
            "Layer-wise noise cannot be combined with model.gradient_checkpointing: the layers would be recomputed in "
            "backward after the noise hooks are removed, silently without noise. Disable one of the two."
        )
    layers = decoder_layers(model)
    last = len(layers) - 1 if spec.last is None else spec.last
    chosen = list(range(spec.first, last + 1))
    stds = spec.std if isinstance(spec.std, tuple) else (spec.std,) * len(chosen)
    if len(stds) != len(chosen) or not chosen or chosen[-1] >= len(layers):
        raise DataError(f"LayerNoise {spec} does not fit a model with {len(layers)} decoder layers.")
    seeds = [int(s) for s in row_seeds.tolist()]

    def make_hook(layer: int, std: float):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            rows = []
            for s in seeds:
                g = torch.Generator(device=h.device).manual_seed(_noise_seed(s, layer))
                rows.append(torch.randn(h.shape[1:], generator=g, device=h.device, dtype=torch.float32))
            h = h + (std * torch.stack(rows)).to(h.dtype)
            if args:
                return (h, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": h}

        return hook

    handles = [layers[i].register_forward_pre_hook(make_hook(i, float(sd)), with_kwargs=True)
               for i, sd in zip(chosen, stds) if sd != 0.0]
    model._lmpo_layer_noise = True  # noise is drawn per whole sequence: see can_share_prompt
    try:
        yield
    finally:
        model._lmpo_layer_noise = False
        for h in handles:
            h.remove()
