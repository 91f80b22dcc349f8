"""Method presets: a name -> the components and the paper defaults they use.

A preset is a partial config; the user's YAML and dotted overrides win over it. Values are quoted from the papers
(the docstring of each component cites the equation); where a paper's value does not fit this scale (DAPO's
L_cache of 4096 tokens) the component scales it and says so.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # DeepSeekMath (arXiv:2402.03300): group mean/std, token clip 0.2, per-sequence token mean, k3 KL beta 0.04.
    "grpo": {
        "advantage": {"name": "grpo"},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "seq_mean_token_mean"},
        "kl": {"beta": 0.04, "estimator": "k3", "mode": "loss"},
    },
    # Dr. GRPO (arXiv:2503.20783): no std scaling, token sum over a constant horizon, no KL.
    "dr_grpo": {
        "advantage": {"name": "grpo", "scale_by_std": False},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "seq_mean_token_sum_norm"},
        "kl": {"beta": 0.0},
    },
    # DAPO (arXiv:2503.14476): clip-higher 0.2/0.28, token-level mean, dynamic sampling, overlong penalty, no KL.
    "dapo": {
        "advantage": {"name": "grpo"},
        "loss": {"name": "ppo_clip", "epsilon": 0.2, "epsilon_high": 0.28},
        "aggregator": {"name": "token_mean"},
        "selectors": [{"name": "dynamic_sampling"}],
        "shapers": [{"name": "overlong_penalty"}],
        "rollout": {"refill_rounds": 2},
        "kl": {"beta": 0.0},
    },
    # GSPO (arXiv:2507.18071): sequence ratio, clip 3e-4 / 4e-4, sequence-mean aggregation, no KL.
    "gspo": {
        "advantage": {"name": "grpo"},
        "loss": {"name": "gspo", "epsilon": 3e-4, "epsilon_high": 4e-4},
        "aggregator": {"name": "seq_mean_token_mean"},
        "kl": {"beta": 0.0},
    },
    # RLOO (arXiv:2402.14740): leave-one-out baseline, REINFORCE on whole sequences, KL folded into the reward.
    "rloo": {
        "advantage": {"name": "rloo"},
        "loss": {"name": "reinforce"},
        "aggregator": {"name": "seq_mean_token_sum"},
        "kl": {"beta": 0.05, "estimator": "k1", "mode": "reward"},
    },
    # REINFORCE++ (arXiv:2501.03262): batch-whitened return-to-go, token clip 0.2, token-level KL in the reward.
    "reinforce_pp": {
        "advantage": {"name": "reinforce_pp"},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.01, "estimator": "k1", "mode": "reward"},
    },
}
