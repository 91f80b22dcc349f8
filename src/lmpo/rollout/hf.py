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

from lmpo.engine.decode import (AUTOCAST_FEW_ROWS, DIVERGED, INVERSE_CDF_MIN_VOCAB, LINEARS, SAMPLERS,  # noqa: F401
                                 cached_frozen_casts, filter_logits, plan_decode, sample_inverse_cdf)
from lmpo.errors import ConfigError, DataError
from lmpo.models.logprobs import cache_kwarg, position_ids_from_mask, shared_prompt_rows, split_body_and_head
from lmpo.rollout.base import GenerationOutput, SamplingParams


def _eos_ids(model: nn.Module, tokenizer) -> list[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in ([gen_eos] if isinstance(gen_eos, int) else gen_eos))
    return sorted(ids)


class HFGenerator:
    """Sample completions from an in-process Hugging Face model (optionally peft-wrapped).

    Args:
        model: The policy, on any device; it is put in eval mode while generating, then restored.
        tokenizer: Its tokenizer; prompts are encoded without adding special tokens.
        batch_size: Generate at most this many prompts at once (``None`` = all at once).
        autocast: ``"bfloat16"`` / ``"float16"`` runs the forward passes under CPU autocast (``None`` = off).
        share_prompt: prefill each distinct prompt once and index its key/value cache to the rows that repeat it
            (a group's samples); the same distribution up to float rounding, the prefill cost divided by the group size.
        prepack: decode steps through oneDNN with weights packed once per batch (:mod:`lmpo.engine.prepack`):
            ``False`` (default: packing after every weight update ate the per-step saving in the measured training
            loop, docs/results/performance.md), ``True``, or ``"auto"`` (float32 CPU models of 10M+ parameters); the
            same distribution up to float rounding.
        decode_kernel: decode steps' linear layers through lmpo's few-row kernel (:mod:`lmpo.engine.kernels.rowdot`):
            ``"auto"`` (default: float32 CPU models of 10M+ parameters where the kernel builds), ``True`` (raise if
            it cannot) or ``False``; the same distribution up to float rounding. ``prepack`` wins where both apply.
            Unless ``False``, an unfiltered inverse-CDF draw (no top-k/top-p) and the greedy argmax also run as one
            native call per step where the kernels build (:func:`lmpo.engine.kernels.rowdot.sample_rows`: division by the
            temperature, finiteness check, softmax and draw, any model size): the same tokens from the same uniforms
            up to float rounding at the boundaries between entries.
        lean: decode steps through :class:`lmpo.engine.lean.LeanDecoder` (preallocated key/value buffers, the
            layers' own modules called in sequence) instead of the Hugging Face forward: ``"auto"`` (default:
            Llama-family models of 10M+ parameters), ``True`` (raise if the model is not supported) or ``False``;
            the same distribution up to float rounding (under autocast the projections and MLP are the same bf16
            products, attention runs in float32 where Hugging Face's runs in bf16).
        sampler: how a token is drawn from the filtered distribution: ``"multinomial"`` (``torch.multinomial``),
            ``"inverse_cdf"`` (:func:`sample_inverse_cdf`, much cheaper for large vocabularies: one uniform per row
            instead of a random variable per entry; docs/results/performance.md) or
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
        # the random numbers of the token draws: None = the global RNG; a torch.Generator for a sampler that runs
        # beside the trainer (train.async's producer thread, lmpo.train.async_rollouts)
        self.rng: torch.Generator | None = None

    def sync_weights(self) -> None:
        """No-op: the generator samples from the trainer's own module."""

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams,
                 max_new_tokens: list[int] | None = None) -> GenerationOutput:
        """Sample one completion per prompt string (already chat-formatted), or per list of token ids (taken as they
        are, no re-tokenisation: how the multi-turn rollout continues an episode's exact tokens).

        ``max_new_tokens`` optionally gives each row its own length limit (e.g. budget sub-groups); a row that reaches
        its limit without EOS stops and is marked truncated. ``None`` uses ``params.max_new_tokens`` for every row.
        Uses the global torch RNG (of the model's device), or ``self.rng`` when set, so seeded runs are reproducible.
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
            device_type = next(self.model.parameters()).device.type  # CPU or CUDA autocast: where the weights are
            amp = (torch.autocast(device_type, dtype=getattr(torch, self.autocast)) if self.autocast
                   else contextlib.nullcontext())
            with torch.no_grad(), amp:
                parts = [self._generate_batch(prompts[i : i + step], params, max_new_tokens[i : i + step])
                         for i in range(0, len(prompts), step)]
        finally:
            self.model.train(was_training)
        return parts[0] if len(parts) == 1 else self._concat(parts)

    # ------------------------------------------------------------------ internals
    def _encode(self, prompts: list[str] | list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
        tok = self.tokenizer
        if prompts and not isinstance(prompts[0], str):  # token ids, used as they are (multi-turn episodes)
            width = max(len(ids) for ids in prompts)
            pad = int(tok.pad_token_id)
            empty = [i for i, ids in enumerate(prompts) if not len(ids)]
            if empty:
                raise DataError(f"Prompt(s) at index {empty} have zero tokens.")
            ids = torch.tensor([[pad] * (width - len(x)) + list(x) for x in prompts], dtype=torch.long)
            mask = torch.tensor([[False] * (width - len(x)) + [True] * len(x) for x in prompts], dtype=torch.bool)
            return ids.to(device), mask.to(device)
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
        n, steps = prompt_ids.shape[0], max(limits)
        pad_id = int(self.tokenizer.pad_token_id)
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=device)
        # Greedy with temperature 0 reports untempered log-probs (dividing by 0 is meaningless).
        temperature = params.temperature if params.temperature > 0 else 1.0
        plan = plan_decode(self.model, body, head, params, rows=n, steps=steps, prompt_length=prompt_ids.shape[1],
                           autocast=self.autocast, prepack=self.prepack, decode_kernel=self.decode_kernel,
                           lean=self.lean, sampler=self.sampler)
        draw = plan.make_draw(self.model, head, params, temperature, self.rng)
        positions = position_ids_from_mask(prompt_mask.long())
        limit = torch.tensor(limits, dtype=torch.long, device=device)
        ended = torch.zeros(n, dtype=torch.bool, device=device)  # produced EOS
        done = torch.zeros(n, dtype=torch.bool, device=device)  # EOS or own length limit reached
        tokens: list[Tensor] = []
        logps: list[Tensor] = []
        alive: list[Tensor] = []
        decode = None
        with contextlib.ExitStack() as decode_kernels:
            if plan.frozen_casts:
                decode_kernels.enter_context(cached_frozen_casts(self.model))
            last, cache, kv = self._prefill(body, prompt_ids, prompt_mask, positions)
            for i in range(steps):
                token, logp = draw(last)
                live = ~done
                token = torch.where(live, token, torch.full_like(token, pad_id))
                tokens.append(token)
                logps.append(torch.where(live, logp, torch.zeros_like(logp)))
                alive.append(live)
                ended = ended | (live & torch.isin(token, eos))
                done = ended | (limit <= i + 1)
                if bool(done.all()):
                    break
                if decode is None:  # the decode steps' strategy, after the prefill
                    decode_kernels.enter_context(LINEARS[plan.linears](self.model, n))
                    decode = plan.make_step(body, kv, cache, prompt_mask.long(), prompt_mask, steps - 1)
                    del cache, kv  # a lean step moved the cache into its own buffers
                # Finished rows keep feeding (ignored) pad tokens so the batch stays rectangular.
                positions = positions[:, -1:] + 1
                last = decode(token[:, None], positions)

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

    def _prefill(self, body: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, positions: Tensor):
        """The prompts' forward: (last hidden state per row, the key/value cache, the cache keyword argument). A group's
        rows share one prompt: each distinct prompt is run once and its cache indexed to the rows that repeat it."""
        cache = DynamicCache(config=body.config)
        kv = {cache_kwarg(body): cache}
        attn = prompt_mask.long()
        shared = shared_prompt_rows(prompt_ids, prompt_mask) if self.share_prompt else None
        if shared is None:
            out = body(input_ids=prompt_ids, attention_mask=attn, position_ids=positions, use_cache=True, **kv)
            return out.last_hidden_state[:, -1], cache, kv
        first, inverse = shared
        out = body(input_ids=prompt_ids[first], attention_mask=attn[first], position_ids=positions[first],
                   use_cache=True, **kv)
        cache.batch_select_indices(inverse)
        return out.last_hidden_state[:, -1][inverse], cache, kv

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
