"""A tiny character-level tokenizer and randomly initialised Llama, built offline in milliseconds.

They exist so that unit tests, smoke runs and the ``model.name: tiny`` config can exercise the whole pipeline
(generation, log-probs, losses, checkpointing) without downloading or de-quantising a real model. The tokenizer
is a genuine :class:`transformers.PreTrainedTokenizerFast` and the model a genuine ``LlamaForCausalLM``, so both
round-trip through ``save_pretrained`` / ``from_pretrained`` like any Hub model.
"""

from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
# Ids are fixed by position: pad=0, eos=1, unk=2, then the characters. 16 entries in total, enough for
# arithmetic toy tasks ("12+7=19").
TINY_VOCAB: tuple[str, ...] = (PAD, EOS, UNK, *"0123456789", "+", "=", " ")

# Weights drawn with a much larger std than Llama's default 0.02 so the random model has peaked, position-dependent
# predictions: with near-uniform logits, bugs such as shifted position ids would hide below test tolerances.
_TINY_INIT_STD = 0.5
# The model behind the "tiny" spec (learning tests, `configs/tiny.yaml`) starts closer to uniform so that RL has
# something to explore: with std 0.5 it almost never produces the rewarded digit at step 0.
TINY_TRAIN_INIT_STD = 0.1


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Build the 16-symbol character-level tokenizer.

    Every character is its own token (space included); characters outside the vocabulary map to ``<unk>``.
    No special tokens are added on encoding and ``decode(ids, skip_special_tokens=True)`` returns the text.

    Returns:
        A fast tokenizer with ``pad_token="<pad>"``, ``eos_token="<eos>"``, left padding and no chat template.
    """
    vocab = {tok: i for i, tok in enumerate(TINY_VOCAB)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Isolate every single character, whitespace and newlines included (they become tokens or <unk>).
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # WordLevel would join tokens with spaces on decode; Fuse concatenates them back into the original string.
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        model_max_length=4096,
    )
    return tok


def build_tiny_model(
    seed: int = 0, vocab_size: int = 16, hidden_size: int = 32, num_layers: int = 2, init_std: float = _TINY_INIT_STD,
    tie_embeddings: bool = False,
) -> LlamaForCausalLM:
    """Build a tiny randomly initialised Llama causal LM, deterministic in ``seed``.

    The global torch RNG is left untouched, so building a model does not perturb a seeded training run.

    Args:
        seed: Seed of the weight initialisation; equal seeds give bit-identical weights.
        vocab_size: Vocabulary size; 16 matches :func:`build_tiny_tokenizer`. Larger values are useful for
            memory tests (ids >= 16 are then never produced by the tokenizer).
        hidden_size: Model width; must be divisible by 4 (4 query heads, 2 key/value heads).
        num_layers: Number of decoder layers.
        init_std: Std of the weight initialisation (0.5: peaked predictions for numerical tests).
        tie_embeddings: Share the input embedding with the LM head (as SmolLM2 does).

    Returns:
        A float32 ``LlamaForCausalLM`` in eval mode with pad=0, eos=1 (untied embeddings unless ``tie_embeddings``).
    """
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, like the real SmolLM2, so that code path is exercised
        max_position_embeddings=4096,
        initializer_range=init_std,
        tie_word_embeddings=tie_embeddings,
        pad_token_id=TINY_VOCAB.index(PAD),
        eos_token_id=TINY_VOCAB.index(EOS),
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id, bos_token_id=None
    )
    return model.eval()
