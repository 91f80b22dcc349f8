"""Reward functions (TRL signature ``fn(prompts, completions, **columns) -> list[float]``) and weighted sets of them.

Importing this package registers the built-ins in :data:`lmpo.registry.REWARDS`.
"""

from lmpo.rewards.builtin import (
    NEEDS_ANSWER,
    AnswerTagFormat,
    ExactMatch,
    FinalNumber,
    MathVerify,
    PrefixMatch,
    ReasoningGymScore,
    extract_tag,
    last_number,
)
from lmpo.rewards.reward_set import RewardSet, RewardSpec, resolve_reward
from lmpo.rewards import cappy, caprl, ensemble, gspr, judge, mpo, polar, prm, reward_model  # noqa: F401,E402  (register the learned scorers)

__all__ = [
    "NEEDS_ANSWER",
    "AnswerTagFormat",
    "ExactMatch",
    "FinalNumber",
    "MathVerify",
    "PrefixMatch",
    "ReasoningGymScore",
    "RewardSet",
    "RewardSpec",
    "extract_tag",
    "last_number",
    "resolve_reward",
]
