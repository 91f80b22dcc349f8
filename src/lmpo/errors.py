"""User-facing errors.

Every error a user can cause (bad config, missing file, bad data, a failing reward function) is raised as an
:class:`LmpoError` subclass whose message is one self-contained paragraph: what was wrong, where (key, file, row,
function), what was expected, and the nearest valid choice. The CLI prints the message and exits non-zero without a
traceback; library callers can catch the class.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LmpoError(Exception):
    """Base class of every error caused by user input (the CLI prints it without a traceback)."""


class ConfigError(LmpoError):
    """A configuration key, value or type is invalid."""


class DataError(LmpoError):
    """A dataset, task or batch is malformed."""


class ModelError(LmpoError):
    """A model could not be located or loaded."""


class RewardError(LmpoError):
    """A reward function raised or returned something unusable."""


class TrainingDiverged(LmpoError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def nearest(name: str, choices: Iterable[str]) -> str | None:
    """Return the valid choice closest to ``name`` (or ``None`` if nothing is reasonably close)."""
    choices = list(choices)
    hits = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    if hits:
        return hits[0]
    low = name.lower()
    for c in choices:  # a prefix or substring match still helps with abbreviations
        if low and (c.lower().startswith(low) or low in c.lower()):
            return c
    return None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A ' Did you mean "x"?' suffix, or an empty string."""
    hit = nearest(name, choices)
    return f' Did you mean "{hit}"?' if hit else ""


def check_known_keys(params: Iterable, valid: list[str], prefix: str, context: str = "") -> None:
    """A :class:`ConfigError` for the first key of ``params`` not in ``valid``, named ``prefix.key`` (``context``
    follows the name, e.g. " for rollout.mode=episodes"), with the nearest valid key and the list of them."""
    for k in params:
        if k not in valid:
            raise ConfigError(f'Unknown key "{prefix}.{k}"{context}.{did_you_mean(str(k), valid)} Valid keys: '
                              f"{', '.join(valid)}.")
