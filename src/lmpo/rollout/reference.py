"""``rollout.mode: reference``: the batch is the task's reference answers, plus one-token rollouts at every position.

Instead of sampling whole completions, each row's response is the tokenised reference (``row[column]`` followed by
EOS), teacher-forced. At every reference position t the current policy (no gradient, one forward pass) is sampled
``num_candidates`` times from its tempered distribution softmax(z_t / temperature); the samples are recorded as
``extras["candidate_ids"]`` (B, T, K). A loss that declares ``needs = {"candidate_logprobs"}`` then receives their
log-probs under the policy being trained (:mod:`lmpo.models.token_stats`), e.g. OTR (arXiv:2509.26313).

``sampler_logprobs`` holds log softmax(z_t / temperature)[y*_t]; completions are the reference texts (so rewards are
those of the references). The reference column is passed per row by the rollout stage (``wants_rows``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmpo.errors import ConfigError, DataError
from lmpo.engine.head import head_logits
from lmpo.models.logprobs import position_ids_from_mask, split_body_and_head
from lmpo.rollout.base import GenerationOutput, SamplingParams
from lmpo.rollout.hf import HFGenerator


@dataclass
class ModeOutput(GenerationOutput):
    """A :class:`GenerationOutput` plus what a rollout mode records per row for the rollout stage:

    - ``extras``: named per-row tensors copied into ``batch.extras``;
    - ``batch_fields``: :class:`lmpo.batch.RolloutBatch` fields the mode sets (``response_mask``, ``turn_ids``,
      ``token_rewards``); ``response_mask`` is intersected with ``response_attn`` (e.g. multi-turn episodes train
      on policy tokens only);
    - ``columns``: per-row values added to the reward columns (e.g. ``env_return`` for the ``env_return`` reward).
    """

    extras: dict[str, Tensor] | None = None
    batch_fields: dict[str, Tensor] | None = None
    columns: dict[str, list] | None = None


@dataclass(frozen=True)
class ReferenceOptions:
    """``rollout.mode_params`` of the reference mode.

    Attributes:
        column: Row key holding the reference answer text.
        num_candidates: K one-token samples per position (OTR: 256).
        temperature: Sampling temperature of the one-token rollouts (OTR's T_s; > 1 explores more).
        append_eos: Append the EOS token to every reference (so the policy also learns to stop).
    """

    column: str = "answer"
    num_candidates: int = 256
    temperature: float = 1.0
    append_eos: bool = True

    def __post_init__(self) -> None:
        if self.num_candidates < 1:
            raise ConfigError(f"rollout.mode_params.num_candidates must be >= 1, got {self.num_candidates}.")
        if not self.temperature > 0:
            raise ConfigError(f"rollout.mode_params.temperature must be > 0, got {self.temperature}.")


class ReferenceGenerator(HFGenerator):
    """Teacher-forced reference answers with K one-token policy samples per position."""

    wants_rows = True

    def __init__(self, model, tokenizer, options: ReferenceOptions, batch_size=None, autocast=None) -> None:
        super().__init__(model, tokenizer, batch_size=batch_size, autocast=autocast)
        self.options = options

    def generate(self, prompts: list[str], params: SamplingParams, rows: list[dict] | None = None) -> ModeOutput:
        o = self.options
        if rows is None or len(rows) != len(prompts):
            raise DataError("rollout.mode=reference needs the task rows (with their reference answers) per prompt.")
        missing = [i for i, r in enumerate(rows) if not isinstance(r.get(o.column), str)]
        if missing:
            raise DataError(f"rollout.mode=reference: rows {missing[:5]} have no text column {o.column!r} "
                            "(set rollout.mode_params.column).")
        tok = self.tokenizer
        device = split_body_and_head(self.model)[1].weight.device
        prompt_ids, prompt_mask = self._encode(prompts, device)
        eos = [self.eos_ids[0]] if o.append_eos and self.eos_ids else []
        refs = [tok(r[o.column], add_special_tokens=False)["input_ids"][: params.max_new_tokens - len(eos)] + eos
                for r in rows]
        T = max(1, max(len(x) for x in refs))
        pad = int(tok.pad_token_id)
        response_ids = torch.tensor([x + [pad] * (T - len(x)) for x in refs], dtype=torch.long, device=device)
        attn = torch.tensor([[j < len(x) for j in range(T)] for x in refs], dtype=torch.bool, device=device)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                cand, logp = self._one_token_rollouts(prompt_ids, prompt_mask, response_ids, attn)
        finally:
            self.model.train(was_training)
        return ModeOutput(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids, response_attn=attn,
            sampler_logprobs=logp, truncated=torch.tensor([not (eos and x and x[-1] == eos[0]) for x in refs], device=device),
            completions=[tok.decode(x, skip_special_tokens=True) for x in refs],
            num_generated_tokens=int(attn.sum()), extras={"candidate_ids": cand},
        )

    def _one_token_rollouts(self, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, attn_r: Tensor,
                            ) -> tuple[Tensor, Tensor]:
        """K samples (B, T, K) from softmax(z_t / T_s) at every reference position, and log Pi'(y*_t) (B, T)."""
        body, head = split_body_and_head(self.model)
        B, P = prompt_ids.shape
        T = response_ids.shape[1]
        K = self.options.num_candidates
        attn = torch.cat([prompt_mask, attn_r], 1)
        out = body(input_ids=torch.cat([prompt_ids, response_ids], 1), attention_mask=attn.long(),
                   position_ids=position_ids_from_mask(attn), use_cache=False)
        hidden = out.last_hidden_state[:, P - 1 : P + T - 1][attn_r]
        targets = response_ids[attn_r]
        cands, logps = [], []
        for h, y in zip(hidden.split(256), targets.split(256)):  # only a (256, V) chunk of logits at a time
            logp = torch.log_softmax(head_logits(self.model, head, h) / self.options.temperature, -1)
            cands.append(torch.multinomial(logp.exp(), K, replacement=True))
            logps.append(logp.gather(-1, y[:, None])[:, 0])
        cand = torch.zeros(B, T, K, dtype=torch.long, device=prompt_ids.device)
        cand[attn_r] = torch.cat(cands) if cands else cand[attn_r]
        lp = torch.zeros(B, T, device=prompt_ids.device)
        lp[attn_r] = torch.cat(logps).float() if logps else lp[attn_r]
        return cand, lp
