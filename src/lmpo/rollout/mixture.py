"""``rollout.mode: mixture``: each prompt group = policy samples + opponents sampled from a geometric mixture of the
policy and the reference (Nash-MD).

Nash-MD (arXiv:2312.00886, Sec. 7 "Nash-MD-PG") plays the policy against ``pi^beta ∝ pi^(1-beta) mu^beta``, which it
approximates token by token: next-token logits ``(1 - beta) z_pi + beta z_mu``, then softmax (TRL's
``GeometricMixtureWrapper``, ``mixture_coef`` 0.5). In each group of ``n`` rows the first ``n - n // 2`` are sampled
from the policy as usual and the last ``n // 2`` (the opponents) from the mixture; ``extras["opponent"]`` (B,) is
1.0 on the opponents, whose tokens are not trained (their ``response_mask`` is empty: they are only scored).

mu is a frozen copy of the policy's weights taken when the generator is built (before the first update: the run's
initial weights, i.e. the reference; with LoRA the adapters are still zero then). Opponents are sampled with plain
temperature sampling (``top_p`` / ``top_k`` are not applied), one full forward of both models per token (no KV
cache: meant for small models and short replies); their ``sampler_logprobs`` are the mixture's log-probs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from lmpo.errors import ConfigError, DataError
from lmpo.models.logprobs import position_ids_from_mask, split_body_and_head
from lmpo.rollout.base import SamplingParams
from lmpo.rollout.hf import HFGenerator
from lmpo.rollout.reference import ModeOutput


@dataclass(frozen=True)
class MixtureOptions:
    """``rollout.mode_params`` of the mixture mode.

    Attributes:
        mixture_coef: beta of the geometric mixture (0: the opponent is the policy; 1: the reference).
    """

    mixture_coef: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.mixture_coef <= 1.0:
            raise ConfigError(f"rollout.mode_params.mixture_coef must be in [0, 1], got {self.mixture_coef}.")


def mixed_logits(policy_logits: torch.Tensor, ref_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """Token-level geometric mixture: (1 - beta) z_pi + beta z_mu (softmax of it is ∝ pi^(1-beta) mu^beta)."""
    return (1.0 - beta) * policy_logits + beta * ref_logits


class MixtureGenerator(HFGenerator):
    """Policy samples and geometric-mixture opponents in every group."""

    wants_rows = True  # the rows tell where each group starts

    def __init__(self, model, tokenizer, options: MixtureOptions, batch_size=None, autocast=None) -> None:
        super().__init__(model, tokenizer, batch_size=batch_size, autocast=autocast)
        self.options = options
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def _sample_mixture(self, prompts: list[str], params: SamplingParams) -> tuple:
        device = split_body_and_head(self.model)[1].weight.device
        ids, mask = self._encode(prompts, device)
        n, temp = ids.shape[0], (params.temperature if params.temperature > 0 else 1.0)
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=device)
        pad = int(self.tokenizer.pad_token_id)
        tokens, logps, alive = [], [], []
        done = torch.zeros(n, dtype=torch.bool, device=device)
        ended = torch.zeros(n, dtype=torch.bool, device=device)
        seq, att = ids, mask.long()
        was_training = self.model.training
        self.model.eval()
        try:
            for _ in range(params.max_new_tokens):
                kw = dict(input_ids=seq, attention_mask=att, position_ids=position_ids_from_mask(att), use_cache=False)
                z = mixed_logits(self.model(**kw).logits[:, -1].float(), self.reference(**kw).logits[:, -1].float(),
                                 self.options.mixture_coef)
                logp = torch.log_softmax(z / temp, -1)
                tok = logp.argmax(-1) if params.is_greedy else torch.multinomial(logp.exp(), 1)[:, 0]
                live = ~done
                tok = torch.where(live, tok, torch.full_like(tok, pad))
                tokens.append(tok)
                logps.append(torch.where(live, logp.gather(-1, tok[:, None])[:, 0], torch.zeros(n, device=device)))
                alive.append(live)
                ended = ended | (live & torch.isin(tok, eos))
                done = ended.clone()
                if bool(done.all()):
                    break
                seq, att = torch.cat([seq, tok[:, None]], 1), torch.cat([att, live.long()[:, None]], 1)
        finally:
            self.model.train(was_training)
        return torch.stack(tokens, 1), torch.stack(alive, 1), torch.stack(logps, 1), ~ended

    def generate(self, prompts: list[str], params: SamplingParams, rows: list[dict] | None = None,
                 max_new_tokens: list[int] | None = None) -> ModeOutput:
        if rows is None or len(rows) != len(prompts):
            raise DataError("rollout.mode=mixture needs the task rows per prompt (to find each group).")
        if max_new_tokens is not None:
            raise DataError("rollout.mode=mixture does not support per-row length limits (budget planners).")
        starts = [i for i in range(len(rows)) if i == 0 or rows[i] is not rows[i - 1]]
        sizes = [b - a for a, b in zip(starts, starts[1:] + [len(rows)])]
        if min(sizes) < 2:
            raise DataError("rollout.mode=mixture needs at least 2 rows per prompt (a policy sample and an opponent); "
                            f"set rollout.num_generations >= 2 (got groups of {min(sizes)}).")
        opp = [a + k for a, s in zip(starts, sizes) for k in range(s - s // 2, s)]
        opp_set = set(opp)
        own = [i for i in range(len(rows)) if i not in opp_set]
        gen = super().generate([prompts[i] for i in own], params)
        o_ids, o_attn, o_lp, o_trunc = self._sample_mixture([prompts[i] for i in opp], params)
        device = gen.response_ids.device
        prompt_ids, prompt_mask = self._encode(prompts, device)
        T = max(gen.response_ids.shape[1], o_ids.shape[1])
        N, pad = len(prompts), int(self.tokenizer.pad_token_id)
        ids = torch.full((N, T), pad, dtype=torch.long, device=device)
        attn = torch.zeros(N, T, dtype=torch.bool, device=device)
        logp = torch.zeros(N, T, device=device)
        trunc = torch.zeros(N, dtype=torch.bool, device=device)
        for idx, (i_, a_, l_, t_) in ((own, (gen.response_ids, gen.response_attn, gen.sampler_logprobs, gen.truncated)),
                                      (opp, (o_ids, o_attn, o_lp, o_trunc))):
            r = torch.tensor(idx, dtype=torch.long, device=device)
            w = i_.shape[1]
            ids[r, :w], attn[r, :w], logp[r, :w], trunc[r] = i_, a_, l_.float(), t_
        opponent = torch.zeros(N, device=device)
        opponent[torch.tensor(opp, dtype=torch.long, device=device)] = 1.0
        completions = [self.tokenizer.decode(ids[i][attn[i]].tolist(), skip_special_tokens=True) for i in range(N)]
        train_mask = attn & (opponent == 0)[:, None]  # opponents are scored, never trained
        return ModeOutput(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=ids, response_attn=attn,
                          sampler_logprobs=logp, truncated=trunc, completions=completions,
                          num_generated_tokens=int(attn.sum()), extras={"opponent": opponent},
                          batch_fields={"response_mask": train_mask})
