"""In-process generation with a Hugging Face causal LM and a hand-written KV-cached sampling loop.

``model.generate`` does not report the log-probs of the distribution a token was actually drawn from (after
top-k/top-p), and its position-id convention can differ from the trainer's. This loop uses the same body/head split
and ``cumsum(mask) - 1`` positions as :func:`lmpo.models.logprobs.response_logprobs`, so with plain temperature
sampling the sampler and trainer log-probs agree to float rounding.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from lmpo.errors import ConfigError, DataError, TrainingDiverged
from lmpo.kernels import rowdot
from lmpo.models.head import head_logits
from lmpo.models.logprobs import cache_kwarg, position_ids_from_mask, shared_prompt_rows, split_body_and_head
from lmpo.rollout.base import GenerationOutput, SamplingParams
from lmpo.rollout.lean import LeanDecoder, lean_unsupported
from lmpo.rollout.prepack import prepacked_linears, should_prepack


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


def _eos_ids(model: nn.Module, tokenizer) -> list[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in ([gen_eos] if isinstance(gen_eos, int) else gen_eos))
    return sorted(ids)


SAMPLERS = ("auto", "multinomial", "inverse_cdf")
INVERSE_CDF_MIN_VOCAB = 4096
"""``sampler="auto"`` draws by inverse CDF from vocabularies at least this large, by ``torch.multinomial`` below."""


DIVERGED = ("The policy produces non-finite logits (NaN or inf), so nothing can be sampled: the weights have "
            "diverged. Lower train.learning_rate and resume from the last good checkpoint.")


def sample_inverse_cdf(probs: Tensor) -> Tensor:
    """One token per row of ``probs`` (n, V) (non-negative, rows need not sum to one): the first index whose
    cumulative probability exceeds ``u * total`` with ``u ~ U[0, 1)`` from the global RNG of ``probs``' device.

    The same distribution as ``torch.multinomial(probs, 1)``, which (without replacement) draws an exponential
    variable for every vocabulary entry and takes the argmax of ``probs / q``: 13 of ~170 CPU-ms of a decode step of
    8 rows over SmolLM2's 49,152 entries, against a cumulative sum and one uniform per row here. Entries of zero
    probability are never drawn (``right=True`` skips flat stretches of the CDF). Different random stream, so
    seeded samples differ from the multinomial sampler's.
    """
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


AUTOCAST_FEW_ROWS = 32
"""Under autocast, generation batches of at most this many rows decode through the lean step and keep autocast's
casts of frozen weights for the whole batch; larger ones (an evaluation of many prompts) keep Hugging Face's step,
whose cache holds bf16 values. Measured on the default model with LoRA (2 threads): 24 rows x 32 tokens 4.3-4.8 s
without the kept casts, 2.7-3.7 s with them (+0.2-0.4 GB); 128 rows greedy: Hugging Face's step 14.4 s at 1.55 GB
peak, lean 12.0 s at 2.18 GB (float32 key/value buffers for 128 rows), lean with the kept casts 12.9 s at 3.13 GB."""


@contextlib.contextmanager
def cached_frozen_casts(model: nn.Module, active: bool = True):
    """Inside, CPU autocast keeps its low-precision copy of every frozen float32 parameter of ``model`` for the rest
    of the surrounding autocast region, as it does for trainable ones (autocast caches a cast only for leaf tensors
    that require grad; a frozen LoRA base weight would otherwise be cast again at every decode step: 538 MB read
    and 269 MB written per step of the default model). The values are the same casts; to be used under
    ``torch.no_grad()`` only (the parameters are marked as requiring grad while inside, then restored)."""
    frozen = [p for p in model.parameters() if active and not p.requires_grad and p.dtype == torch.float32]
    try:
        for p in frozen:
            p.requires_grad_(True)
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


class HFGenerator:
    """Sample completions from an in-process Hugging Face model (optionally peft-wrapped).

    Args:
        model: The policy, on any device; it is put in eval mode while generating, then restored.
        tokenizer: Its tokenizer; prompts are encoded without adding special tokens.
        batch_size: Generate at most this many prompts at once (``None`` = all at once).
        autocast: ``"bfloat16"`` / ``"float16"`` runs the forward passes under CPU autocast (``None`` = off).
        share_prompt: prefill each distinct prompt once and index its key/value cache to the rows that repeat it
            (a group's samples); the same distribution up to float rounding, the prefill cost divided by the group size.
        prepack: decode steps through oneDNN with weights packed once per batch (:mod:`lmpo.rollout.prepack`):
            ``False`` (default: no gain measured at 64-token replies), ``True``, or ``"auto"`` (float32 CPU models
            of 10M+ parameters); the same distribution up to float rounding.
        decode_kernel: decode steps' linear layers through lmpo's few-row kernel (:mod:`lmpo.kernels.rowdot`):
            ``"auto"`` (default: float32 CPU models of 10M+ parameters where the kernel builds), ``True`` (raise if
            it cannot) or ``False``; the same distribution up to float rounding. ``prepack`` wins where both apply.
            Unless ``False``, an unfiltered inverse-CDF draw (no top-k/top-p) and the greedy argmax also run as one
            native call per step where the kernels build (:func:`lmpo.kernels.rowdot.sample_rows`: division by the
            temperature, finiteness check, softmax and draw, any model size): the same tokens from the same uniforms
            up to float rounding at the boundaries between entries.
        lean: decode steps through :class:`lmpo.rollout.lean.LeanDecoder` (preallocated key/value buffers, the
            layers' own modules called in sequence) instead of the Hugging Face forward: ``"auto"`` (default:
            Llama-family models of 10M+ parameters), ``True`` (raise if the model is not supported) or ``False``;
            the same distribution up to float rounding (under autocast the projections and MLP are the same bf16
            products, attention runs in float32 where Hugging Face's runs in bf16).
        sampler: how a token is drawn from the filtered distribution: ``"multinomial"`` (``torch.multinomial``),
            ``"inverse_cdf"`` (:func:`sample_inverse_cdf`, an order of magnitude cheaper for large vocabularies) or
            ``"auto"`` (default: inverse CDF for vocabularies of :data:`INVERSE_CDF_MIN_VOCAB`+ entries). Both draw
            from the same distribution with different random streams.
    """

    def __init__(self, model: nn.Module, tokenizer, batch_size: int | None = None, autocast: str | None = None,
                 share_prompt: bool = True, prepack: str | bool = False,
                 decode_kernel: str | bool = "auto", lean: str | bool = "auto", sampler: str = "auto") -> None:
        if tokenizer.pad_token_id is None:
            raise DataError("The tokenizer has no pad token; load models with lmpo.models.load_model, which sets one.")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.autocast = autocast
        self.share_prompt = share_prompt
        self.prepack = prepack
        self.decode_kernel = decode_kernel
        self.lean = lean
        if sampler not in SAMPLERS:
            raise ConfigError(f"rollout.sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        self.sampler = sampler
        self.eos_ids = _eos_ids(model, tokenizer)

    def sync_weights(self) -> None:
        """No-op: the generator samples from the trainer's own module."""

    def generate(self, prompts: list[str], params: SamplingParams,
                 max_new_tokens: list[int] | None = None) -> GenerationOutput:
        """Sample one completion per prompt string (already chat-formatted).

        ``max_new_tokens`` optionally gives each row its own length limit (e.g. budget sub-groups); a row that reaches
        its limit without EOS stops and is marked truncated. ``None`` uses ``params.max_new_tokens`` for every row.
        Uses the global torch RNG (of the model's device), so seeded runs are reproducible.
        """
        if not prompts:
            raise DataError("HFGenerator.generate got an empty list of prompts.")
        if max_new_tokens is None:
            max_new_tokens = [params.max_new_tokens] * len(prompts)
        if len(max_new_tokens) != len(prompts) or min(max_new_tokens) < 1:
            raise DataError(f"HFGenerator.generate: max_new_tokens needs one limit >= 1 per prompt ({len(prompts)}), "
                            f"got {list(max_new_tokens)[:8]}.")
        step = self.batch_size or len(prompts)
        was_training = self.model.training
        self.model.eval()
        try:
            amp = torch.autocast("cpu", dtype=getattr(torch, self.autocast)) if self.autocast else contextlib.nullcontext()
            with torch.no_grad(), amp:
                parts = [self._generate_batch(prompts[i : i + step], params, max_new_tokens[i : i + step])
                         for i in range(0, len(prompts), step)]
        finally:
            self.model.train(was_training)
        return parts[0] if len(parts) == 1 else self._concat(parts)

    # ------------------------------------------------------------------ internals
    def _encode(self, prompts: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
        tok = self.tokenizer
        previous_side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
        finally:
            tok.padding_side = previous_side
        mask = enc["attention_mask"].bool()
        empty = (~mask.any(-1)).nonzero().flatten().tolist()
        if mask.shape[1] == 0 or empty:
            raise DataError(f"Prompt(s) at index {empty or list(range(len(prompts)))} encode to zero tokens.")
        return enc["input_ids"].to(device), mask.to(device)

    def _generate_batch(self, prompts: list[str], params: SamplingParams, limits: list[int]) -> GenerationOutput:
        body, head = split_body_and_head(self.model)
        device = head.weight.device
        prompt_ids, prompt_mask = self._encode(prompts, device)
        n = prompt_ids.shape[0]
        pad_id = int(self.tokenizer.pad_token_id)
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=device)
        # Greedy with temperature 0 reports untempered log-probs (dividing by 0 is meaningless).
        temperature = params.temperature if params.temperature > 0 else 1.0

        cache = DynamicCache(config=body.config)
        attn = prompt_mask.long()
        input_ids = prompt_ids
        positions = position_ids_from_mask(attn)
        limit = torch.tensor(limits, dtype=torch.long, device=device)
        ended = torch.zeros(n, dtype=torch.bool, device=device)  # produced EOS
        done = torch.zeros(n, dtype=torch.bool, device=device)  # EOS or own length limit reached
        tokens: list[Tensor] = []
        logps: list[Tensor] = []
        alive: list[Tensor] = []
        # a group's rows share one prompt: prefill it once
        shared = shared_prompt_rows(prompt_ids, prompt_mask) if self.share_prompt else None
        kv = {cache_kwarg(body): cache}
        pack = should_prepack(self.model, self.prepack, self.autocast) and max(limits) > 1
        few_rows = not pack and max(limits) > 1 and rowdot.should_use(self.model, self.decode_kernel, self.autocast)
        inverse_cdf = self.sampler == "inverse_cdf" or (
            self.sampler == "auto" and head.weight.shape[0] >= INVERSE_CDF_MIN_VOCAB)
        draw = sample_inverse_cdf if inverse_cdf else lambda p: torch.multinomial(p, 1).squeeze(-1)
        # one native call per step for the unfiltered inverse-CDF draw (and the greedy argmax)
        native_draw = (self.decode_kernel is not False and device.type == "cpu" and rowdot.available()
                       and (params.is_greedy or (inverse_cdf and params.top_p >= 1.0
                                                 and not 0 < params.top_k < head.weight.shape[0])))
        scratch = None
        few = not self.autocast or n <= AUTOCAST_FEW_ROWS
        use_lean = max(limits) > 1 and few and self._use_lean(body, prompt_ids.shape[1] + max(limits))
        lean = None
        with contextlib.ExitStack() as decode_kernels:
            if self.autocast and few:
                decode_kernels.enter_context(cached_frozen_casts(self.model))
            for i in range(max(limits)):
                if i == 0 and shared is not None:
                    first, inverse = shared
                    out = body(input_ids=input_ids[first], attention_mask=attn[first], position_ids=positions[first],
                               use_cache=True, **kv)
                    cache.batch_select_indices(inverse)
                    last = out.last_hidden_state[:, -1][inverse]
                elif lean is not None:
                    last = lean.step(input_ids, positions)
                else:
                    out = body(input_ids=input_ids, attention_mask=attn, position_ids=positions, use_cache=True, **kv)
                    last = out.last_hidden_state[:, -1]
                if native_draw:
                    logits = head_logits(self.model, head, last).contiguous()  # (n, V) float32
                    if scratch is None:
                        scratch = torch.empty_like(logits)
                    u = None if params.is_greedy else torch.rand(n, dtype=torch.float32, device=device)
                    token, logp, bad = rowdot.sample_rows(logits, temperature, u, scratch)
                    if bad:
                        raise TrainingDiverged(DIVERGED)
                else:
                    logits = head_logits(self.model, head, last).float() / temperature  # (n, V)
                    if not bool(torch.isfinite(logits).all()):
                        raise TrainingDiverged(DIVERGED)
                    if params.is_greedy:
                        token = logits.argmax(-1)
                        logp = torch.log_softmax(logits, -1).gather(-1, token[:, None]).squeeze(-1)
                    else:
                        logprobs = torch.log_softmax(filter_logits(logits, params.top_k, params.top_p), -1)
                        token = draw(logprobs.exp())
                        logp = logprobs.gather(-1, token[:, None]).squeeze(-1)
                live = ~done
                token = torch.where(live, token, torch.full_like(token, pad_id))
                tokens.append(token)
                logps.append(torch.where(live, logp, torch.zeros_like(logp)))
                alive.append(live)
                ended = ended | (live & torch.isin(token, eos))
                done = ended | (limit <= i + 1)
                if bool(done.all()):
                    break
                if i == 0 and pack:  # decode steps (one token per row) through pre-packed weights
                    decode_kernels.enter_context(prepacked_linears(self.model, n))
                if i == 0 and few_rows:  # decode steps: a few rows by every weight
                    decode_kernels.enter_context(rowdot.rowdot_linears(self.model))
                if i == 0 and use_lean:  # the prefill's cache moves into buffers for the whole reply
                    lean = LeanDecoder(body, cache, prompt_mask, max(limits) - 1)
                    del cache, kv, out  # the prefill output refers to the (now emptied) cache
                # Finished rows keep feeding (ignored) pad tokens so the batch stays rectangular.
                input_ids = token[:, None]
                positions = positions[:, -1:] + 1
                if lean is None:
                    attn = torch.cat([attn, torch.ones(n, 1, dtype=attn.dtype, device=device)], dim=1)

        response_ids = torch.stack(tokens, 1)
        response_attn = torch.stack(alive, 1)
        completions = [
            self.tokenizer.decode(row[keep].tolist(), skip_special_tokens=True)
            for row, keep in zip(response_ids.cpu(), response_attn.cpu())
        ]
        return GenerationOutput(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            response_ids=response_ids,
            response_attn=response_attn,
            sampler_logprobs=torch.stack(logps, 1).float(),
            truncated=~ended,
            completions=completions,
            num_generated_tokens=int(response_attn.sum()),
        )

    def _use_lean(self, body: nn.Module, total_length: int) -> bool:
        if self.lean is False:
            return False
        why = lean_unsupported(body, total_length)
        if self.lean is True:
            if why:
                raise ConfigError(f"rollout.lean_decode is true but this model cannot use it: {why}. "
                                  "Set rollout.lean_decode to auto or false.")
            return True
        return not why and rowdot.large_model(self.model)

    def _concat(self, parts: list[GenerationOutput]) -> GenerationOutput:
        """Join sub-batches, left-padding prompts and right-padding responses to the widest."""
        pad_id = int(self.tokenizer.pad_token_id)
        P = max(p.prompt_ids.shape[1] for p in parts)
        T = max(p.response_ids.shape[1] for p in parts)

        def left(x: Tensor, value) -> Tensor:
            return nn.functional.pad(x, (P - x.shape[1], 0), value=value)

        def right(x: Tensor, value) -> Tensor:
            return nn.functional.pad(x, (0, T - x.shape[1]), value=value)

        return GenerationOutput(
            prompt_ids=torch.cat([left(p.prompt_ids, pad_id) for p in parts]),
            prompt_mask=torch.cat([left(p.prompt_mask, False) for p in parts]),
            response_ids=torch.cat([right(p.response_ids, pad_id) for p in parts]),
            response_attn=torch.cat([right(p.response_attn, False) for p in parts]),
            sampler_logprobs=torch.cat([right(p.sampler_logprobs, 0.0) for p in parts]),
            truncated=torch.cat([p.truncated for p in parts]),
            completions=[c for p in parts for c in p.completions],
            num_generated_tokens=sum(p.num_generated_tokens for p in parts),
        )
