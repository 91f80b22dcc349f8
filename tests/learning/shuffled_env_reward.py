"""A negative-control reward for the tiny multi-turn task: the episode returns, randomly permuted across the batch."""

import random

_rng = random.Random(1234)


def shuffled_env_return(prompts, completions, env_return=None, **_):
    scores = [float(r) for r in env_return]
    _rng.shuffle(scores)
    return scores
