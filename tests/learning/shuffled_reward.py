"""A negative-control reward: the copy task's reward, randomly permuted across the batch (no signal left)."""

import random

_rng = random.Random(1234)


def shuffled_prefix_match(prompts, completions, answer, **_):
    scores = [1.0 if c.strip()[:1] == a[:1] else 0.0 for c, a in zip(completions, answer)]
    _rng.shuffle(scores)
    return scores
