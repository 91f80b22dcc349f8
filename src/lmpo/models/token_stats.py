"""Opt-in per-position statistics of the full next-token distribution, and soft (embedding-mixture) inputs.

A few methods need more of the distribution at each response position than the log-prob of the sampled token:

- ``vocab_mean_logprobs`` (B, T): ``mean_a log pi(a | s_t)`` over the whole vocabulary (ROVER's uniform-policy
  backup), computed as ``mean(z) - logsumexp(z)`` of the tempered logits ``z``.
- ``score_sq_norm`` (B, T): ``||e_{y_t} - pi(. | s_t)||^2 = 1 - 2 pi(y_t | s_t) + sum_a pi(a | s_t)^2``, the squared
  norm of the gradient of ``log pi(y_t)`` with respect to the logits (the optimal-token baseline's path variance).
- ``candidate_logprobs`` (B, T, M): ``log pi(c | s_t)`` for M candidate ids per position given in
  ``extras["candidate_ids"]`` (OTR's sampled tokens, SofT-GRPO's top-k ids). Gradients flow into them.

Soft inputs: when a batch carries ``extras["soft_mask"]`` (B, T) bool with ``soft_ids`` (B, T, k) long and
``soft_weights`` (B, T, k) float, the input embedding of response position t is ``sum_i w_i E[id_i]`` where
``soft_mask`` is true (soft-thinking rollouts, :mod:`lmpo.rollout.soft`) and the usual token embedding elsewhere.

Memory stays as in :func:`lmpo.models.logprobs.response_logprobs`: the body runs once, the LM head is applied to at
most ``chunk_size`` positions at a time (checkpointed under autograd), and only (n,), (n, M) results are kept, so
(B, T, vocab) never exists. The default log-prob path does not use this module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lmpo.errors import DataError
from lmpo.engine.head import DEFAULT_CHUNK_SIZE, head_logits
from lmpo.models.load import checkpointed_layers
from lmpo.models.logprobs import joined_inputs, position_ids_from_mask, split_body_and_head

STAT_NEEDS = frozenset({"vocab_mean_logprobs", "candidate_logprobs", "score_sq_norm"})
"""``needs`` keys a component may declare to get these statistics in ``batch.extras`` (and ``old_<key>``)."""
SOFT_KEYS = ("soft_mask", "soft_ids", "soft_weights")


def has_soft_inputs(extras: dict[str, Tensor]) -> bool:
    return "soft_mask" in extras


def _chunk(model, head, h, y, cand, temperature: float, with_entropy: bool, vocab_mean: bool, score_sq: bool = False):
    z = head_logits(model, head, h)
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, y.unsqueeze(-1)).squeeze(-1) - lse
    ent = lse - (torch.softmax(z, -1) * z).sum(-1) if with_entropy else torch.zeros_like(lse)
    vm = z.mean(-1) - lse if vocab_mean else torch.zeros_like(lse)
    cl = z.gather(-1, cand) - lse.unsqueeze(-1) if cand is not None else torch.zeros_like(lse[:, None])
    sq = 1.0 - 2.0 * logp.exp() + torch.softmax(z, -1).square().sum(-1) if score_sq else torch.zeros_like(lse)
    return logp, ent, vm, cl, sq


def input_embeddings(model: nn.Module, input_ids: Tensor, P: int, extras: dict[str, Tensor]) -> Tensor:
    """(B, P+T, H) input embeddings, mixing ``soft_ids`` by ``soft_weights`` at soft response positions."""
    emb = model.get_input_embeddings()
    x = emb(input_ids)
    soft = extras["soft_mask"].to(x.device).bool()
    mix = (extras["soft_weights"].to(x.device, x.dtype).unsqueeze(-1) * emb(extras["soft_ids"].to(x.device))).sum(-2)
    resp = torch.where(soft.unsqueeze(-1), mix, x[:, P:])
    return torch.cat([x[:, :P], resp], dim=1)


def response_stats(
    model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor | None, response_ids: Tensor, response_attn: Tensor,
    extras: dict[str, Tensor] | None = None, *, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = False, stats: frozenset[str] = frozenset(),
) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """Like :func:`~lmpo.models.logprobs.response_logprobs`, plus the requested ``stats`` and soft inputs.

    Returns:
        ``(logprobs (B, T), entropies (B, T) or None, {stat: tensor})``; every output is 0 where ``response_attn``
        is False. ``candidate_logprobs`` needs ``extras["candidate_ids"]`` (B, T, M).
    """
    extras = extras or {}
    unknown = set(stats) - STAT_NEEDS
    if unknown:
        raise DataError(f"response_stats: unknown statistics {sorted(unknown)}; known: {sorted(STAT_NEEDS)}.")
    if "candidate_logprobs" in stats and "candidate_ids" not in extras:
        raise DataError("candidate_logprobs needs batch.extras['candidate_ids'] (B, T, M) from the rollout.")
    body, head = split_body_and_head(model)
    device = head.weight.device
    B, P = prompt_ids.shape
    T = response_ids.shape[1]
    input_ids, attn, attn_r = joined_inputs(prompt_ids, prompt_mask, response_ids, response_attn, device)
    kw = {"inputs_embeds": input_embeddings(model, input_ids, P, extras)} if has_soft_inputs(extras) else {
        "input_ids": input_ids}
    with checkpointed_layers(model):
        out = body(attention_mask=attn.long(), position_ids=position_ids_from_mask(attn), use_cache=False, **kw)
    hidden = out.last_hidden_state[:, P - 1 : P + T - 1][attn_r]  # (N, H): position t predicts response token t
    targets = response_ids.to(device)[attn_r]
    cand = extras["candidate_ids"].to(device)[attn_r] if "candidate_logprobs" in stats else None
    vocab_mean = "vocab_mean_logprobs" in stats
    score_sq = "score_sq_norm" in stats
    use_ckpt = torch.is_grad_enabled() and hidden.requires_grad
    n = max(1, chunk_size)
    parts: list[tuple[Tensor, ...]] = []
    for i in range(0, hidden.shape[0], n):
        args = (model, head, hidden[i : i + n], targets[i : i + n], None if cand is None else cand[i : i + n],
                temperature, with_entropy, vocab_mean, score_sq)
        parts.append(checkpoint(_chunk, *args, use_reentrant=False) if use_ckpt else _chunk(*args))

    def scatter(k: int, trailing: tuple[int, ...] = ()) -> Tensor:
        full = torch.zeros(B, T, *trailing, dtype=torch.float32, device=device)
        if not parts:
            return full
        mask = attn_r.view(B, T, *([1] * len(trailing))).expand_as(full)
        return full.masked_scatter(mask, torch.cat([p[k] for p in parts]).float())

    out_stats: dict[str, Tensor] = {}
    if vocab_mean:
        out_stats["vocab_mean_logprobs"] = scatter(2)
    if cand is not None:
        out_stats["candidate_logprobs"] = scatter(3, (cand.shape[-1],))
    if score_sq:
        out_stats["score_sq_norm"] = scatter(4)
    return scatter(0), (scatter(1) if with_entropy else None), out_stats
