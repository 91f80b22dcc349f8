"""``rollout.mode: soft_thinking``: Gumbel-softmax soft-thinking steps, then discrete answer tokens (SofT-GRPO).

At a soft (thinking) step t the tempered next-token distribution is restricted to its top-k / top-p set S_t and
renormalised (log p_{t,i}); Gumbel noise g_i ~ Gumbel(0, 1), clamped to [gumbel_min, gumbel_max], gives perturbed
logits z_{t,i} = log p_{t,i} + g_i and soft weights w_t = softmax(z_t / tau_gumbel) over S_t. The next input is the
embedding mixture sum_i w_{t,i} E[id_i] instead of a sampled token (arXiv:2511.06411, Sec. 3). A row thinks for at
most ``think_tokens`` steps, or until the arg-max of z_t is the ``think_end`` token; after that it samples discrete
tokens as :class:`~lmpo.rollout.hf.HFGenerator` does (temperature, top-k, top-p of the rollout) until EOS.

Recorded in ``extras`` (per row, (B, T) / (B, T, k)): ``soft_mask`` (soft step), ``soft_ids`` / ``candidate_ids``
(the top-k ids), ``soft_weights`` (w, fed again by every trainer pass), ``soft_valid`` (id in S_t) and
``soft_logits`` (z, the "action" whose Gumbel likelihood SofT-GRPO's loss evaluates). At a soft step
``response_ids`` holds arg-max z (for length and display only); completions decode only the discrete tokens, so
rewards score the answer. ``sampler_logprobs`` at soft steps is the Gumbel log-likelihood of z under the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from lmpo.errors import ConfigError
from lmpo.engine.head import head_logits
from lmpo.models.logprobs import cache_kwarg, position_ids_from_mask, split_body_and_head
from lmpo.rollout.base import SamplingParams
from lmpo.rollout.hf import HFGenerator, filter_logits
from lmpo.rollout.reference import ModeOutput


@dataclass(frozen=True)
class SoftThinkingOptions:
    """``rollout.mode_params`` of the soft-thinking mode (defaults: arXiv:2511.06411 / its released scripts)."""

    tau_gumbel: float = 0.1
    top_k: int = 5
    top_p: float = 0.95
    gumbel_min: float = -1.5
    gumbel_max: float = 3.0
    think_tokens: int = 8192  # at most this many soft steps per response
    think_end: str | None = "</think>"  # a single token; its arg-max ends thinking (None: only think_tokens)

    def __post_init__(self) -> None:
        if not self.tau_gumbel > 0:
            raise ConfigError(f"rollout.mode_params.tau_gumbel must be > 0, got {self.tau_gumbel}.")
        if self.top_k < 1:
            raise ConfigError(f"rollout.mode_params.top_k must be >= 1, got {self.top_k}.")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rollout.mode_params.top_p must be in (0, 1], got {self.top_p}.")
        if not self.gumbel_min < self.gumbel_max:
            raise ConfigError("rollout.mode_params.gumbel_min must be < gumbel_max.")
        if self.think_tokens < 0:
            raise ConfigError(f"rollout.mode_params.think_tokens must be >= 0, got {self.think_tokens}.")


def gumbel_loglik(z: Tensor, logp: Tensor, valid: Tensor, lo: float = -1.5, hi: float = 3.0) -> Tensor:
    """Mean Gumbel(0,1) log-density of the implied noise eps = clamp(z - log p, lo, hi) over valid ids with
    log p > -3: mean(-eps - exp(-eps)) (arXiv:2511.06411; card 95). (..., k) -> (...); 0 where nothing is active."""
    active = valid & (logp > -3.0)
    eps = torch.where(active, (z - logp).clamp(lo, hi), 0.0)
    dens = torch.where(active, -eps - torch.exp(-eps), 0.0)
    return dens.sum(-1) / active.sum(-1).clamp_min(1).to(dens.dtype)


class SoftThinkingGenerator(HFGenerator):
    def __init__(self, model, tokenizer, options: SoftThinkingOptions, batch_size=None, autocast=None) -> None:
        super().__init__(model, tokenizer, batch_size=batch_size, autocast=autocast)
        self.options = options
        self.think_end_id = None
        if options.think_end is not None:
            ids = tokenizer(options.think_end, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ConfigError(f"rollout.mode_params.think_end {options.think_end!r} must be one token of this "
                                  f"tokenizer (got {len(ids)}); set it to null to think for think_tokens steps.")
            self.think_end_id = ids[0]

    def generate(self, prompts: list[str], params: SamplingParams) -> ModeOutput:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return self._soft_batch(prompts, params)
        finally:
            self.model.train(was_training)

    def _soft_batch(self, prompts: list[str], params: SamplingParams) -> ModeOutput:
        o = self.options
        body, head = split_body_and_head(self.model)
        emb = self.model.get_input_embeddings()
        device = head.weight.device
        prompt_ids, prompt_mask = self._encode(prompts, device)
        n, pad = prompt_ids.shape[0], int(self.tokenizer.pad_token_id)
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=device)
        temperature = params.temperature if params.temperature > 0 else 1.0
        cache = DynamicCache(config=body.config)
        attn = prompt_mask.long()
        x, positions = emb(prompt_ids), position_ids_from_mask(attn)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        thinking = torch.full((n,), o.think_tokens > 0, dtype=torch.bool, device=device)
        steps = torch.zeros(n, dtype=torch.long, device=device)
        rec: dict[str, list[Tensor]] = {k: [] for k in ("tok", "lp", "alive", "soft", "ids", "w", "valid", "z")}
        for _ in range(params.max_new_tokens):
            out = body(inputs_embeds=x, attention_mask=attn, position_ids=positions, use_cache=True,
                       **{cache_kwarg(body): cache})
            logits = head_logits(self.model, head, out.last_hidden_state[:, -1]).float() / temperature
            # soft candidates: top-k of the top-k/top-p-filtered, renormalised distribution
            lp_s = torch.log_softmax(filter_logits(logits, o.top_k, o.top_p), -1)
            k = min(o.top_k, logits.shape[-1])
            top_lp, ids = lp_s.topk(k, -1)
            valid = torch.isfinite(top_lp)
            g = -torch.log(-torch.log(torch.rand_like(top_lp).clamp(1e-10, 1 - 1e-10)))
            z = torch.where(valid, top_lp + g.clamp(o.gumbel_min, o.gumbel_max), float("-inf"))
            w = torch.softmax(z / o.tau_gumbel, -1)
            hard = ids.gather(-1, z.argmax(-1, keepdim=True))[:, 0]
            soft_ll = gumbel_loglik(z, top_lp, valid, o.gumbel_min, o.gumbel_max)
            # discrete candidates (answer phase), as in HFGenerator
            lp_d = torch.log_softmax(filter_logits(logits, params.top_k, params.top_p), -1)
            tok_d = lp_d.exp().multinomial(1)[:, 0] if not params.is_greedy else logits.argmax(-1)
            live = ~done
            soft = thinking & live
            token = torch.where(soft, hard, tok_d)
            token = torch.where(live, token, torch.full_like(token, pad))
            logp = torch.where(soft, soft_ll, lp_d.gather(-1, tok_d[:, None])[:, 0])
            for key, val in (("tok", token), ("lp", torch.where(live, logp, 0.0)), ("alive", live), ("soft", soft),
                             ("ids", ids), ("w", w * soft[:, None]), ("valid", valid & soft[:, None]),
                             ("z", torch.where(valid & soft[:, None], z, 0.0))):
                rec[key].append(val)
            done = done | (live & ~soft & torch.isin(token, eos))
            steps = steps + soft.long()
            end_think = steps >= o.think_tokens
            if self.think_end_id is not None:
                end_think = end_think | (soft & (hard == self.think_end_id))
            thinking = thinking & ~end_think
            if bool(done.all()):
                break
            x = torch.where(soft[:, None], (w[..., None] * emb(ids)).sum(-2), emb(token))[:, None]
            positions = positions[:, -1:] + 1
            attn = torch.cat([attn, torch.ones(n, 1, dtype=attn.dtype, device=device)], 1)
        S = {k: torch.stack(v, 1) for k, v in rec.items()}
        response_ids, response_attn, soft_mask = S["tok"], S["alive"], S["soft"]
        completions = [self.tokenizer.decode(row[keep & ~s].tolist(), skip_special_tokens=True)
                       for row, keep, s in zip(response_ids.cpu(), response_attn.cpu(), soft_mask.cpu())]
        extras = {"soft_mask": soft_mask, "soft_ids": S["ids"], "candidate_ids": S["ids"], "soft_weights": S["w"],
                  "soft_valid": S["valid"], "soft_logits": S["z"]}
        return ModeOutput(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                          response_attn=response_attn, sampler_logprobs=S["lp"].float(), truncated=~done,
                          completions=completions, num_generated_tokens=int(response_attn.sum()), extras=extras)
