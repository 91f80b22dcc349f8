"""Model loading, the tiny test model, LoRA, prompt formatting and memory-lean response log-probs."""

from lmpo.models.load import DEFAULT_MODEL, apply_lora, format_prompt, load_model
from lmpo.models.logprobs import position_ids_from_mask, response_logprobs, split_body_and_head
from lmpo.models.tiny import TINY_VOCAB, build_tiny_model, build_tiny_tokenizer

__all__ = [
    "DEFAULT_MODEL",
    "TINY_VOCAB",
    "apply_lora",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "format_prompt",
    "load_model",
    "position_ids_from_mask",
    "response_logprobs",
    "split_body_and_head",
]
