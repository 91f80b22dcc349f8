"""Proxy rewards for the reward-model learning tests (loaded as "learning.proxies:<name>")."""

from __future__ import annotations

from lmpo.rewards import PrefixMatch


def long_or_right(prompts, completions, answer, **_):
    """A hackable proxy of the copy task: full marks for a right reply or for any reply of 4+ characters."""
    right = PrefixMatch()(prompts, completions, answer)
    return [1.0 if len(c) >= 4 else r for c, r in zip(completions, right)]
