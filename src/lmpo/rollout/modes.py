"""Training-rollout modes, chosen by ``rollout.mode`` (never by method name); options come from ``rollout.mode_params``.

- ``sample`` (default): the plain sampler (:class:`lmpo.rollout.hf.HFGenerator`).
- ``reference``: the task's reference answers with one-token policy samples per position
  (:mod:`lmpo.rollout.reference`; OTR).
- ``soft_thinking``: Gumbel-softmax soft-thinking steps, then discrete answer tokens (:mod:`lmpo.rollout.soft`;
  SofT-GRPO).
- ``episodes``: multi-turn episodes of a text environment (:mod:`lmpo.rollout.episodes`; ``lmpo.envs``).
- ``mixture``: each group is policy samples plus opponents from the geometric mixture of the policy and the
  reference (:mod:`lmpo.rollout.mixture`; Nash-MD).
- ``self_play``: each group is the task's reference answer plus the policy's samples (:mod:`lmpo.rollout.self_play`;
  SPIN).

Held-out evaluation uses the plain sampler, except under ``episodes`` (``plays_episodes``: the task exists only
through its environment), where it plays greedy episodes. A mode's generator may return extra per-row tensors
(``extras``) that the rollout stage copies into ``batch.extras``, batch fields (``batch_fields``: ``response_mask``,
``turn_ids``, ``token_rewards``) and reward columns (``columns``) (:class:`lmpo.rollout.reference.ModeOutput`), and
may ask for the task rows (``wants_rows``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lmpo.errors import ConfigError, check_known_keys, did_you_mean


def _mode_classes(mode: str) -> tuple[type, type] | None:
    if mode == "reference":
        from lmpo.rollout.reference import ReferenceGenerator, ReferenceOptions

        return ReferenceGenerator, ReferenceOptions
    if mode == "soft_thinking":
        from lmpo.rollout.soft import SoftThinkingGenerator, SoftThinkingOptions

        return SoftThinkingGenerator, SoftThinkingOptions
    if mode == "episodes":
        from lmpo.rollout.episodes import EpisodeGenerator, EpisodeOptions

        return EpisodeGenerator, EpisodeOptions
    if mode == "mixture":
        from lmpo.rollout.mixture import MixtureGenerator, MixtureOptions

        return MixtureGenerator, MixtureOptions
    if mode == "self_play":
        from lmpo.rollout.self_play import SelfPlayGenerator, SelfPlayOptions

        return SelfPlayGenerator, SelfPlayOptions
    return None


ROLLOUT_MODES = ("sample", "reference", "soft_thinking", "episodes", "self_play", "mixture")
_MODE_EXTRAS = {"sample": (), "reference": ("candidate_ids",),
                "soft_thinking": ("soft_mask", "soft_ids", "soft_weights", "soft_valid", "soft_logits", "candidate_ids"),
                "episodes": ("policy_mask", "env_return", "turn_rewards", "num_turns", "episode_done", "invalid_actions",
                             "tool_calls", "invalid_tool_calls", "turn_tool_calls", "turn_observation_keys",
                             "tool_errors"),
                "self_play": ("real_answer",), "mixture": ("opponent",)}


def mode_extras(mode: str) -> tuple[str, ...]:
    """The per-row tensors a mode's generator adds to ``batch.extras`` (what components may then need)."""
    return _MODE_EXTRAS.get(mode, ())


def mode_options(mode: str, params: dict[str, Any]):
    """Validated options of ``mode`` (``None`` for ``sample``); errors name ``rollout.mode`` / the bad key."""
    if mode not in ROLLOUT_MODES:
        raise ConfigError(f"rollout.mode must be one of {', '.join(ROLLOUT_MODES)}, got {mode!r}."
                          f"{did_you_mean(str(mode), ROLLOUT_MODES)}")
    classes = _mode_classes(mode)
    if classes is None:
        if params:
            raise ConfigError(f"rollout.mode_params must be empty for rollout.mode=sample, got {sorted(params)}.")
        return None
    opts_cls = classes[1]
    check_known_keys(params, [f.name for f in dataclasses.fields(opts_cls)], "rollout.mode_params",
                     f" for rollout.mode={mode}")
    return opts_cls(**params)


def policy_horizon(mode: str, params: dict[str, Any], max_new_tokens: int) -> int:
    """The most policy (trained) tokens one row can hold: ``max_new_tokens``, times ``max_turns`` for episodes (the
    constant length normaliser of aggregators such as Dr. GRPO's)."""
    if mode == "episodes":
        return max_new_tokens * mode_options(mode, params).max_turns
    return max_new_tokens


def build_train_generator(mode: str, params: dict[str, Any], model, tokenizer, batch_size=None, autocast=None,
                          sampler=None):
    """The training generator of ``mode``, or ``None`` when the plain sampler is used. ``sampler``: the engine that
    samples each policy turn of ``episodes`` (e.g. :class:`lmpo.rollout.vllm.VLLMGenerator`; default lmpo's own)."""
    options = mode_options(mode, params)
    if options is None:
        return None
    kw = {"sampler": sampler} if sampler is not None else {}
    return _mode_classes(mode)[0](model, tokenizer, options, batch_size=batch_size, autocast=autocast, **kw)


class _RowsBound:
    """A generator whose ``generate`` also receives the task rows of its prompts (``wants_rows`` modes)."""

    def __init__(self, generator, rows: list[dict]) -> None:
        self.generator, self.rows = generator, rows

    def generate(self, prompts, params, **kw):
        return self.generator.generate(prompts, params, rows=self.rows, **kw)

    def sync_weights(self) -> None:
        self.generator.sync_weights()


def bind_rows(generator, rows: list[dict]):
    """``generator`` with ``rows`` (one per prompt) bound to every ``generate`` call."""
    return _RowsBound(generator, rows)
