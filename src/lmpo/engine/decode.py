"""Decode strategies of the sampling loop (:class:`lmpo.rollout.hf.HFGenerator`), each a named class.

A reply is generated as: prefill the prompts, then one decode step per token. Three independent choices make a
:class:`DecodePlan`, chosen once per generation batch by :func:`plan_decode` from the ``rollout.*`` knobs:

- how a decode step runs the model: :class:`CachedStep` (Hugging Face's forward with its ``DynamicCache``: the
  reference) or :class:`LeanStep` (:class:`lmpo.engine.lean.LeanDecoder`: preallocated key/value buffers);
- which linear layers the steps use: ``plain`` (PyTorch's), ``prepack`` (oneDNN with weights packed once,
  :mod:`lmpo.engine.prepack`) or ``rowdot`` (lmpo's few-row kernels, :mod:`lmpo.engine.kernels.rowdot`);
- how a token is drawn: :class:`TorchDraw` (``log_softmax``, top-k/top-p, ``torch.multinomial`` or the inverse CDF:
  the reference) or :class:`NativeDraw` (one native call per step for the unfiltered draw and the greedy argmax).

Every fast choice gives the same distribution as the reference up to float rounding (tests/unit/test_rollout.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from lmpo.engine.head import head_logits
from lmpo.engine.kernels import rowdot
from lmpo.engine.lean import LeanDecoder, lean_unsupported
from lmpo.engine.prepack import prepacked_linears, should_prepack
from lmpo.errors import ConfigError, TrainingDiverged

SAMPLERS = ("auto", "multinomial", "inverse_cdf")
INVERSE_CDF_MIN_VOCAB = 4096
"""``sampler="auto"`` draws by inverse CDF from vocabularies at least this large, by ``torch.multinomial`` below."""

AUTOCAST_FEW_ROWS = 32
"""Under autocast, generation batches of at most this many rows decode through the lean step and keep autocast's
casts of frozen weights for the whole batch; larger ones (an evaluation of many prompts) keep Hugging Face's step,
whose cache holds bf16 values (time and memory of both: docs/results/performance.md)."""

DIVERGED = ("The policy produces non-finite logits (NaN or inf), so nothing can be sampled: the weights have "
            "diverged. Lower train.learning_rate and resume from the last good checkpoint.")


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf, in that order.

    Args:
        logits: (B, V) float32, already divided by the temperature.
        top_k: Keep the ``top_k`` largest logits (0 = off).
        top_p: Keep the smallest prefix of tokens, by decreasing probability, whose mass reaches ``top_p``.

    Returns:
        (B, V) filtered logits; the most likely token is always kept.
    """
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # A token is dropped when the mass of the strictly more likely tokens already reaches top_p.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_inverse_cdf(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token per row of ``probs`` (n, V) (non-negative, rows need not sum to one): the first index whose
    cumulative probability exceeds ``u * total`` with ``u ~ U[0, 1)`` from ``generator`` (None: the global RNG of
    ``probs``' device).

    The same distribution as ``torch.multinomial(probs, 1)``, which (without replacement) draws an exponential
    variable for every vocabulary entry and takes the argmax of ``probs / q``, against a cumulative sum and one
    uniform per row here. Entries of zero probability are never drawn (``right=True`` skips flat stretches of the
    CDF). Different random stream, so seeded samples differ from the multinomial sampler's.
    """
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, device=probs.device, dtype=cdf.dtype, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


@contextlib.contextmanager
def cached_frozen_casts(model: nn.Module, active: bool = True):
    """Inside, CPU autocast keeps its low-precision copy of every frozen float32 parameter of ``model`` for the rest
    of the surrounding autocast region, as it does for trainable ones (autocast caches a cast only for leaf tensors
    that require grad; a frozen LoRA base weight would otherwise be cast again at every decode step). The values are
    the same casts; to be used under ``torch.no_grad()`` only (the parameters are marked as requiring grad while
    inside, then restored)."""
    frozen = [p for p in model.parameters() if active and not p.requires_grad and p.dtype == torch.float32]
    try:
        for p in frozen:
            p.requires_grad_(True)
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


# --------------------------------------------------------------------------- token draws
class TorchDraw:
    """The reference draw: logits / temperature, top-k/top-p, then argmax (greedy) or a draw from the softmax."""

    name = "torch"

    def __init__(self, model: nn.Module, head: nn.Module, params, temperature: float, inverse_cdf: bool,
                 generator: torch.Generator | None = None) -> None:
        self.model, self.head, self.params, self.temperature = model, head, params, temperature
        if inverse_cdf:
            self.draw = sample_inverse_cdf if generator is None else (lambda p: sample_inverse_cdf(p, generator))
        else:
            self.draw = lambda p: torch.multinomial(p, 1, generator=generator).squeeze(-1)

    def __call__(self, last: Tensor) -> tuple[Tensor, Tensor]:
        logits = head_logits(self.model, self.head, last).float() / self.temperature  # (n, V)
        if not bool(torch.isfinite(logits).all()):
            raise TrainingDiverged(DIVERGED)
        if self.params.is_greedy:
            token = logits.argmax(-1)
            return token, torch.log_softmax(logits, -1).gather(-1, token[:, None]).squeeze(-1)
        logprobs = torch.log_softmax(filter_logits(logits, self.params.top_k, self.params.top_p), -1)
        token = self.draw(logprobs.exp())
        return token, logprobs.gather(-1, token[:, None]).squeeze(-1)


class NativeDraw:
    """Division by the temperature, finiteness check, softmax and the inverse-CDF draw (or argmax) in one native
    call per step (:func:`lmpo.engine.kernels.rowdot.sample_rows`): the same tokens as :class:`TorchDraw` with the
    inverse CDF from the same uniforms, up to float rounding at the boundaries between entries."""

    name = "native"

    def __init__(self, model: nn.Module, head: nn.Module, params, temperature: float,
                 generator: torch.Generator | None = None) -> None:
        self.model, self.head, self.params, self.temperature = model, head, params, temperature
        self.generator = generator
        self.scratch: Tensor | None = None

    def __call__(self, last: Tensor) -> tuple[Tensor, Tensor]:
        logits = head_logits(self.model, self.head, last).contiguous()  # (n, V) float32
        if self.scratch is None:
            self.scratch = torch.empty_like(logits)
        u = None if self.params.is_greedy else torch.rand(logits.shape[0], dtype=torch.float32, device=logits.device,
                                                          generator=self.generator)
        token, logp, bad = rowdot.sample_rows(logits, self.temperature, u, self.scratch)
        if bad:
            raise TrainingDiverged(DIVERGED)
        return token, logp


# --------------------------------------------------------------------------- decode steps
class CachedStep:
    """The reference decode step: Hugging Face's forward over its key/value cache, the attention mask grown by one."""

    name = "cached"

    def __init__(self, body: nn.Module, kv: dict, attn: Tensor) -> None:
        self.body, self.kv, self.attn = body, kv, attn

    def __call__(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        self.attn = torch.cat([self.attn, torch.ones(self.attn.shape[0], 1, dtype=self.attn.dtype,
                                                     device=self.attn.device)], dim=1)
        out = self.body(input_ids=input_ids, attention_mask=self.attn, position_ids=positions, use_cache=True,
                        **self.kv)
        return out.last_hidden_state[:, -1]


class LeanStep:
    """Decode steps through :class:`lmpo.engine.lean.LeanDecoder`: the prefill's cache moves into preallocated
    buffers for the whole reply and each layer's own modules run in sequence."""

    name = "lean"

    def __init__(self, body: nn.Module, cache, prompt_mask: Tensor, steps: int) -> None:
        self.decoder = LeanDecoder(body, cache, prompt_mask, steps)

    def __call__(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        return self.decoder.step(input_ids, positions)


LINEARS: dict[str, Callable] = {
    "plain": lambda model, n: contextlib.nullcontext(),
    "prepack": prepacked_linears,
    "rowdot": lambda model, n: rowdot.rowdot_linears(model),
}


@dataclass(frozen=True)
class DecodePlan:
    step: str  # "cached" | "lean"
    linears: str  # a key of LINEARS
    draw: str  # "torch" | "native"
    inverse_cdf: bool  # the torch draw's sampler
    frozen_casts: bool  # keep autocast's casts of frozen weights for the batch

    def make_draw(self, model: nn.Module, head: nn.Module, params, temperature: float,
                  generator: torch.Generator | None = None):
        """The token draw; its random numbers come from ``generator`` (None: the global RNG)."""
        if self.draw == "native":
            return NativeDraw(model, head, params, temperature, generator)
        return TorchDraw(model, head, params, temperature, self.inverse_cdf, generator)

    def make_step(self, body: nn.Module, kv: dict, cache, attn: Tensor, prompt_mask: Tensor, steps: int):
        return LeanStep(body, cache, prompt_mask, steps) if self.step == "lean" else CachedStep(body, kv, attn)


def plan_decode(model: nn.Module, body: nn.Module, head: nn.Module, params, *, rows: int, steps: int,
                prompt_length: int, autocast: str | None, prepack, decode_kernel, lean, sampler: str) -> DecodePlan:
    """The strategies of one generation batch of ``rows`` replies of up to ``steps`` tokens (the knobs' rules)."""
    device, vocab = head.weight.device, head.weight.shape[0]
    decoding = steps > 1  # a one-token reply has no decode step
    pack = decoding and should_prepack(model, prepack, autocast)
    few_rows = decoding and not pack and rowdot.should_use(model, decode_kernel, autocast)
    inverse_cdf = sampler == "inverse_cdf" or (sampler == "auto" and vocab >= INVERSE_CDF_MIN_VOCAB)
    native = (decode_kernel is not False and device.type == "cpu" and rowdot.available()
              and (params.is_greedy or (inverse_cdf and params.top_p >= 1.0 and not 0 < params.top_k < vocab)))
    few = not autocast or rows <= AUTOCAST_FEW_ROWS
    use_lean = decoding and few and _use_lean(model, body, lean, prompt_length + steps)
    return DecodePlan(step="lean" if use_lean else "cached",
                      linears="prepack" if pack else "rowdot" if few_rows else "plain",
                      draw="native" if native else "torch", inverse_cdf=inverse_cdf,
                      frozen_casts=bool(autocast) and few)


def _use_lean(model: nn.Module, body: nn.Module, lean, total_length: int) -> bool:
    if lean is False:
        return False
    why = lean_unsupported(body, total_length)
    if lean is True:
        if why:
            raise ConfigError(f"rollout.lean_decode is true but this model cannot use it: {why}. "
                              "Set rollout.lean_decode to auto or false.")
        return True
    return not why and rowdot.large_model(model)
