"""Memory-lean per-token log-probabilities of responses under a causal LM.

The (B, T, vocab) logits tensor is the largest activation in RL post-training (B=64, T=1024 and a 150k vocabulary
is 40 GB in float32). :func:`response_logprobs` never builds it: it runs the transformer body once to get final
hidden states, then applies the LM head to at most ``chunk_size`` response tokens at a time, keeping only the
log-normaliser, the gathered target logit and (optionally) the entropy of each token. Under autograd a chunk's
logits are recomputed in backward instead of stored: by one fused autograd node for a plain linear head
(:class:`lmpo.engine.head._HeadStats`), by a checkpoint per chunk for any other head.

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

from lmpo.errors import DataError, ModelError
from lmpo.engine.device import host_to_device
from lmpo.engine.head import DEFAULT_CHUNK_SIZE, head_stats
from lmpo.models.load import checkpointed_layers
from lmpo.engine.packed import packed_hidden, packed_unsupported


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


def joined_inputs(prompt_ids: Tensor, prompt_mask: Tensor | None, response_ids: Tensor, response_attn: Tensor,
                  device) -> tuple[Tensor, Tensor, Tensor]:
    """Prompt and response joined on ``device``: (input_ids, attention mask (bool), response mask (bool)). Host
    tensors bound for a GPU go through pinned memory with asynchronous copies (:func:`lmpo.engine.device.host_to_device`)."""
    if prompt_mask is None:
        prompt_mask = torch.ones_like(prompt_ids, dtype=torch.bool)
    device = torch.device(device)
    response_attn = host_to_device(response_attn, device).bool()
    input_ids = host_to_device(torch.cat([prompt_ids, response_ids], dim=1), device)
    attn = torch.cat([host_to_device(prompt_mask, device).bool(), response_attn], dim=1)
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
    packed: bool = True,
    recompute: str | None = None,
    noise: LayerNoise | None = None,
    noise_seeds: Tensor | None = None,
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
        packed: Run Llama-family decoders through :func:`lmpo.engine.packed.packed_hidden` (prompt and response
            positions as one matrix, fused autograd nodes keeping about half the activations) where
            :func:`~lmpo.engine.packed.packed_unsupported` allows; else (and under layer noise) Hugging Face's forward.
        recompute: What the packed forward recomputes in backward (``"none"``, ``"attention"``, ``"layers"``);
            ``None``: ``"layers"`` when Hugging Face's activation checkpointing is on for the model, else ``"none"``.
        noise, noise_seeds: Perturb the decoder layers' inputs (:func:`layer_noise`, one seed per row). The noise is
            drawn per whole sequence, so this pass runs every row through Hugging Face's forward (neither packed nor
            prompt-once).

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
    sparse = not return_hidden  # see _token_inputs
    hidden = None
    whole_rows = noise is not None  # noise is drawn per whole sequence: every row runs its own forward
    if packed and not whole_rows and not packed_unsupported(body, P + T):
        if recompute is None:
            recompute = "layers" if _recomputes_in_backward(model) else "none"
        hidden = _packed_hidden(body, head, input_ids, attn, P, share_prompt, sparse, recompute)
    groups = None
    if hidden is None and share_prompt and not whole_rows and can_share_prompt(model):
        groups = shared_prompt_rows(input_ids[:, :P], attn[:, :P])
    if groups is not None:
        hidden = _shared_prompt_hidden(body, head, input_ids, attn, P, *groups, sparse)
    if hidden is None:
        with checkpointed_layers(model), layer_noise(model, noise, noise_seeds):
            out = body(
                **_token_inputs(body, head, input_ids, sparse=sparse)[0],
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
    off there)."""
    return not _recomputes_in_backward(model)


def cache_kwarg(body: nn.Module) -> str:
    """Name of the key/value-cache argument of ``body.forward``: ``cache`` from transformers 5.20 on (the old name
    ``past_key_values`` still works there but warns), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


def _token_inputs(body: nn.Module, head: nn.Module, *ids: Tensor, sparse: bool = True) -> list[dict[str, Tensor]]:
    """Keyword inputs of ``body`` for each id tensor: ``{"input_ids": ...}``, or, when the input embedding is tied to
    the LM head and trains, ``{"inputs_embeds": ...}`` from one lookup of all of them with a sparse gradient.

    The dense gradient of an embedding is a zero-filled (vocab, H) tensor added in full into the tied head's gradient,
    per call (a measurable share of the update's CPU time: docs/results/performance.md); one sparse lookup touches
    only the rows of the tokens present and is added into the head's dense gradient, which every backward through
    :func:`head_stats` produces, so the parameter's ``.grad`` stays dense. ``sparse=False`` when the caller also
    returns hidden states: a loss on those alone would never reach the head and would leave a sparse ``.grad``.
    """
    emb = body.get_input_embeddings() if callable(getattr(body, "get_input_embeddings", None)) else None
    if (not sparse or type(emb) is not nn.Embedding or emb.weight is not getattr(head, "weight", None)
            or emb.max_norm is not None or not emb.weight.requires_grad or not torch.is_grad_enabled()):
        return [{"input_ids": x} for x in ids]
    flat = F.embedding(torch.cat([x.reshape(-1) for x in ids]), emb.weight, emb.padding_idx,
                       scale_grad_by_freq=emb.scale_grad_by_freq, sparse=True)
    parts = flat.split([x.numel() for x in ids])
    return [{"inputs_embeds": part.view(*x.shape, -1)} for part, x in zip(parts, ids)]


def _shared_prompt_hidden(body: nn.Module, head: nn.Module, input_ids: Tensor, attn: Tensor, P: int, first: Tensor,
                          inverse: Tensor, sparse: bool = True) -> Tensor | None:
    """Final hidden states (B, T, H) predicting each response token, with each distinct prompt run once.

    The U distinct prompts go through the body as one batch that returns their key/value cache; the cache is indexed
    to the B rows (autograd sums every row's gradient back into its prompt's single pass) and the responses run on
    top of it with the positions and padding mask of the joined sequence. ``None`` for a model whose cache cannot be
    indexed by row (the caller then runs the full sequences).
    """
    pos = position_ids_from_mask(attn)
    prompt_in, response_in = _token_inputs(body, head, input_ids[first, :P], input_ids[:, P:], sparse=sparse)
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


def _packed_hidden(body: nn.Module, head: nn.Module, input_ids: Tensor, attn: Tensor, P: int, share_prompt: bool,
                   sparse: bool, recompute: str) -> Tensor:
    """Final hidden states (B, T, H) through :func:`lmpo.engine.packed.packed_hidden`: each distinct prompt once
    when ``share_prompt`` (else every row's own prompt), prompt and response positions packed into one matrix."""
    B = input_ids.shape[0]
    groups = shared_prompt_rows(input_ids[:, :P], attn[:, :P]) if share_prompt else None
    if groups is None:
        first = inverse = torch.arange(B, device=input_ids.device)
    else:
        first, inverse = groups
    pos = position_ids_from_mask(attn)
    prompt_in, response_in = _token_inputs(body, head, input_ids[first, :P], input_ids[:, P:], sparse=sparse)
    return packed_hidden(body, prompt_in, response_in, attn[first, :P], pos[first, :P], pos[:, P:], inverse,
                         recompute=recompute)


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
    try:
        yield
    finally:
        for h in handles:
            h.remove()
