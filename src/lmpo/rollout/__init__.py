"""Rollout engines: turn formatted prompts into sampled completions with sampler log-probs."""

from lmpo.rollout.base import GenerationOutput, Generator, SamplingParams
from lmpo.rollout.hf import HFGenerator, filter_logits

__all__ = ["GenerationOutput", "Generator", "HFGenerator", "SamplingParams", "filter_logits"]
