"""LM-head statistics of final hidden states: log-probs of given tokens and entropies, a chunk of tokens at a time.

:func:`head_stats` never holds more than ``chunk_size`` tokens of logits. For a plain linear head it runs
:class:`_HeadStats`, one fused autograd node; for any other head (peft-wrapped, custom, soft-capped logits) one
:func:`torch.utils.checkpoint.checkpoint` per chunk around :func:`_chunk_stats`. Both recompute a chunk's logits in
backward instead of storing them, and give the same values and gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_SIZE = 256
"""LM-head chunk (tokens whose logits exist at once) unless configured: smaller chunks hold less memory in logits,
larger ones make larger products; benchmarks/levers.py ``chunk`` measured this size as fast as larger ones with
less peak memory (docs/results/performance.md)."""


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
    on the default model the logits and weight-gradient products are faster that way and the hidden-state product
    no slower (benchmarks/levers.py ``head``; docs/results/performance.md). Mixed precision: the products run in
    ``mm_dtype`` (the autocast dtype the caller saw), everything else in float32.
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
        w_mm = weight.to(mm_dtype)  # cast once per pass (a no-op without autocast)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            z = _head_logits_t(hidden[s:e].to(mm_dtype), w_mm, bias, temperature, logits(e - s))  # (V, e - s)
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
        # a cast weight is kept for backward, which starts right after (casting again costs a pass over the
        # weight and a fresh page-faulted allocation); the float32 weight itself is the parameter (no copy)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent, w_mm if w_mm is not weight else None)
        ctx.options = temperature, chunk, mm_dtype
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def _backward(ctx, saved, g_lp, g_ent):
        hidden, weight, bias, targets, lse, ent, w_mm = saved
        temperature, chunk, mm_dtype = ctx.options
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if g_lp is None and g_ent is None:
            return (None,) * 8
        n = hidden.shape[0]
        gh = torch.empty_like(hidden) if need_h else None
        gw = None
        gb = torch.zeros_like(bias) if need_b else None
        w_mm = weight if w_mm is None else w_mm
        logits, *probs = _chunk_buffers(weight.shape[0], min(chunk, n), 1 + (g_ent is not None), hidden.device)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            h_mm = hidden[s:e].to(mm_dtype)
            z = _head_logits_t(h_mm, w_mm, bias, temperature, logits(e - s))  # tempered
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
            if need_h and gh.dtype == mm_dtype:
                torch.mm(dz_mm.t(), w_mm, out=gh[s:e])
            elif need_h:
                gh[s:e] = (dz_mm.t() @ w_mm).to(hidden.dtype)
            if need_w and gw is None:
                gw = (dz_mm @ h_mm).to(weight.dtype)
            elif need_w and gw.dtype == mm_dtype:
                gw.addmm_(dz_mm, h_mm)
            elif need_w:  # a lower-precision product added into the float32 gradient (no float32 temporary)
                gw.add_(dz_mm @ h_mm)
            if need_b:
                gb += dz.sum(1).to(gb.dtype)
        if need_w and gw is None:  # no tokens: a dense zero, never None beside a sparse embedding gradient
            gw = torch.zeros_like(weight)
        return gh, gw, gb, None, None, None, None, None


def _chunk_buffers(vocab: int, width: int, count: int, device):
    """``count`` reusable float32 buffers of ``vocab x width``, each as a function ``k -> (vocab, k)`` contiguous view.

    One allocation per pass instead of one per chunk and operation: above the allocator's mmap threshold every fresh
    tensor of this size (50 MB for 256 tokens of a 49k vocabulary) comes back from the kernel as zeroed pages.
    """
    flats = [torch.empty(vocab * width, dtype=torch.float32, device=device) for _ in range(count)]
    return [lambda k, f=f: f[: vocab * k].view(vocab, k) for f in flats]


def _head_logits_t(h: Tensor, weight: Tensor, bias: Tensor | None, temperature: float, out: Tensor) -> Tensor:
    """Tempered float32 logits of the rows of ``h`` (n, H), vocabulary-major, written into ``out`` (V, n); ``h`` and
    ``weight`` already in the product's dtype."""
    if weight.dtype == h.dtype == out.dtype:
        torch.mm(weight, h.t(), out=out)
    else:
        out.copy_(weight @ h.t())
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
