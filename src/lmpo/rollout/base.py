"""The rollout-engine interface: sampling parameters, the generation result, and the Generator protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from torch import Tensor

from lmpo.errors import ConfigError


@dataclass
class SamplingParams:
    """How to sample completions.

    Attributes:
        temperature: Logits are divided by this before filtering and sampling. 0 means greedy decoding.
        top_p: Nucleus sampling: keep the smallest set of most likely tokens whose mass reaches ``top_p``
            (1.0 = off).
        top_k: Keep only the ``top_k`` most likely tokens (0 = off).
        max_new_tokens: Maximum response length; rows that reach it without EOS are marked truncated.
        greedy: Take the argmax instead of sampling (``temperature`` then only affects the reported log-probs).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    greedy: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"SamplingParams.top_p must be in (0, 1] (1 = off), got {self.top_p}.")
        if self.top_k < 0:
            raise ConfigError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}.")
        if self.max_new_tokens < 1:
            raise ConfigError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}.")

    @property
    def is_greedy(self) -> bool:
        """True when decoding takes the argmax (``greedy`` set or ``temperature == 0``)."""
        return self.greedy or self.temperature == 0


@dataclass
class GenerationOutput:
    """Completions for N prompts, as tensors ready for a :class:`lmpo.batch.RolloutBatch`.

    Attributes:
        prompt_ids: (N, P) long, left-padded with the pad id.
        prompt_mask: (N, P) bool, False on left padding.
        response_ids: (N, T) long, right-padded with the pad id.
        response_attn: (N, T) bool, True for generated tokens up to and including EOS, False after.
        sampler_logprobs: (N, T) float32, log-prob of each sampled token under the distribution it was actually
            drawn from (after temperature, top-k and top-p); for greedy decoding the tempered full-softmax
            log-prob. 0 on padding.
        truncated: (N,) bool, the row hit ``max_new_tokens`` without producing EOS.
        completions: N decoded responses, special tokens skipped.
        num_generated_tokens: Total number of real response tokens (``response_attn.sum()``).
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_attn: Tensor
    sampler_logprobs: Tensor
    truncated: Tensor
    completions: list[str] = field(default_factory=list)
    num_generated_tokens: int = 0


@runtime_checkable
class Generator(Protocol):
    """Anything that turns formatted prompt strings into sampled completions."""

    def generate(self, prompts: list[str], params: SamplingParams) -> GenerationOutput:
        """Sample one completion per prompt (repeat prompts in the list to get a group)."""
        ...

    def sync_weights(self) -> None:
        """Make the engine sample from the trainer's current weights (after an optimiser step)."""
        ...
