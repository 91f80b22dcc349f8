"""``rollout.mode: self_play``: each prompt group = the task's reference answer (teacher-forced) + the policy's samples.

SPIN (arXiv:2401.01335) contrasts a prompt's human-written answer with the current policy's own generation. This mode
lays a group out for it: the first row of every group is the reference answer (``row[column]``, tokenised, cut to
``max_new_tokens`` and followed by EOS), the other ``num_generations - 1`` rows are sampled from the policy as usual.
``extras["real_answer"]`` (B,) is 1.0 on the reference rows (the ``real_rows`` need). The reference rows'
``sampler_logprobs`` are the policy's teacher-forced log-probs at the sampling temperature; their rewards are those
of the reference texts (the loss need not use them). A group needs at least two rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmpo.errors import ConfigError, DataError
from lmpo.models.logprobs import response_logprobs, split_body_and_head
from lmpo.rollout.base import SamplingParams
from lmpo.rollout.hf import HFGenerator
from lmpo.rollout.reference import ModeOutput


@dataclass(frozen=True)
class SelfPlayOptions:
    """``rollout.mode_params`` of the self_play mode.

    Attributes:
        column: Row key holding the reference answer text.
        append_eos: Append the EOS token to every reference answer.
    """

    column: str = "answer"
    append_eos: bool = True

    def __post_init__(self) -> None:
        if not self.column:
            raise ConfigError("rollout.mode_params.column must name the reference-answer column, got an empty name.")


class SelfPlayGenerator(HFGenerator):
    """The reference answer as the first row of each group, the policy's samples as the rest."""

    wants_rows = True

    def __init__(self, model, tokenizer, options: SelfPlayOptions, batch_size=None, autocast=None) -> None:
        super().__init__(model, tokenizer, batch_size=batch_size, autocast=autocast)
        self.options = options

    def generate(self, prompts: list[str], params: SamplingParams, rows: list[dict] | None = None,
                 max_new_tokens: list[int] | None = None) -> ModeOutput:
        o = self.options
        if rows is None or len(rows) != len(prompts):
            raise DataError("rollout.mode=self_play needs the task rows (with their reference answers) per prompt.")
        first = [i == 0 or rows[i] is not rows[i - 1] for i in range(len(rows))]  # groups are contiguous
        starts = [i for i, f in enumerate(first) if f]
        sizes = [b - a for a, b in zip(starts, starts[1:] + [len(rows)])]
        if min(sizes) < 2:
            raise DataError("rollout.mode=self_play needs at least 2 rows per prompt (the reference answer and one "
                            f"sample); set rollout.num_generations >= 2 (got groups of {min(sizes)}).")
        missing = [i for i in starts if not isinstance(rows[i].get(o.column), str)]
        if missing:
            raise DataError(f"rollout.mode=self_play: rows {missing[:5]} have no text column {o.column!r} "
                            "(set rollout.mode_params.column).")
        sampled = [i for i, f in enumerate(first) if not f]
        limits = None if max_new_tokens is None else [max_new_tokens[i] for i in sampled]
        gen = super().generate([prompts[i] for i in sampled], params, max_new_tokens=limits)
        tok, pad = self.tokenizer, int(self.tokenizer.pad_token_id)
        device = split_body_and_head(self.model)[1].weight.device
        prompt_ids, prompt_mask = self._encode(prompts, device)
        eos = [self.eos_ids[0]] if o.append_eos and self.eos_ids else []
        refs = {i: tok(rows[i][o.column], add_special_tokens=False)["input_ids"][: params.max_new_tokens - len(eos)]
                + eos for i in starts}
        T = max([gen.response_ids.shape[1]] + [len(x) for x in refs.values()])
        N = len(prompts)
        ids = torch.full((N, T), pad, dtype=torch.long, device=device)
        attn = torch.zeros(N, T, dtype=torch.bool, device=device)
        for i, x in refs.items():
            ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            attn[i, : len(x)] = True
        idx = torch.tensor(sampled, dtype=torch.long, device=device)
        t = gen.response_ids.shape[1]
        ids[idx, :t], attn[idx, :t] = gen.response_ids, gen.response_attn
        logp = torch.zeros(N, T, device=device)
        logp[idx, :t] = gen.sampler_logprobs.float()
        real = torch.tensor([float(f) for f in first], device=device)
        ri = torch.tensor(starts, dtype=torch.long, device=device)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():  # the reference rows' log-probs under the policy (teacher-forced)
                lp = response_logprobs(self.model, prompt_ids[ri], prompt_mask[ri], ids[ri], attn[ri],
                                       temperature=params.temperature or 1.0)[0]
        finally:
            self.model.train(was_training)
        logp[ri] = nn.functional.pad(lp.float(), (0, T - lp.shape[1]))[:, :T] * attn[ri]
        truncated = torch.zeros(N, dtype=torch.bool, device=device)
        truncated[idx] = gen.truncated
        truncated[ri] = torch.tensor([not (eos and refs[i] and refs[i][-1] == eos[0]) for i in starts], device=device)
        completions = [""] * N
        for k, i in enumerate(sampled):
            completions[i] = gen.completions[k]
        for i in starts:
            completions[i] = tok.decode(refs[i], skip_special_tokens=True)
        return ModeOutput(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=ids, response_attn=attn,
                          sampler_logprobs=logp, truncated=truncated, completions=completions,
                          num_generated_tokens=int(gen.response_attn.sum()), extras={"real_answer": real})
