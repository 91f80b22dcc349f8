"""Model-free stand-ins for the collection-stage tests: a generator that always answers "7" and an exact reward."""

from __future__ import annotations

import torch

from lmpo.rollout.base import GenerationOutput


class EchoGenerator:
    """Every completion is "7"; records the prompt texts it was given."""

    def __init__(self):
        self.seen: list[str] = []

    def generate(self, prompts, params, **_):
        self.seen += prompts
        n = len(prompts)
        return GenerationOutput(
            prompt_ids=torch.zeros(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1, dtype=torch.bool),
            response_ids=torch.ones(n, 2, dtype=torch.long), response_attn=torch.ones(n, 2, dtype=torch.bool),
            sampler_logprobs=torch.zeros(n, 2), truncated=torch.zeros(n, dtype=torch.bool), completions=["7"] * n)

    def sync_weights(self):
        pass


def exact_reward(prompts, completions, columns):
    r = torch.tensor([float(c == a) for c, a in zip(completions, columns["answer"])])
    return r, r[:, None]
